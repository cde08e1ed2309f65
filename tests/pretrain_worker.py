"""Run by tests/test_deepspeed.py under `torchrun --nproc_per_node 2`: full tuning on the toy data, once
with torch DDP and once with DeepSpeed ZeRO-2, in the same two processes. Each rank saves its
parameters after the last optimizer step and its per-epoch losses under OUT. The worker starts the
process group itself, so both runs share it (a second rendezvous through torchrun's store would hang).

    torchrun --nproc_per_node 2 tests/pretrain_worker.py ZOO OUT BATCH EPOCHS
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from st2si_cli.pretrain.config import PretrainConfig
from st2si_cli.pretrain.full import pretrain
from st2si_cli.zoo.store import Zoo


def main() -> None:
    zoo_root, out, batch, epochs = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    rank = int(os.environ["RANK"])
    zoo = Zoo(zoo_root)
    torch.distributed.init_process_group("gloo")
    for mode, ds in (("ddp", None), ("zero2", "zero2")):
        last: dict[str, torch.Tensor] = {}

        def keep_last(info: dict, last: dict = last) -> None:
            last.clear()
            last.update({k: v.detach().clone() for k, v in info["module"].state_dict().items()})

        cfg = PretrainConfig(epochs=epochs, lr=1e-3, batch_size=batch, seed=0)
        res = pretrain(
            zoo, ["toy"], backbone="tiny-opt", cfg=cfg, out=f"two-{mode}", deepspeed=ds, on_step=keep_last
        )
        torch.save(last, out / f"{mode}-rank{rank}.pt")
        (out / f"{mode}-rank{rank}.json").write_text(json.dumps([r["loss"] for r in res.history]))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()

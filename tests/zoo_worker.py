"""Run by tests/test_zoo_concurrency.py as several processes on one zoo at once. Each waits for the
file GO, then for each round prepares a dataset of its own (new data every round), adapts a head on
it and on the domain `shared` (the same feature key in every worker), and writes what it stored, as
JSON, to OUT. tests/ is on sys.path when run as a script, so `helpers` imports as it does in tests.

    python tests/zoo_worker.py ZOO WORKER ROUNDS GO OUT
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
from helpers import synthetic_dataset

from st2si_cli.adapt import FeatureOptions, adapt
from st2si_cli.data.prepare import store_dataset
from st2si_cli.train.head import HeadConfig
from st2si_cli.zoo.store import Zoo


def main() -> None:
    root, worker, rounds, go, out = (
        sys.argv[1],
        int(sys.argv[2]),
        int(sys.argv[3]),
        Path(sys.argv[4]),
        sys.argv[5],
    )
    torch.set_num_threads(1)
    while not go.exists():
        time.sleep(0.01)
    stored = []
    zoo = Zoo(root)  # every worker opens the (possibly fresh) zoo at the same moment
    for r in range(rounds):
        domain = f"w{worker}-r{r}"
        ds = store_dataset(
            zoo,
            synthetic_dataset(n_users=12, seed=1 + 100 * worker + r),
            domain=domain,
            fmt="synthetic",
            source="x",
        )
        stored.append({"kind": "dataset", "name": domain, "id": ds.id})
        for d in (domain, "shared"):
            head = adapt(
                zoo,
                d,
                backbone="tiny-opt",
                head_cfg=HeadConfig(max_epochs=1),
                feature_opts=FeatureOptions(dtype="fp32"),
            )
            stored.append({"kind": "head", "name": head.name, "id": head.id, "domain": d})
    Path(out).write_text(json.dumps({"pid": os.getpid(), "stored": stored}))


if __name__ == "__main__":
    main()

"""Per-op profile (torch.profiler) of the feature pass: the packed forward against plain transformers.

    python -m bench.profile_forward --domain amazon-scientific --users 8 --rounds 2

Runs the feature pass's samples (histories + ID-alignment samples of a user subset, as `adapt` builds
and batches them) through both paths, interleaved (plain, packed, plain, packed ...), prints the
seconds of every round, the median and minimum ratio, the largest feature difference, and the
torch.profiler table of one more pass of each path (top ops by self CPU time).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from bench.speed_rounds import subset


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", default=None)
    ap.add_argument("--domain", required=True)
    ap.add_argument("--backbone", default="smollm2-135m")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--users", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rows", type=int, default=15, help="rows of each profiler table")
    args = ap.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile

    from st2si_cli import (
        ItemTokenizer,
        TextConfig,
        Zoo,
        build_samples,
        load_backbone,
        load_dataset,
        plan_batches,
        quiet_transformers,
    )

    quiet_transformers()
    torch.set_num_threads(args.threads)
    zoo = Zoo(args.zoo)
    ds = subset(load_dataset(zoo, args.domain), args.users, 0)
    bb = load_backbone(zoo, args.backbone, dtype=args.dtype)
    itok = ItemTokenizer.create(bb.tokenizer, TextConfig())
    samples = build_samples(ds, itok, itok.encode_items(ds.items))
    lengths = [len(s.tokens) for s in samples]
    batches = plan_batches(lengths, 16384, 64)
    model = bb.st2si()

    def run(packed: bool) -> tuple[float, torch.Tensor]:
        model.packed = packed
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = [model.hidden_at([samples[i] for i in b]) for b in batches]
            return time.perf_counter() - t0, torch.cat(out).float()

    run(True)  # warm-up: fused weights, oneDNN primitives
    times: dict[bool, list[float]] = {False: [], True: []}
    feats = {}
    for _ in range(args.rounds):
        for packed in (False, True):
            s, feats[packed] = run(packed)
            times[packed].append(s)
    diff = (feats[True] - feats[False]).abs().max().item()
    scale = feats[False].abs().max().item()
    print(f"{len(samples)} samples, {sum(lengths)} tokens, {len(batches)} batches, "
          f"{sum(len(b) * lengths[b[0]] for b in batches)} padded tokens; {args.dtype}, {args.threads} thread(s)")  # fmt: skip
    print(f"plain seconds {[round(x, 2) for x in times[False]]}, packed {[round(x, 2) for x in times[True]]}")
    print(
        f"plain / packed: median {statistics.median(times[False]) / statistics.median(times[True]):.3f}, "
        f"min {min(times[False]) / min(times[True]):.3f}; largest feature difference {diff:.3g} (of {scale:.3g})"
    )
    for packed in (False, True):
        model.packed = packed
        with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
            for b in batches:
                model.hidden_at([samples[i] for i in b])
        print(f"\n{'packed' if packed else 'plain'} forward, top ops by self CPU time")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The shards a feature pass writes as it goes (runs of consecutive batches of its plan, each with its
span), read back on resume, and the end of a pass split across torchrun ranks."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from st2si_cli.errors import St2siError
from st2si_cli.features.forward import run_batches
from st2si_cli.features.ranks import gather
from st2si_cli.model.samples import Sample
from st2si_cli.zoo.artifact import Artifact, write_safetensors_atomic


def run_shards(
    model: Any,
    samples: Sequence[Sample],
    batches: list[list[int]],
    start: int,
    stop: int,
    first_row: Any,
    matrix: Callable[[int], Any],
    stage: Any,
    dtype: Any,
    shard_seconds: float,
    on_progress: Callable[[int, int], None] | None,
) -> int:
    """Run batches [start, stop) of the plan into `matrix`, writing them to shards of `stage` as they
    go (stored in `dtype`); returns the tokens computed."""
    import torch

    computed_tokens = 0
    with torch.inference_mode():
        # A shard is a run of consecutive batches, closed once it holds `shard_seconds` of compute: sized
        # by the work measured as it runs (not by sample count), so a kill loses at most about that much.
        first, shard_t0 = start, time.perf_counter()
        for j, b, h in run_batches(model, samples, batches, start=start, stop=stop):
            feats = matrix(h.shape[1])
            feats[plan_rows(first_row, [b])] = h
            btok = sum(len(samples[i].tokens) for i in b)
            computed_tokens += btok
            if on_progress:
                on_progress(btok, len(b))
            if j + 1 == stop or time.perf_counter() - shard_t0 >= shard_seconds:
                rows = plan_rows(first_row, batches[first : j + 1])
                write_safetensors_atomic(
                    {"feats": feats[rows].to(dtype), "span": torch.tensor([first, j + 1])},
                    stage / f"shard-{first:06d}.safetensors",  # named by its first batch: plan order
                )
                first, shard_t0 = j + 1, time.perf_counter()
    return computed_tokens


def finish_on_ranks(
    rank: int,
    computed_tokens: int,
    read_the_rest: Callable[[], list[int]],
    store_cache: Callable[[int], tuple[Artifact, Any]],
    load_cache: Callable[[str], tuple[Artifact, Any]],
    stage: Any,
) -> tuple[Artifact, Any]:
    """The end of a pass under torchrun, once every rank has computed its block: rank 0 reads the other
    blocks' shards and stores the cache (`store_cache(tokens)`); the others wait for its ID and load the
    cache (`load_cache(id)`). Both give (artifact, FeatureSet). What stops rank 0 is raised on every rank
    (each rank meets the others exactly twice here, whatever happens)."""
    total = sum(gather(computed_tokens))  # first meeting: every rank's shards are on disk
    if rank != 0:
        told = gather(None)[0]  # second meeting: rank 0 has stored the cache, or failed
        if isinstance(told, dict):
            raise St2siError(f"the feature pass failed on rank 0: {told['error']}")
        return load_cache(told)
    try:
        missing = read_the_rest()
        if missing:
            runs = ", ".join(f"{a}" if e == a + 1 else f"{a}-{e - 1}" for a, e in missing_runs(missing))
            raise St2siError(
                f"after every rank's pass, no shard in {stage} holds batches {runs} of the feature plan "
                "(a rank did not write its share): run the command again to compute them"
            )
        art, fs = store_cache(total)
    except Exception as e:
        gather({"error": str(e)})
        raise
    gather(art.id)
    return art, fs


def missing_runs(missing: Sequence[int]) -> list[tuple[int, int]]:
    """Sorted batch indices as runs [start, end) of consecutive ones."""
    runs: list[tuple[int, int]] = []
    for j in missing:
        if runs and runs[-1][1] == j:
            runs[-1] = (runs[-1][0], j + 1)
        else:
            runs.append((j, j + 1))
    return runs


def plan_rows(first_row: Any, batches: Sequence[Sequence[int]]) -> Any:
    """Rows of the [P, d] feature matrix held by `batches` (samples in batch order, queries in order)."""
    import torch

    starts = [int(first_row[i]) for b in batches for i in b]
    ends = [int(first_row[i + 1]) for b in batches for i in b]
    if not starts:
        return torch.zeros(0, dtype=torch.long)
    return torch.cat([torch.arange(a, e) for a, e in zip(starts, ends)])


def resume_shards(stage: Any, batches: list[list[int]], first_row: Any, matrix: Callable[[int], Any]) -> int:
    """Copy the features of the shards on disk into `matrix(d)`; returns the first batch they do not cover.

    Shards are read in order while each continues where the last ended; any other file (a different
    plan, a damaged shard) is removed, so its batches are computed again. (One process's resume; the
    ranks of a torchrun job, whose shards start anywhere, read theirs with `read_shards`.)
    """
    from safetensors.torch import load_file

    done = 0
    for path in sorted(stage.glob("shard-*.safetensors")):
        try:
            loaded = load_file(str(path))
            start, end = loaded["span"].tolist()
        except Exception:  # noqa: BLE001 - an unreadable shard is recomputed, not fatal
            start, end = -1, -1
        rows = plan_rows(first_row, batches[start:end]) if start == done and end <= len(batches) else None
        if rows is None or start >= end or loaded["feats"].shape[0] != rows.numel():
            path.unlink()
            continue
        matrix(loaded["feats"].shape[1])[rows] = loaded["feats"].float()
        done = end
    return done


def read_shards(
    stage: Any,
    batches: list[list[int]],
    first_row: Any,
    matrix: Callable[[int], Any],
    within: tuple[int, int] | None = None,
) -> list[int]:
    """Copy the features of the shards on disk that hold batches of `within` (batches [start, end) of
    the plan; default: all of it) into `matrix(d)`; returns the batches of `within` that none holds.

    Shards may hold any runs of batches that do not overlap (each rank of a torchrun job writes those
    of its block, from wherever its block or a gap in it starts). A shard named by a batch of `within`
    that cannot be read, does not fit the plan or overlaps one read before is removed, so its batches
    are computed again; one named by a batch outside `within` (another rank's) is left alone.
    """
    from safetensors import safe_open

    lo, hi = within if within is not None else (0, len(batches))
    held = [False] * len(batches)
    for path in sorted(stage.glob("shard-*.safetensors")):
        try:
            named = int(path.name[len("shard-") : -len(".safetensors")])
        except ValueError:
            named = -1
        feats = None
        try:
            with safe_open(str(path), framework="pt") as f:
                start, end = f.get_tensor("span").tolist()
                if end <= lo or start >= hi:  # holds no batch of `within`
                    continue
                if start == named and 0 <= start < end <= len(batches) and not any(held[start:end]):
                    feats = f.get_tensor("feats")
        except Exception:  # noqa: BLE001 - an unreadable shard is recomputed, not fatal
            feats = None
        rows = plan_rows(first_row, batches[start:end]) if feats is not None else None
        if rows is None or feats.shape[0] != rows.numel():
            if lo <= named < hi:
                path.unlink(missing_ok=True)
            continue
        matrix(feats.shape[1])[rows] = feats.float()
        held[start:end] = [True] * (end - start)
    return [j for j in range(lo, hi) if not held[j]]

"""Processes of one `torchrun --nproc_per_node N` job: which one this is, and the few meetings the
feature pass needs (a gloo group on the CPU, whatever device the ranks compute on).

Each rank computes its block of the feature pass (`split_blocks`) into the shared staging folder; rank
0 assembles and stores the cache and trains the head. Without torchrun's RANK / WORLD_SIZE this is
rank 0 of 1 and every helper does nothing. torch is imported only when a group is needed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

# Rank 0 may hold the others at a meeting for a long time: while another process finishes the same cache
# (rank 0 waits for its claim), or while rank 0 assembles and stores a large cache.
GROUP_TIMEOUT = timedelta(hours=2)


def world() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) outside torchrun."""
    try:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0, 1
    if size < 1 or not 0 <= rank < size:
        return 0, 1
    return rank, size


def is_worker() -> bool:
    """Whether this process is a rank other than 0 (it computes features, but trains and stores nothing)."""
    return world()[0] != 0


def init_group() -> bool:
    """Join the job's gloo process group (torchrun's MASTER_ADDR / MASTER_PORT) unless it exists or
    this is the only process; returns whether a group is in use."""
    rank, size = world()
    if size == 1:
        return False
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", rank=rank, world_size=size, timeout=GROUP_TIMEOUT)
    return True


def barrier() -> None:
    """Wait until every rank gets here (nothing to wait for in one process)."""
    if init_group():
        import torch.distributed as dist

        dist.barrier()


def gather(value: Any) -> list[Any]:
    """Every rank's `value` (picklable), in rank order, on every rank; also a barrier. `[value]` in one
    process."""
    if not init_group():
        return [value]
    import torch.distributed as dist

    out: list[Any] = [None] * world()[1]
    dist.all_gather_object(out, value)
    return out


def split_blocks(costs: Sequence[int], n: int) -> list[tuple[int, int]]:
    """`n` contiguous blocks [start, end) of the items whose costs are `costs`, covering each item once,
    with about equal cost: block k ends where the running cost comes nearest (k + 1) / n of the total.
    Blocks may be empty where there are fewer items than blocks."""
    total = sum(costs)
    running = [0]
    for c in costs:
        running.append(running[-1] + c)
    bounds = [0]
    for k in range(1, n):
        goal = total * k / n
        i = bounds[-1]
        while i < len(costs) and running[i + 1] <= goal:
            i += 1
        if i < len(costs) and running[i + 1] - goal < goal - running[i]:
            i += 1  # the item that crosses the goal goes to the block nearer its cost
        bounds.append(i)
    bounds.append(len(costs))
    return [(bounds[k], bounds[k + 1]) for k in range(n)]

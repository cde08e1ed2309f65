"""Warm DeepSpeed's JIT-compiled ops once, so later runs (and the tests) do not pay for the compile.

On a CPU machine DeepSpeed builds its shared-memory communication op (`deepspeed_shm_comm`) the first
time a process group starts: about 75 s on 2 cores, cached under ~/.cache/torch_extensions (or
$TORCH_EXTENSIONS_DIR). Run this once before the test suite:

    DS_ACCELERATOR=cpu python .ci/warm_deepspeed.py

It does nothing (and says so) where deepspeed is not installed or the op does not apply.
"""

from __future__ import annotations

import os
import sys
import time


def main() -> int:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        print("deepspeed is not installed: nothing to warm")
        return 0
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    t0 = time.time()
    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        print(f"no shared-memory comm op for accelerator {get_accelerator()._name}: nothing to warm")
        return 0
    from st2si_cli import St2siError, check_op_locks

    try:  # a killed earlier build leaves a lock that torch would wait on forever, silently
        check_op_locks([builder.name])
    except St2siError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    builder.load(verbose=False)
    print(f"DeepSpeed op {builder.NAME} ready in {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

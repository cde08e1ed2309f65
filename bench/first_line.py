"""Time to the first `st2si recommend` answer through a FIFO: the line written at once, or after a delay.

    python -m bench.first_line --zoo ZOO --domain DOMAIN [--delay SECONDS] [--history ID ...]

Prints the seconds from process start to the first answer line, and from the write to the answer (with a
delay, the model has loaded meanwhile, so the second figure is what a waiting stream sees).
"""

from __future__ import annotations

import argparse
import json
import os
import select
import subprocess
import sys
import tempfile
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", required=True)
    ap.add_argument("--domain", required=True)
    ap.add_argument("--delay", type=float, default=0.0, help="seconds between opening the FIFO and writing")
    ap.add_argument("--history", nargs="+", default=["1", "2"], help="catalog item IDs of the one history")
    args = ap.parse_args()
    fifo = os.path.join(tempfile.mkdtemp(), "in.fifo")
    os.mkfifo(fifo)
    env = {**os.environ, "ST2SI_NO_PROGRESS": "1"}
    cmd = [sys.executable, "-m", "st2si_cli", "--zoo", args.zoo, "recommend", "--domain", args.domain]
    t0 = time.monotonic()
    proc = subprocess.Popen([*cmd, "--user-history", fifo, "-k", "3"], stdout=subprocess.PIPE, env=env)
    with open(fifo, "w") as w:
        time.sleep(args.delay)
        t_write = time.monotonic()
        w.write(json.dumps({"user": "a", "history": args.history}) + "\n")
        w.flush()
        if not select.select([proc.stdout], [], [], 600)[0]:
            sys.exit("no answer within 600 s")
        proc.stdout.readline()
        t1 = time.monotonic()
    proc.wait()
    print(
        json.dumps(
            {
                "delay_seconds": args.delay,
                "first_line_seconds": round(t1 - t0, 2),
                "after_write_seconds": round(t1 - t_write, 2),
            }
        )
    )


if __name__ == "__main__":
    main()

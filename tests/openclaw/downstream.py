"""The downstream work an exec launches in these tests, like a real task script.

``python downstream.py TASK --log LOG --locks DIR --gate SOCK [--exit-code-file F]``:

* connects to the test's gate (a unix socket) and tells it every step, so the
  test waits for processes, never for time;
* records its launch (task, pid, Task Guard's run id from the environment) as
  one JSON line in LOG;
* takes the task's lock file exclusively (``O_CREAT | O_EXCL``, like
  ``flock -n``); when it is taken, records a *lock conflict* and exits 75;
* waits at the gate until the test lets this task finish (one byte), so "the
  duplicates arrive while it runs" is part of the script, not a matter of timing;
* removes its lock file, records its end and exits with the code in
  ``--exit-code-file`` (0 when there is none).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path


def record(log: Path, **fields: object) -> None:
    line = json.dumps({"at": time.time(), "pid": os.getpid(), **fields}) + "\n"
    with log.open("a") as out:
        fcntl.flock(out, fcntl.LOCK_EX)
        out.write(line)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("task")
    parser.add_argument("--log", type=Path, required=True)
    parser.add_argument("--locks", type=Path, required=True)
    parser.add_argument("--gate", required=True)
    parser.add_argument("--exit-code-file", type=Path)
    args = parser.parse_args()
    run_id = os.environ.get("TASKGUARD_RUN_ID", "")
    with socket.socket(socket.AF_UNIX) as gate:
        gate.connect(args.gate)
        record(args.log, event="launch", task=args.task, run_id=run_id)
        gate.sendall(f"start {args.task}\n".encode())
        lock = args.locks / f"{args.task}.lock"
        try:
            os.close(os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            record(args.log, event="lock-conflict", task=args.task, run_id=run_id)
            gate.sendall(b"conflict\n")
            return 75
        try:
            gate.sendall(b"wait\n")
            gate.recv(1)  # the test lets it finish
        finally:
            lock.unlink(missing_ok=True)
        code = int(args.exit_code_file.read_text().strip() or "0") if args.exit_code_file else 0
        record(args.log, event="end", task=args.task, run_id=run_id, exit_code=code)
        gate.sendall(f"end {code}\n".encode())
    return code


if __name__ == "__main__":
    sys.exit(main())

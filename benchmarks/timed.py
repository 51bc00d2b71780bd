"""Run a command and record its wall time: `python benchmarks/timed.py OUT.json -- CMD ...`.

`make test` runs through it, so `make bench` can report how long the last `make test` took.
The command's exit status is passed on."""
import datetime
import json
import os
import subprocess
import sys
import time


def main(argv):
    out, separator, command = argv[0], argv[1], argv[2:]
    if separator != "--" or not command:
        sys.exit("usage: python benchmarks/timed.py OUT.json -- CMD [ARGS...]")
    start = time.perf_counter()
    status = subprocess.call(command)
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump({"seconds": round(time.perf_counter() - start), "exit_status": status,
                   "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
                       timespec="seconds")}, f)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""metrics.jsonl: one JSON object per optimizer step (and per evaluation), written by rank 0.

Nothing written is lost: each record is flushed as it is written, and a resume that drops the
records past its checkpoint writes the kept ones to a temporary file, fsyncs it and renames it
into place, so a kill at any moment leaves either the old log or the new one, whole. A last
line cut short by a crash is dropped with a warning rather than blocking every later resume.
"""
import json
import os
import warnings

from .rundir import atomic_write

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    """Appends records to `out_dir/metrics.jsonl`; a no-op when out_dir is None or not rank 0.

    A fresh run starts the file empty. A resumed run keeps the records up to the step it resumed
    from and drops the later ones, which the run is about to redo."""

    def __init__(self, out_dir, is_main=True, truncate_after=None):
        self.file = None
        if out_dir is None or not is_main:
            return
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, METRICS_FILE)
        if truncate_after is not None and os.path.exists(path):
            kept = [(line, r) for line, r in read_lines(path) if r["step"] <= truncate_after]
            warn_missing_steps(path, [r for _, r in kept], truncate_after)
            atomic_write(path, b"".join(line for line, _ in kept), fault="metrics_rewrite")
            self.file = open(path, "a")
        else:
            self.file = open(path, "w")

    def write(self, record):
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()  # every step: a crash loses at most the record being written

    def close(self):
        if self.file is not None:
            self.file.close()
            self.file = None


def read_lines(path):
    """Every record of a metrics.jsonl as (its line's bytes, the record), in order.

    A last line that a crash cut short (no newline, or not JSON) is dropped with a warning. A bad
    line anywhere else means the file was damaged or edited: a ValueError names the line."""
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    tail = lines.pop()  # what follows the last newline: nothing, unless a write was cut short
    if tail.strip():
        warnings.warn(f"{path}: dropped an unfinished last line ({_excerpt(tail)}), the record a "
                      "crash interrupted", stacklevel=3)
    numbered = [(i, line) for i, line in enumerate(lines, 1) if line.strip()]
    out = []
    for k, (i, line) in enumerate(numbered):
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError("not a record with an integer 'step'")
        except ValueError as err:
            if k == len(numbered) - 1 and not tail.strip():
                warnings.warn(f"{path}: dropped a malformed last line {i} ({_excerpt(line)}), the "
                              "record a crash interrupted", stacklevel=3)
                break
            raise ValueError(f"{path} line {i} is not a metrics record ({err}): "
                             f"{_excerpt(line)}. The log was damaged or edited; delete or repair "
                             "that line, then run again") from None
        out.append((line + b"\n", record))
    return out


def warn_missing_steps(path, records, last_step):
    """A resumed run's log should hold one train record for each step up to its checkpoint."""
    steps = {r["step"] for r in records if "split" not in r}
    missing = [s for s in range(1, last_step + 1) if s not in steps]
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (", ..." if len(missing) > 10 else "")
        warnings.warn(f"{path} has no record of step(s) {shown} of the {last_step} the checkpoint "
                      "covers (the log was lost or edited); the resumed run continues without "
                      "them", stacklevel=3)


def _excerpt(line, n=60):
    text = line.decode(errors="replace")
    return repr(text if len(text) <= n else text[:n] + "...")


def read_metrics(path, split="train"):
    """The records of one split from a metrics.jsonl ("train" = records without a split key)."""
    return [r for _, r in read_lines(path) if r.get("split", "train") == split]

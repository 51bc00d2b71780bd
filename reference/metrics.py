"""metrics.jsonl: one JSON object per optimizer step (and per evaluation), written by rank 0."""
import json
import os


class MetricsLog:
    """Appends records to `out_dir/metrics.jsonl`; a no-op when out_dir is None or not rank 0.

    A fresh run starts the file empty. A resumed run keeps the records up to the step it resumed
    from and drops the later ones, which the run is about to redo."""

    def __init__(self, out_dir, is_main=True, truncate_after=None):
        self.file = None
        if out_dir is None or not is_main:
            return
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, "metrics.jsonl")
        kept = []
        if truncate_after is not None and os.path.exists(path):
            with open(path) as f:
                kept = [line for line in f if line.strip() and json.loads(line)["step"] <= truncate_after]
        self.file = open(path, "w")
        self.file.writelines(kept)
        self.file.flush()

    def write(self, record):
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self):
        if self.file is not None:
            self.file.close()
            self.file = None


def read_metrics(path, split="train"):
    """The records of one split from a metrics.jsonl ("train" = records without a split key)."""
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [r for r in records if r.get("split", "train") == split]

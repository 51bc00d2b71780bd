import importlib.util
import json
import os

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHAPTERS = {"01": "01_loop", "02": "02_amp", "03": "03_ddp", "04": "04_dpo", "05": "05_grpo"}
# chapters that branch off the line above (06 = 03 + FSDP2): load_chapter, the flag tests and
# reference.check (tests/reference/test_check.py) take them
BRANCHES = {"06": "06_fsdp"}

# Bitwise comparisons need the same thread count in every run of a test session.
torch.set_num_threads(2)


def load_chapter(nn):
    """Import tutorial/NN_*/train.py as a module (its folder name is not a valid package name)."""
    path = os.path.join(ROOT, "tutorial", {**CHAPTERS, **BRANCHES}[nn], "train.py")
    spec = importlib.util.spec_from_file_location(f"chapter_{nn}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_jsonl(path, split="train"):
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [r for r in records if r.get("split", "train") == split]


@pytest.fixture
def chapter():
    return load_chapter


def assert_identical_runs(a, b, phases=("",)):
    """Every record of each phase's metrics.jsonl (train and eval) equal bit for bit, as the
    strict reference.compare sees them: every step and key on both sides, tolerance 0."""
    from reference.compare import diff_files, format_report
    for phase in phases:
        report = diff_files(os.path.join(a, phase, "metrics.jsonl"),
                            os.path.join(b, phase, "metrics.jsonl"))
        assert report.identical, format_report(report)


# A tiny config that every chapter accepts: seconds, not minutes.
TINY = ["--max-steps", "30", "--batch-size", "32", "--eval-every", "10", "--eval-size", "100",
        "--n-embd", "32", "--n-layer", "1", "--seed", "0", "--device", "cpu"]

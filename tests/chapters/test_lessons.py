"""A chapter writes its own lesson: what it adds lives in its train.py, never imported from
`reference`. Chapters import only the bench (the task's data, the model) and plumbing that is
no chapter's lesson (device and dtype choice, the metrics log, the output folder's lock);
the weight-decay groups (01), the checkpoints (03), DPO's loss and log-probs (04) and GRPO's
math (05) are written in the chapter, so the parity tests compare two implementations."""
import ast
import os

import pytest

from conftest import CHAPTERS, ROOT

ALLOWED = {"reference.data", "reference.model", "reference.runtime", "reference.metrics",
           "reference.rundir"}
# what each chapter teaches, and where the reference keeps its own version of it
LESSONS = {"01": "reference.optimizer", "03": "reference.checkpoint", "04": "reference.dpo",
           "05": "reference.grpo"}


def reference_imports(nn):
    path = os.path.join(ROOT, "tutorial", CHAPTERS[nn], "train.py")
    with open(path) as f:
        tree = ast.parse(f.read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "reference":
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "reference"}
    return found


@pytest.mark.parametrize("nn", sorted(CHAPTERS))
def test_a_chapter_imports_only_the_bench_and_plumbing(nn):
    extra = reference_imports(nn) - ALLOWED
    lessons = sorted(f"{m} (chapter {n}'s lesson)" for n, m in LESSONS.items() if m in extra)
    assert not extra, (f"chapter {nn} imports {sorted(extra)} from reference {lessons}: write it "
                       "in the chapter instead")

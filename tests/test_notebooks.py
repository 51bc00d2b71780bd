"""The notebooks as files: every nbval marker is one nbval honours, every code cell was run and
saved with its output, no output holds this machine's paths, each notebook opens by saying how
long it takes, and the saved outputs hold the verdicts that the test modules leave to the
notebooks' runs. (nbval itself runs them: `pytest --nbval tutorial`.)"""
import collections
import glob
import json
import os
import re

import pytest

from conftest import ROOT

NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "tutorial", "*", "*.ipynb")))
# nbval 0.11 honours a marker only when the comment is exactly one of these
MARKERS = {"# NBVAL_IGNORE_OUTPUT", "# NBVAL_CHECK_OUTPUT", "# NBVAL_SKIP",
           "# NBVAL_RAISES_EXCEPTION"}


def code_cells(path):
    with open(path) as f:
        return [c for c in json.load(f)["cells"] if c["cell_type"] == "code"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_every_marker_is_one_nbval_honours(path):
    for cell in code_cells(path):
        for line in "".join(cell["source"]).splitlines():
            if "NBVAL" in line:
                assert line.strip() in MARKERS, f"{line!r}: nbval ignores this marker"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_every_code_cell_was_run_and_saved(path):
    for cell in code_cells(path):
        if "".join(cell["source"]).strip():
            assert cell["execution_count"] is not None, "".join(cell["source"])[:80]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_no_output_holds_this_machines_paths(path):
    with open(path) as f:
        text = f.read()
    for private in {ROOT, os.path.expanduser("~"), "/tmp/pytest-of-"}:
        assert private not in text, private


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_the_first_cell_says_how_long_the_notebook_takes(path):
    with open(path) as f:
        first = "".join(json.load(f)["cells"][0]["source"])
    assert re.search(r"\b\d+ (s|seconds|minutes?)\b", first), "state the run time on 2 cores"


# nbval checks that a run of a notebook reproduces its saved outputs; these are lines that the
# saved outputs must hold, so that a regression cannot be saved into a notebook by re-running it.
# The test modules leave these runs to the notebooks (tests/chapters/test_03_ddp.py and
# test_06_fsdp.py say which); a line listed twice must be printed twice.
VERDICTS = {
    "03_ddp.ipynb": [
        # section 6: SIGKILL, then --resume, against the uninterrupted run
        "steps in the resumed log: True",
        "identical: 100 train steps and 2 eval records match bit for bit",
        "final weights bitwise equal: True",
        # section 8: torchrun --max-restarts=1 after a worker's SIGKILL
        "exit code: 0",
        "a worker died of SIGKILL (exitcode -9): True",
        "torchrun restarted the worker group: True",
        "identical: 100 train steps and 2 eval records match bit for bit",
    ],
    "06_fsdp.ipynb": [
        # section 4: FSDP2 against chapter 03's DDP, torchrun 2 x 8
        "the same samples (target tokens at every step): True",
        "step 1's loss bitwise equal (the same weights, the same batch): True",
        "loss: within 1e-5 relative at every step: True",
        "grad_norm: within 1e-5 relative at every step: True",
        "final weights within 1e-5 of each tensor's norm: True",
        # section 7: the reference trainer's two-process run against the chapter's
        "identical: 20 train steps and 2 eval records match bit for bit",
    ],
}


@pytest.mark.parametrize("name", sorted(VERDICTS))
def test_the_saved_outputs_hold_the_notebooks_verdicts(name):
    path = next(p for p in NOTEBOOKS if os.path.basename(p) == name)
    printed = collections.Counter()
    for cell in code_cells(path):
        for output in cell.get("outputs", []):
            printed.update("".join(output.get("text", "")).splitlines())
    missing = collections.Counter(VERDICTS[name]) - printed
    assert not missing, f"{name} no longer prints: {sorted(missing)}"

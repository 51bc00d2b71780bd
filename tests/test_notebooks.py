"""The notebooks as files: every nbval marker is one nbval honours, every code cell was run and
saved with its output, no output holds this machine's paths, and each notebook opens by saying
how long it takes. (nbval itself runs them: `pytest --nbval tutorial`.)"""
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

"""Every chapter script and `python -m reference NN` take the same flags with the same defaults."""
import pytest

from conftest import load_chapter
from reference import chapters


@pytest.mark.parametrize("nn", ["02", "03"])
def test_chapter_defaults_match_reference_defaults(nn):
    ch = vars(load_chapter(nn).get_args([]))
    ref = vars(chapters.get_args(nn, []))
    for d in (ch, ref):
        d.pop("out")
        d.pop("crash_at_step", None)  # the chapter's fault-injection demo flag
    assert ch == ref

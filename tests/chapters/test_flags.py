"""Every chapter script and `python -m reference NN` take the same flags with the same defaults,
types and choices: reference/chapters/flags.py states them once per chapter level, and this
test holds each chapter script's own parser to that table."""
import argparse
from unittest import mock

import pytest

from conftest import BRANCHES, CHAPTERS, load_chapter
from reference.chapters import flags

EVERY = sorted({**CHAPTERS, **BRANCHES})


def chapter_parser(nn):
    """The ArgumentParser that tutorial/NN_*/train.py builds in get_args()."""
    seen, parse = [], argparse.ArgumentParser.parse_args

    def spy(self, *args, **kwargs):
        seen.append(self)
        return parse(self, *args, **kwargs)
    with mock.patch.object(argparse.ArgumentParser, "parse_args", spy):
        load_chapter(nn).get_args([])
    return seen[0]


def options(parser):
    """{flag: (kind of action, default, type, choices)} of every option but --help and --out
    (the chapter writes to runs/NN_name, the reference to runs/reference_NN)."""
    return {action.option_strings[-1]: (type(action).__name__, action.default, action.type,
                                        action.choices)
            for action in parser._actions
            if action.option_strings and action.dest not in ("help", "out")}


@pytest.mark.parametrize("nn", EVERY)
def test_chapter_flags_match_the_reference_table(nn):
    assert options(chapter_parser(nn)) == options(flags.parser(nn))


@pytest.mark.parametrize("nn", EVERY)
def test_parsed_defaults_match(nn):
    ch, ref = vars(load_chapter(nn).get_args([])), vars(flags.get_args(nn, []))
    ch.pop("out"), ref.pop("out")
    assert ch == ref


def test_each_level_only_adds_flags():
    """A flag keeps its name in every later chapter: a chapter takes its parent's flags, the
    chapter before it or, for a branch, the one it branches from (06 from 03)."""
    for nn in EVERY[1:]:
        parent = flags.PARENTS.get(nn, max(c for c in CHAPTERS if c < nn))
        assert set(options(flags.parser(parent))) <= set(options(flags.parser(nn))), nn


def test_a_branch_takes_none_of_the_chapters_it_skips():
    """Chapter 06 is 03 + FSDP2: none of 04's DPO or 05's GRPO flags, and two of its own."""
    added = set(options(flags.parser("06"))) - set(options(flags.parser("03")))
    assert added == {"--mixed-precision", "--activation-checkpointing"}
    assert flags.levels("06") == ["01", "02", "03", "06"]

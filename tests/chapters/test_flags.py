"""Every chapter script and `python -m reference NN` take the same flags with the same defaults,
types and choices: reference/chapters/flags.py states them once per chapter level, and this
test holds each chapter script's own parser to that table."""
import argparse
from unittest import mock

import pytest

from conftest import CHAPTERS, load_chapter
from reference.chapters import flags


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


@pytest.mark.parametrize("nn", sorted(CHAPTERS))
def test_chapter_flags_match_the_reference_table(nn):
    assert options(chapter_parser(nn)) == options(flags.parser(nn))


@pytest.mark.parametrize("nn", sorted(CHAPTERS))
def test_parsed_defaults_match(nn):
    ch, ref = vars(load_chapter(nn).get_args([])), vars(flags.get_args(nn, []))
    ch.pop("out"), ref.pop("out")
    assert ch == ref


def test_each_level_only_adds_flags():
    """A flag keeps its name in every later chapter."""
    for earlier, later in zip(sorted(CHAPTERS), sorted(CHAPTERS)[1:]):
        assert set(options(flags.parser(earlier))) <= set(options(flags.parser(later)))

"""`python -m reference.check NN PATH`: it passes every chapter's own train.py, catches every
known bug of the mutation suite (tests/scripts/check_mutants.py: small patches to a copy of a
chapter's train.py) and names the intended lesson for at least 80% of them, and it reports a
crash, a missing file, a wrong schema or missing flags as such (exit status 2).

Each run is a few tenths of a second: check forks them from one warm process, and the
reference's runs are made once per chapter and reused by every mutant of that chapter."""
import importlib.util
import os

import pytest

from conftest import BRANCHES, CHAPTERS, ROOT
from reference import check as checker

CHECKED = {**CHAPTERS, **BRANCHES}  # every chapter that check takes, 06 (03 + FSDP2) too

spec = importlib.util.spec_from_file_location(
    "check_mutants", os.path.join(ROOT, "tests", "scripts", "check_mutants.py"))
mutants = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mutants)

TIMEOUT = 180  # seconds per run: a tiny run takes one, a hang must not take the suite with it


def train_py(nn):
    return os.path.join(ROOT, "tutorial", CHECKED[nn], "train.py")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    yield str(tmp_path_factory.mktemp("check"))
    checker.close()


def patched(nn, old, new, folder, name):
    """A copy of chapter nn's train.py with one text patch, which must apply exactly once."""
    with open(train_py(nn)) as f:
        text = f.read()
    assert text.count(old) == 1, f"the patch's old text is in chapter {nn} {text.count(old)} times"
    path = os.path.join(folder, f"{name}.py")
    with open(path, "w") as f:
        f.write(text.replace(old, new))
    return path


@pytest.mark.parametrize("nn", sorted(CHECKED))
def test_check_passes_the_chapters_own_train_py(nn, work):
    result = checker.check(nn, train_py(nn), work=os.path.join(work, nn), timeout=TIMEOUT)
    assert result.status == 0, result.text
    assert result.verdict.endswith("matches the reference bit for bit"
                                   f" ({len(checker.stages(nn))} stage"
                                   f"{'s' if len(checker.stages(nn)) > 1 else ''})")
    assert [s.name for s in result.passed] == [s.name for s in checker.stages(nn)]


RESULTS = {}  # mutant index -> Result, shared by the per-mutant tests and the 80% test


def run_mutant(i, folder):
    if i not in RESULTS:
        path = mutants.apply(mutants.MUTANTS[i], folder)
        RESULTS[i] = checker.check(mutants.MUTANTS[i].chapter, path,
                                   work=os.path.join(folder, "work"), timeout=TIMEOUT)
    return RESULTS[i]


def test_the_mutation_suite_has_three_bugs_per_chapter_and_15_in_all():
    per_chapter = {nn: sum(m.chapter == nn for m in mutants.MUTANTS) for nn in CHECKED}
    assert all(n >= 3 for n in per_chapter.values()), per_chapter
    assert len(mutants.MUTANTS) >= 15
    assert {m.lesson for m in mutants.MUTANTS} <= set(checker.LESSONS)


@pytest.mark.parametrize("i", range(len(mutants.MUTANTS)),
                         ids=[f"{m.chapter}-{m.name[:40]}" for m in mutants.MUTANTS])
def test_check_catches_the_bug(i, work):
    result = run_mutant(i, work)
    assert result.status in (1, 2), result.text
    assert result.diagnosis is not None and result.diagnosis.lesson, result.text
    if result.status == 1:  # the rerun command is printed, with the step of the difference
        assert f"--max-step {result.report.first.step}" in result.text


def test_check_names_the_intended_lesson_for_80_percent_of_the_bugs(work):
    results = {i: run_mutant(i, work) for i in range(len(mutants.MUTANTS))}
    named = [i for i, r in results.items() if r.diagnosis.lesson == mutants.MUTANTS[i].lesson]
    table = "\n".join(f"{m.chapter} {m.name}: expected {m.lesson}, got "
                      f"{results[i].diagnosis.lesson}" for i, m in enumerate(mutants.MUTANTS))
    assert len(named) >= 0.8 * len(results), table


def test_chapter_06s_exercise_stops_at_a_todo_and_is_status_2(work):
    exercise = os.path.join(ROOT, "tutorial", CHECKED["06"], "exercise.py")
    result = checker.check("06", exercise, work=os.path.join(work, "exercise_06"),
                           timeout=TIMEOUT)
    assert result.status == 2, result.text
    assert "NotImplementedError: TODO 06." in result.text


def test_a_crash_is_status_2_with_the_scripts_stderr(work):
    path = patched("01", "        log.write(record)\n",
                   "        log.write(record)\n        if step == 3:\n"
                   "            raise RuntimeError('boom at step 3')\n", work, "crash")
    result = checker.check("01", path, work=os.path.join(work, "crash"), timeout=TIMEOUT)
    assert result.status == 2
    assert "exited with status 1" in result.problem
    assert "RuntimeError: boom at step 3" in result.text


def test_a_script_without_the_chapters_flags_is_status_2(work):
    result = checker.check("02", train_py("01"), work=os.path.join(work, "flags"),
                           timeout=TIMEOUT, only=["one micro-batch"])
    assert result.status == 2
    assert result.diagnosis.lesson == "flags"
    assert "unrecognized arguments: --grad-accum-steps" in result.text


@pytest.mark.parametrize("old, new, message", [
    ('"tokens": int(tokens), "loss_count": int(loss_count)}', '"tokens": int(tokens)}',
     "the train records of your metrics.jsonl lack 'loss_count'"),
    ("    write_atomic(os.path.join(args.out, \"summary.json\"),\n",
     "    if False:\n        write_atomic(os.path.join(args.out, \"summary.json\"),\n",
     "wrote no summary.json"),
    ('log = MetricsLog(args.out)', 'log = MetricsLog(os.path.join(args.out, "elsewhere"))',
     "wrote no metrics.jsonl"),
], ids=["a key missing", "no summary.json", "no metrics.jsonl"])
def test_missing_output_or_a_wrong_schema_is_status_2(old, new, message, work):
    path = patched("01", old, new, work, "schema")
    result = checker.check("01", path, work=os.path.join(work, "schema"), timeout=TIMEOUT)
    assert result.status == 2
    assert message in result.problem
    assert result.diagnosis.lesson == "schema"


def test_a_crash_demo_that_does_not_crash_is_status_2(work):
    path = patched("03", "            os.kill(os.getpid(), signal.SIGKILL)  # a hard crash",
                   "            pass  # a hard crash", work, "nocrash")
    result = checker.check("03", path, work=os.path.join(work, "nocrash"), timeout=TIMEOUT,
                           only=["kill and resume"])
    assert result.status == 2
    assert result.diagnosis.lesson == "crash"
    assert "finished instead of killing itself after step" in result.problem


def test_the_command_line_exits_1_and_prints_the_diagnosis(work, capsys):
    """`python -m reference.check 01 PATH`: its exit status and what it prints (main(), in this
    process; the next test starts the runs as their own processes)."""
    path = mutants.apply(mutants.MUTANTS[2], work)  # chapter 01: warmup off by one
    status = checker.main(["01", path, "--work", os.path.join(work, "cli")])
    printed = capsys.readouterr().out
    assert status == 1, printed
    assert "diagnosis: the learning-rate schedule's step offset (chapter 01)" in printed
    assert "python -m reference.compare" in printed and "--max-step 1" in printed


def test_spawned_torchrun_two_processes_match_like_the_forked_ones(work):
    """--spawn starts every run as its own process, as a learner would type it: here chapter
    03's two-process stage, under a real torchrun."""
    result = checker.check("03", train_py("03"), work=os.path.join(work, "torchrun"),
                           spawn=True, timeout=TIMEOUT, only=["two processes"])
    assert result.status == 0, result.text


def test_every_lesson_can_be_named_and_the_tables_print():
    from_rules = {r.lesson for r in checker.RULES} | {x for r in checker.RULES for x in r.also}
    from_problems = {"flags", "schema", "crash"}  # named by a run's missing output instead
    from_crashes = {c.lesson for c in checker.CRASHES}  # named by a crashed run's stderr
    assert set(checker.LESSONS) == from_rules | from_problems | from_crashes
    assert checker.lineage("06") == ("01", "02", "03", "06")
    for nn in CHECKED:
        text = checker.format_table(nn)
        # only the lessons of the chapters it stands on: 06 has 01-03's and its own, not 04-05's
        assert all(f"({c})" not in text for c in CHECKED if c not in checker.lineage(nn))
        assert f"({nn})" in text
    for lesson in checker.RETAUGHT["06"]:  # 06 names its own resume lessons
        assert all(r.lesson != lesson for r in checker.TABLES["06"])


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="--steps must be >= 4"):
        checker.stages("01", 3)
    with pytest.raises(ValueError, match="chapter must be one of"):
        checker.stages("07")
    with pytest.raises(FileNotFoundError, match="no script at"):
        checker.check("01", os.path.join(ROOT, "no_such_script.py"))

"""The exercises: tutorial/NN_*/exercise.py is chapter NN's train.py with the places of its lesson
left as TODOs, written by tutorial/make_exercises.py from the `# exercise` markers in train.py.
As shipped each one runs, stops at a TODO that names itself, and `reference.check` says so (exit
2); filled in with the chapter's blocks it is train.py again, and check passes."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT


def load_maker():
    spec = importlib.util.spec_from_file_location(
        "make_exercises", os.path.join(ROOT, "tutorial", "make_exercises.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


maker = load_maker()
CHAPTERS = maker.chapters()  # {"01": "01_loop", ...}: every tutorial/NN_*/train.py


def read(nn, name):
    with open(os.path.join(ROOT, "tutorial", CHAPTERS[nn], name)) as f:
        return f.read()


def test_the_committed_exercises_are_current():
    stale = [os.path.relpath(p, ROOT) for p in maker.stale()]
    assert not stale, f"{stale} differ from their train.py: run python tutorial/make_exercises.py"


def test_check_mode_catches_a_stale_exercise_and_writing_fixes_it(tmp_path, capsys):
    root = tmp_path / "tutorial"
    for folder in CHAPTERS.values():
        (root / folder).mkdir(parents=True)
        for name in ("train.py", "exercise.py"):
            shutil.copy(os.path.join(ROOT, "tutorial", folder, name), root / folder / name)
    assert maker.main(["--check", "--root", str(root)]) == 0
    train = root / CHAPTERS["01"] / "train.py"  # a line outside the TODOs changes
    text = train.read_text()
    train.write_text(text.replace('"--seed", type=int, default=0', '"--seed", type=int, default=1'))
    assert train.read_text() != text
    (root / CHAPTERS["02"] / "exercise.py").unlink()
    assert maker.main(["--check", "--root", str(root)]) == 1
    err = capsys.readouterr().err
    assert f"{CHAPTERS['01']}/exercise.py is out of date" in err
    assert f"{CHAPTERS['02']}/exercise.py is out of date" in err
    assert maker.main(["--root", str(root)]) == 0
    assert maker.main(["--check", "--root", str(root)]) == 0


@pytest.mark.parametrize("nn", sorted(CHAPTERS))
def test_filled_in_the_exercise_is_the_chapter(nn):
    """The round trip: each TODO replaced by the chapter's block gives train.py back exactly,
    and the exercise has one TODO per block, each listed in its header."""
    train, exercise = read(nn, "train.py"), read(nn, "exercise.py")
    names = [f"{nn}.{b.name}" for b in maker.find_blocks(train, nn)]
    assert names and sorted(maker.todos(exercise)) == sorted(names)
    head = exercise[:exercise.index('"""')]
    assert all(f"#     {name} " in head for name in names)
    assert f"python -m reference.check {nn} tutorial/{CHAPTERS[nn]}/exercise.py" in head
    assert maker.fill(exercise, train, nn) == train
    assert exercise != train


def test_every_marker_has_a_hint_and_every_hint_a_marker():
    used = {f"{nn}.{b.name}" for nn in CHAPTERS
            for b in maker.find_blocks(read(nn, "train.py"), nn)}
    assert used == set(maker.HINTS)


def test_the_three_marker_forms_and_what_is_not_a_marker():
    source = '''def f(x):  # exercise 07
    """Doc."""
    # a comment of the body
    return x + 1


def g(x):  # exercise 06
    """Another chapter's: left alone."""
    return x


def h(xs):
    y = [x for x in xs]  # exercise 07: y
    # exercise 07: pair
    z = y[0]
    w = z * 2
    # end exercise
    return w + len(y)
'''
    maker.HINTS.update({"07.f": "f", "07.y": "y", "07.pair": "p"})
    try:
        blocks = maker.find_blocks(source, "07")
        assert [(b.name, b.first, b.last, b.indent, b.function, b.sets) for b in blocks] == [
            ("f", 3, 4, 4, "f", ()), ("y", 13, 13, 4, "h", ("y",)),
            ("pair", 15, 16, 4, "h", ("w",))]
        exercise = maker.make_exercise(source, "07", "07_test")
        assert "return x + 1" not in exercise and "return x\n" in exercise
        assert maker.fill(exercise, source, "07") == source
        for bad, why in (("    y = 1  # exercise 07\n", "needs a name"),
                         ("    # exercise 07\n", "needs a name"),
                         ("    # exercise 07: a\n", "without its `# end exercise`"),
                         ("    # end exercise\n", "closes"),
                         ("    # exercise seven\n", "is not a marker")):
            with pytest.raises(ValueError, match=why):
                maker.find_blocks(f"def k():\n    x = 0\n{bad}    return x\n", "07")
    finally:
        for key in ("07.f", "07.y", "07.pair"):
            maker.HINTS.pop(key)


# the tiny flags each chapter's exercise runs with: flags of every kind it adds, a short SFT phase
TINY = ["--seed", "0", "--device", "cpu", "--digits", "1", "--eval-size", "36", "--n-layer", "1",
        "--n-embd", "32", "--batch-size", "8", "--max-steps", "4", "--eval-every", "2"]
EXTRA = {"02": ["--grad-accum-steps", "2", "--amp", "off"],
         "03": ["--grad-accum-steps", "2", "--save-every", "2"],
         "04": ["--save-every", "2", "--sft-steps", "2"],
         "05": ["--save-every", "2", "--sft-steps", "2", "--num-samples-per-prompt", "2"],
         "06": ["--save-every", "2"]}
RUN_ALL = """
import json, os, runpy, sys, traceback
out = {}
for nn, path, argv in json.loads(sys.argv[1]):
    sys.argv = [path] + argv
    try:
        runpy.run_path(path, run_name="__main__")
        out[nn] = "finished without stopping at a TODO"
    except NotImplementedError as err:
        out[nn] = str(err)
    except BaseException:
        out[nn] = "crashed before its first TODO:\\n" + traceback.format_exc()
print(json.dumps(out))
"""


def test_each_exercise_runs_and_stops_at_a_todo_that_names_itself(tmp_path):
    """Every exercise, as shipped, parses its chapter's flags, starts, and stops with the
    NotImplementedError of one of its own TODOs (one process runs them all: torch imports once)."""
    jobs = [(nn, os.path.join(ROOT, "tutorial", folder, "exercise.py"),
             TINY + EXTRA.get(nn, []) + ["--out", str(tmp_path / nn)])
            for nn, folder in sorted(CHAPTERS.items())]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join([ROOT] + [p for p in os.environ.get(
                   "PYTHONPATH", "").split(os.pathsep) if p]))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    done = subprocess.run([sys.executable, "-c", RUN_ALL, json.dumps(jobs)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    stopped = json.loads(done.stdout.strip().splitlines()[-1])
    for nn in CHAPTERS:
        names = {f"{nn}.{b.name}" for b in maker.find_blocks(read(nn, "train.py"), nn)}
        message = stopped[nn]
        assert message.startswith("TODO ") and message[5:].split(":")[0] in names, message
        assert len(message) > len("TODO 01.x: ") + 20, "a TODO says what to write"


def test_check_names_the_todo_and_passes_on_the_filled_in_exercise(tmp_path):
    """One chapter end to end through reference.check: the shipped exercise cannot be compared
    (exit 2) and the output shows the TODO; filled in, it matches the reference bit for bit."""
    from reference.check import check, close
    exercise = os.path.join(ROOT, "tutorial", CHAPTERS["01"], "exercise.py")
    filled = tmp_path / "filled.py"
    filled.write_text(maker.fill(read("01", "exercise.py"), read("01", "train.py"), "01"))
    try:
        shipped = check("01", exercise, work=str(tmp_path / "work"))
        assert shipped.status == 2, shipped.text
        assert "NotImplementedError: TODO 01." in shipped.text
        solved = check("01", str(filled), work=str(tmp_path / "work"))
        assert solved.status == 0, solved.text
    finally:
        close()

"""Does your trainer match the reference? Run it, run the reference, compare, name the lesson.

    python -m reference.check NN PATH [--steps K] [--work DIR] [--spawn]

PATH is a script that takes chapter NN's flags (tutorial/NN_*/train.py, an exercise.py, your
own). check runs it for a few short, fixed runs ("stages") that exercise every capability the
chapter adds, runs `python -m reference NN` with the same flags, and compares each pair of
metrics logs strictly (`reference.compare`, tolerance 0). Every run is fp32 on the CPU with one
thread (but for chapter 02's short fp16 stage: loss scaling is that chapter's lesson). Chapter
06, a branch off 03 (FSDP2), adds a run killed on two processes and resumed on one, compared
with the reference killed and resumed alike; its table names 01-03's lessons and its own.

It prints "matches the reference bit for bit" and exits 0, or the first difference with a
diagnosis and exits 1: the diagnosis is the entry of the chapter's table (`--table`) that the
difference fits (which key differs first, at which step, in which stage, and how), and it names
the lesson that is probably wrong and the function of the chapter's file to look at. A crash, a
missing output file or a wrong schema exits 2 and says what is missing (a crash whose stderr
fits an entry of the table's end names that lesson too).

The runs are kept in --work (default runs/check_NN): DIR/yours/<stage>/ and
DIR/reference/<stage>/, so the comparison can be rerun by hand with the command it prints.
Each run is forked from one process that imported torch once (Linux), which makes a run take
a fraction of a second instead of seconds; --spawn starts every run as its own
`python PATH ...` (and `torchrun` for two processes) instead.


From Python: `check(chapter, path)` returns a `Result` (status 0, 1 or 2, the stage and
`reference.compare` Report of the first difference, its `Diagnosis`, the printed text);
`stages(chapter)` the runs; `diagnose(...)` the table lookup; `TABLES` the tables.

This module runs the stages and reports; the rest is one concern a module: `lessons` (what a
diagnosis names), `stages` (the runs), `launch` (running a script in a child), `rules` (the
tables' entries) and `diagnose` (checking a run's output, the table lookup)."""
import argparse
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field

from ..compare import describe, diff_files, format_report, load
from .diagnose import (SUMMARY_KEYS, TABLES, Diagnosis, by_step, check_outputs, compared,
                       diagnose, format_table, scopes, table)
from .launch import (ROOT, ForkServer, Launch, Problem, can_fork, close, crash_message,
                     free_port, launch, quote, run_env, serve, tail)
from .lessons import CHAPTERS, LESSONS, PARENTS, RETAUGHT, TITLES, Lesson, lineage
from .rules import (CRASHES, DPO_REWARDS, GROUP_KEYS, REWARD_KEYS, RULES, SAMPLING_KEYS, Crash,
                    Facts, Rule, count_only, crash_entry, dpo_term, near)
from .stages import DEFAULT_STEPS, Stage, fsdp_stages, stages, train_size

__all__ = [  # what `from reference.check import ...` gave before it was split into modules
    "CHAPTERS", "DEFAULT_STEPS", "DPO_REWARDS", "Diagnosis", "Facts", "ForkServer", "GROUP_KEYS",
    "LESSONS", "Launch", "Lesson", "Problem", "REWARD_KEYS", "ROOT", "RULES", "Result", "Rule",
    "SAMPLING_KEYS", "SUMMARY_KEYS", "Stage", "TABLES", "TITLES", "by_step", "can_fork", "check",
    "check_outputs", "close", "compared", "count_only", "crash_message", "diagnose", "dpo_term",
    "format_table", "free_port", "launch", "main", "near", "quote", "reference_run", "remove",
    "run_env", "scopes", "serve", "stages", "table", "tail", "train_size", "your_run",
    # and since chapter 06, a branch: its lineage, its own resume lessons, crashes by stderr
    "CRASHES", "Crash", "PARENTS", "RETAUGHT", "crash_entry", "fsdp_stages", "lineage"]


# --- check -----------------------------------------------------------------------------------

@dataclass
class Result:
    """status 0: matches bit for bit; 1: a difference (stage, phase, report, diagnosis); 2: the
    run could not be compared (problem, and maybe a diagnosis)."""
    chapter: str
    path: str
    status: int
    verdict: str
    stage: object = None
    phase: str = ""
    report: object = None
    diagnosis: object = None
    problem: str = ""
    text: str = ""
    passed: list = field(default_factory=list)  # the stages that matched


_REFERENCE_RUNS = {}  # (chapter, nproc, flags, spawn) -> the folder of a finished reference run


def reference_run(chapter, stage, work, timeout, spawn, say):
    """The reference's uninterrupted run of `stage`'s flags, run once per process (for kind
    "reshard", its run killed and resumed as yours is)."""
    reshard = stage.kind == "reshard"
    key = (chapter, stage.nproc, tuple(stage.flags), spawn) + (
        (stage.crash_at, stage.resume_nproc, tuple(stage.resume_flags)) if reshard else ())
    done = _REFERENCE_RUNS.get(key)
    if done and all(os.path.exists(os.path.join(done, p, "metrics.jsonl")) for p in stage.phases):
        return done
    out = os.path.join(work, "reference", "two_processes" if stage.nproc > 1 and not reshard
                       else stage.slug)
    remove(out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    say(f"  the reference: python -m reference {chapter} ... ({stage.nproc} process"
        f"{'es' if stage.nproc > 1 else ''}" + (", killed, then resumed on "
                                                 f"{stage.resumed()[0]})" if reshard else ")"))
    nproc, argv = stage.nproc, stage.flags + ["--out", out]
    if reshard:
        first = launch(f"reference {chapter}", argv + ["--crash-at-step", str(stage.crash_at)],
                       out, nproc, timeout, spawn, "crash")
        if first.codes[-1] != -signal.SIGKILL or first.timed_out:
            p = crash_message(first, f"the reference's killed run ({first.command})", chapter)
            raise RuntimeError(f"{p} - a bug in `reference`, not in your script\n{p.stderr}")
        nproc, argv = stage.resumed()
        argv = argv + ["--out", out]
    run = launch(f"reference {chapter}", argv, out, nproc, timeout, spawn, "run")
    if any(run.codes) or run.timed_out:
        p = crash_message(run, f"the reference run ({run.command})", chapter)
        raise RuntimeError(f"{p} - a bug in `reference`, not in your script\n{p.stderr}")
    _REFERENCE_RUNS[key] = out
    return out


def remove(path):
    shutil.rmtree(path, ignore_errors=True)
    for name in os.listdir(os.path.dirname(path)) if os.path.isdir(os.path.dirname(path)) else []:
        if name.startswith(os.path.basename(path) + "."):
            os.remove(os.path.join(os.path.dirname(path), name))


def your_run(path, chapter, stage, work, timeout, spawn, say):
    """Your script's run(s) of `stage`: one attempt, or a killed one and a resumed one."""
    out = os.path.join(work, "yours", stage.slug)
    remove(out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    nproc, argv, commands = stage.nproc, stage.flags + ["--out", out], []
    if stage.crash_at is not None:
        first = launch(path, argv + ["--crash-at-step", str(stage.crash_at)], out, stage.nproc,
                       timeout, spawn, "crash")
        commands.append(first.command)
        if first.codes[-1] != -signal.SIGKILL:
            if first.codes[-1] == 0 and not first.timed_out:
                raise Problem(f"your run with --crash-at-step {stage.crash_at} finished instead "
                              f"of killing itself after step {stage.crash_at} "
                              f"({first.command})", "crash")
            raise crash_message(first, f"your run with --crash-at-step {stage.crash_at} "
                                f"({first.command})", chapter)
        if not os.path.isdir(os.path.join(out, "checkpoints")):
            raise Problem(f"your killed run left no {out}/checkpoints/ to resume from (with "
                          f"--save-every {stage.options['save_every']} it saves at step "
                          f"{stage.checkpoint})", "crash")
        nproc, argv = stage.resumed()
        argv = argv + ["--out", out]
    run = launch(path, argv, out, nproc, timeout, spawn, "run")
    commands.append(run.command)
    if any(run.codes) or run.timed_out:
        raise crash_message(run, f"your script ({run.command})", chapter)
    return out, commands


def check(chapter, path, steps=DEFAULT_STEPS, work=None, spawn=False, timeout=300, echo=None,
          only=None):
    """Run `path` and the reference through chapter `chapter`'s stages and compare them.
    Returns a Result; echo (e.g. print) receives the report line by line as it is made.
    only: names of the stages to run (default all), e.g. ["two processes"]."""
    lines = []

    def say(line=""):
        lines.append(line)
        if echo is not None:
            echo(line)

    chapter = f"{int(chapter):02d}" if str(chapter).isdigit() else str(chapter)
    plan = stages(chapter, steps)
    if only:
        unknown = sorted(set(only) - {s.name for s in plan})
        if unknown:
            raise ValueError(f"chapter {chapter} has no stage {unknown}; its stages: "
                             f"{', '.join(repr(s.name) for s in plan)}")
        plan = [s for s in plan if s.name in only]
    shown_path = os.path.relpath(os.path.abspath(path), ROOT) if \
        os.path.abspath(path).startswith(ROOT + os.sep) else os.path.abspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no script at {path}")
    path = os.path.abspath(path)
    work = os.path.abspath(work or os.path.join(ROOT, "runs", f"check_{chapter}"))
    os.makedirs(work, exist_ok=True)
    say(f"check: {shown_path} against chapter {chapter} ({TITLES[chapter]})")
    say(f"runs in {work}: fp32, 1 thread, the CPU; "
        + ("each run its own process" if spawn or not can_fork()
           else "each run forked from one process that imported torch once"))
    result = Result(chapter, shown_path, 0, "")

    def finish(status, verdict):
        result.status, result.verdict = status, verdict
        say(f"verdict: {verdict}")
        result.text = "\n".join(lines)
        return result

    for n, stage in enumerate(plan, 1):
        say(f"stage {n}/{len(plan)}, {stage.name}: {stage.what}")
        start = time.perf_counter()
        try:
            ref_out = reference_run(chapter, stage, work, timeout, spawn, say)
            say(f"  yours: {stage.name}")
            out, commands = your_run(path, chapter, stage, work, timeout, spawn, say)
            extra = check_outputs(out, stage, ref_out)
        except Problem as p:
            result.stage, result.problem = stage, str(p)
            say(f"  PROBLEM: {p}")
            if p.stderr:
                say(p.stderr)
            if p.lesson:
                lesson = LESSONS[p.lesson]
                result.diagnosis = Diagnosis(p.lesson, lesson.title, lesson.chapter,
                                             lesson.where, "the run's output", ())
                say(f"  look at (chapter {lesson.chapter}, {lesson.title}): {lesson.where}")
            return finish(2, f"{shown_path} could not be compared with the reference (stage "
                             f"{stage.name!r}): {p}")
        if extra:
            say(f"  not compared (the reference does not log them): {sorted(extra)}")
        for phase in stage.phases:
            a = os.path.join(out, phase, "metrics.jsonl")
            b = os.path.join(ref_out, phase, "metrics.jsonl")
            report = diff_files(a, b, ignore=sorted(extra))
            name = {"sft": "the SFT phase", "": "the second phase" if len(stage.phases) > 1
                    else "the run"}[phase]
            if report.identical:
                c = report.counts["A"]
                say(f"  {name}: {c.get('train', 0)} train steps and {c.get('eval', 0)} eval "
                    f"records match bit for bit ({time.perf_counter() - start:.1f} s)")
                continue
            mine, ref = by_step(load(a)), by_step(load(b))
            d = diagnose(chapter, stage, phase, report, mine, ref)
            result.stage, result.phase, result.report, result.diagnosis = stage, phase, report, d
            say(f"  {name}: DIFFERS")
            say("")
            say(format_report(report).replace(a, "yours").replace(b, "reference"))
            say("")
            how = compared(report.first)
            if d.lesson:
                say(f"diagnosis: {d.title} (chapter {d.chapter}), probably")
                say(f"  the table's entry: {d.when} (stage {stage.name!r}"
                    + (f", {name}" if len(stage.phases) > 1 else "") + ")")
                if how:
                    say(f"  how: {how}")
                others = sorted({x.key for x in report.differences if x.key not in (
                    None, report.first.key) and (x.split, x.step) == (report.first.split,
                                                                       report.first.step)})
                if others:
                    say(f"  also differing in that record: {', '.join(others)}")
                say(f"  look at: {d.where}")
                if d.also:
                    say("  less likely: " + "; ".join(LESSONS[x].title for x in d.also))
            else:
                say("diagnosis: no entry of the table fits; compare the first records by hand")
            say("rerun the comparison:")
            say(f"  python -m reference.compare {a} {b} --max-step {report.first.step}")
            say("rerun your run" + (" (killed, then resumed):" if len(commands) > 1 else ":"))
            for command in commands:
                say(f"  {command}")
            return finish(1, f"{shown_path} differs from the reference: {d.title or 'see above'}"
                             f" (stage {stage.name!r}, {describe(report.first, ('yours', 'ref'))})")
        result.passed.append(stage)
    return finish(0, f"{shown_path} matches the reference bit for bit ({len(plan)} stage"
                     f"{'s' if len(plan) > 1 else ''})")


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m reference.check",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("chapter", choices=list(CHAPTERS), help="the chapter whose flags PATH takes")
    p.add_argument("path", nargs="?", help="your script, e.g. tutorial/03_ddp/exercise.py")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                   help=f"optimizer steps of each run (of phase 2 in 04/05), default "
                        f"{DEFAULT_STEPS}, at least 4")
    p.add_argument("--work", default=None, help="folder for the runs (default runs/check_NN)")
    p.add_argument("--spawn", action="store_true",
                   help="start every run as its own process (python PATH, torchrun) instead of "
                        "forking it from a warm one")
    p.add_argument("--timeout", type=float, default=300, help="seconds per run (default 300)")
    p.add_argument("--stage", action="append", default=None, metavar="NAME",
                   help="run only this stage (repeatable), e.g. --stage 'two processes'")
    p.add_argument("--table", action="store_true", help="print the chapter's diagnosis table")
    args = p.parse_args(argv)
    if args.table:
        print(format_table(args.chapter))
        return 0
    if args.path is None:
        p.error("PATH is required (your script), e.g. tutorial/01_loop/train.py")
    if args.steps < 4:
        p.error("--steps must be >= 4")
    try:
        result = check(args.chapter, args.path, args.steps, args.work, args.spawn, args.timeout,
                       echo=print, only=args.stage)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        close()
    return result.status


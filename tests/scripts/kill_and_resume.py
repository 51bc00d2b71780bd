"""Fault injection: SIGKILL a chapter 03 run at seeded random moments, resume it until it ends,
and check that nothing was lost.

    python tests/scripts/kill_and_resume.py --target reference --kills 20 --seed 0 --work DIR

Each scenario starts a fresh run in its own folder and kills it; every `--resume` after that is
killed too, until the scenario has had its kills; then one last `--resume` finishes the run,
and one more resumes the finished run (which must end cleanly). A run is killed either by this
process, after a random delay, or by itself at a named point of the code (REFERENCE_FAULT=
point:n, see `reference.rundir.fault_point`): inside a save, right after a resume starts, while
metrics.jsonl is being rewritten, between the final checkpoint and summary.json. Afterwards
every scenario's folder must hold a metrics.jsonl bitwise equal to an uninterrupted run's
(every step present), the same final weights bit for bit, the same summary.json (but for its
timing), the same checkpoints, and no `.tmp*` leftover.

This process imports torch once, warms it up with a short run, and forks every run from
itself, so a run starts in milliseconds instead of seconds. It prints a JSON report on its last
line and exits 1 when a check failed. Add a target to TARGETS (and to the test's parametrize)
to run the same experiment against another script.
"""
import argparse
import json
import os
import random
import shutil
import signal
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

# the tiny experiment: 30 steps of 8 sequences, a save every 5 steps, an eval every 10
ARGS = ["--max-steps", "30", "--save-every", "5", "--batch-size", "8", "--n-embd", "32",
        "--n-layer", "1", "--eval-every", "10", "--eval-size", "50", "--amp", "off",
        "--device", "cpu", "--seed", "0"]
# where a run can kill itself, and how many times a point may be passed before it fires
POINTS = {"save": 3, "checksum": 3, "renamed": 3, "resume": 1, "metrics_rewrite": 1, "summary": 1}
FRESH_POINTS = ("save", "checksum", "renamed", "summary")  # a fresh run passes no resume point
KILLS_PER_SCENARIO = 5


def run_reference(argv):
    from reference import chapters
    chapters.run("03", argv)


def run_chapter03(argv):
    import importlib.util
    path = os.path.join(ROOT, "tutorial", "03_ddp", "train.py")
    spec = importlib.util.spec_from_file_location("chapter_03", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(argv)


# target -> (how to run it in-process, the fault points its code has)
TARGETS = {"reference": (run_reference, tuple(POINTS)),
           "chapter03": (run_chapter03, ())}


def run_child(fn, argv, kill, log):
    """Fork, run `fn(argv)` in the child with its output in `log`, and return its exit code
    (-9: SIGKILLed). `kill` is None, ("timer", seconds) or (point, n)."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 1
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            print(f"\n=== {' '.join(argv)} kill={kill}", flush=True)
            os.environ.pop("REFERENCE_FAULT", None)
            if kill is not None and kill[0] != "timer":
                os.environ["REFERENCE_FAULT"] = f"{kill[0]}:{kill[1]}"
            fn(argv)
            code = 0
        except BaseException:  # noqa: BLE001 - report anything, exit non-zero
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    start = time.monotonic()
    deadline = start + kill[1] if kill is not None and kill[0] == "timer" else None
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            os.kill(pid, signal.SIGKILL)
            deadline = None
        if now - start > 300:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return "timeout"
        time.sleep(0.002)


def leftovers(folder):
    """Every file or folder under `folder` whose name starts with .tmp."""
    found = []
    for parent, dirs, files in os.walk(folder):
        found += [os.path.join(parent, n) for n in dirs + files if n.startswith(".tmp")]
    return found


def final_weights(folder):
    import torch
    checkpoints = sorted(os.listdir(os.path.join(folder, "checkpoints")))
    state = os.path.join(folder, "checkpoints", checkpoints[-1], "state.pt")
    return checkpoints, torch.load(state, weights_only=True)["model"]


def summary_of(folder):
    with open(os.path.join(folder, "summary.json")) as f:
        summary = json.load(f)
    return {k: v for k, v in summary.items() if k not in ("train_seconds", "rebuilt_from_metrics")}


def check(folder, baseline):
    """What differs between `folder` and the uninterrupted run `baseline` (empty: nothing)."""
    import torch
    problems = []
    with open(os.path.join(folder, "metrics.jsonl"), "rb") as f:
        got = f.read()
    with open(os.path.join(baseline, "metrics.jsonl"), "rb") as f:
        want = f.read()
    if got != want:
        steps = [json.loads(line)["step"] for line in got.splitlines() if line.strip()]
        problems.append(f"metrics.jsonl differs from the uninterrupted run's (steps {steps})")
    if not os.path.exists(os.path.join(folder, "summary.json")):
        problems.append("no summary.json")
    elif summary_of(folder) != summary_of(baseline):
        problems.append(f"summary.json differs: {summary_of(folder)} != {summary_of(baseline)}")
    (names, weights), (want_names, want_weights) = final_weights(folder), final_weights(baseline)
    if names != want_names:
        problems.append(f"checkpoints {names} != {want_names}")
    if not all(torch.equal(weights[k], want_weights[k]) for k in want_weights):
        problems.append("the final weights differ")
    if leftovers(folder):
        problems.append(f"leftovers: {leftovers(folder)}")
    return problems


def choose_kill(rng, points, resuming, plan, seconds):
    """The next kill: the points not yet tried first (so each fires), then seeded random ones;
    a timer for a target without points, and for a third of the runs of one with them."""
    usable = [p for p in points if resuming or p in FRESH_POINTS]
    for p in plan:
        if p in usable:
            plan.remove(p)
            return p, 1
    if not usable or rng.random() < 1 / 3:
        # half of a resumed run's timers fall in its first 30%: the resume and the log rewrite
        early = resuming and rng.random() < 0.5
        return "timer", round(rng.uniform(0.0, seconds * (0.3 if early else 1.0)), 3)
    p = rng.choice(usable)
    return p, rng.randint(1, POINTS[p])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", default="reference", choices=sorted(TARGETS))
    p.add_argument("--kills", type=int, default=20, help="stop once this many runs were killed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", required=True, help="a folder for the runs (emptied first)")
    args = p.parse_args(argv)
    import torch
    torch.set_num_threads(1)  # every run the same: bitwise comparisons need one thread count
    fn, points = TARGETS[args.target]
    shutil.rmtree(args.work, ignore_errors=True)
    os.makedirs(args.work)
    log = os.path.join(args.work, "runs.log")
    started = time.monotonic()

    # warm up once (a forked run then starts warm): train, evaluate and save, 3 steps
    fn(ARGS + ["--max-steps", "3", "--save-every", "1", "--eval-every", "2",
               "--out", os.path.join(args.work, "warmup")])
    shutil.rmtree(os.path.join(args.work, "warmup"))
    baseline = os.path.join(args.work, "baseline")
    t = time.monotonic()
    rc = run_child(fn, ARGS + ["--out", baseline], None, log)
    seconds = time.monotonic() - t
    if rc != 0:
        sys.exit(f"the uninterrupted run failed ({rc}); see {log}")

    rng, plan = random.Random(args.seed), list(points)
    report = {"target": args.target, "kills": 0, "runs": 1, "fired": {}, "scenarios": [],
              "failures": [], "baseline_seconds": round(seconds, 2)}
    while report["kills"] < args.kills and not report["failures"]:
        out = os.path.join(args.work, f"scenario_{len(report['scenarios'])}")
        runs, resuming, killed = [], False, 0
        while True:
            kill = None
            if killed < KILLS_PER_SCENARIO and report["kills"] < args.kills:
                kill = choose_kill(rng, points, resuming, plan, seconds)
            argv = ARGS + ["--out", out] + (["--resume"] if resuming else [])
            rc = run_child(fn, argv, kill, log)
            report["runs"] += 1
            runs.append([kill, rc])
            if rc == -signal.SIGKILL:
                killed += 1
                report["kills"] += 1
                name = kill[0] if kill else "?"
                report["fired"][name] = report["fired"].get(name, 0) + 1
                resuming = True
                continue
            if rc != 0:
                report["failures"].append(f"{out}: run {argv} kill={kill} exited {rc}; see {log}")
            break
        if not report["failures"]:  # a finished run, resumed, ends cleanly
            rc = run_child(fn, ARGS + ["--out", out, "--resume"], None, log)
            report["runs"] += 1
            runs.append([None, rc])
            if rc != 0:
                report["failures"].append(f"{out}: resuming the finished run exited {rc}")
        if not report["failures"]:
            report["failures"] += [f"{out}: {problem}" for problem in check(out, baseline)]
        report["scenarios"].append({"folder": out, "runs": runs})
    report["seconds"] = round(time.monotonic() - started, 1)
    print(json.dumps(report))
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())

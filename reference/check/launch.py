"""Running a script for `reference.check`: `launch` runs your script or `python -m reference
NN` on one or two processes, forked from one warm process that imported torch once (`serve`,
started on first use, stopped by `close`) or spawned as `python PATH` / `torchrun`, in the
environment of every check run (`run_env`: one thread, the CPU); `crash_message` turns a run
that crashed, hung or rejected the chapter's flags into a `Problem` with the end of its stderr
(and the lesson of the `rules.CRASHES` entry that its stderr fits)."""
import atexit
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from typing import NamedTuple

from .rules import crash_entry

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# --- Running a script: forked from a warm process, or spawned -------------------------------

def run_env():
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in env.get("PYTHONPATH", "").split(
        os.pathsep) if p])
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                 "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT", "CUDA_VISIBLE_DEVICES"):
        env.pop(name, None)
    env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU, as --device cpu says; no CUDA init either
    return env


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(job, env):
    """In a forked child: become `python SCRIPT ARGS` (or `python -m MODULE ARGS`) and exit."""
    code = 1
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        for fd, path in ((1, job["stdout"]), (2, job["stderr"])):
            f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(f, fd)
            os.close(f)
        os.environ.clear()
        os.environ.update(env)
        sys.argv = list(job["argv"])
        import runpy
        if job.get("script"):
            sys.path[0] = os.path.dirname(os.path.abspath(job["script"]))
            runpy.run_path(job["script"], run_name="__main__")
        else:
            runpy.run_module(job["module"], run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - the learner's script may raise anything
        traceback.print_exc()
    try:
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def serve():
    """The warm process: import torch and the bench once, then fork one child per run.

    Reads one JSON request a line ({"jobs": [...], "env": {...}, "timeout": s}), forks every
    job, waits (a rank that fails leaves the others 3 seconds, as torchrun would not wait
    forever either) and answers {"codes": [...], "timed_out": bool}. Nothing here runs a torch
    op, so the children start with no thread pool to inherit."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the runs; the parent stops us
    import torch
    import torch._dynamo  # noqa: F401 - torch.optim imports it on first use: seconds, per run
    import torch.distributed  # noqa: F401
    import torch.distributed.checkpoint  # noqa: F401 - chapter 06's DCP: 0.2 s a run otherwise
    import torch.nn.parallel  # noqa: F401
    import tqdm  # noqa: F401
    import reference.chapters  # noqa: F401
    torch.set_num_threads(1)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        pids = []
        for job in request["jobs"]:
            pid = os.fork()
            if pid == 0:
                _child(job, {**request["env"], **job.get("env", {})})
            pids.append(pid)
        codes, deadline, grace, timed_out = {}, time.time() + request["timeout"], None, False
        while len(codes) < len(pids):
            for pid in pids:
                if pid not in codes:
                    done, status = os.waitpid(pid, os.WNOHANG)
                    if done:
                        codes[pid] = os.waitstatus_to_exitcode(status)
                        if codes[pid] != 0 and grace is None:
                            grace = time.time() + 3
            now = time.time()
            if now > deadline or (grace is not None and now > grace):
                timed_out = timed_out or now > deadline
                for pid in pids:
                    if pid not in codes:
                        os.kill(pid, signal.SIGKILL)
                        codes[pid] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
            time.sleep(0.005)
        print(json.dumps({"codes": [codes[p] for p in pids], "timed_out": timed_out}),
              flush=True)


class ForkServer:
    """One warm `serve()` process, started on first use and stopped by `close()`."""

    def __init__(self):
        self.proc = None
        self.log = None

    def start(self):
        self.log = tempfile.NamedTemporaryFile("w+", prefix="check_server_", suffix=".log")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from reference.check.launch import serve; serve()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
            cwd=ROOT, env=run_env())
        if not self.proc.stdout.readline():
            self.log.seek(0)
            raise RuntimeError(f"the check's runner process failed to start:\n{self.log.read()}")

    def run(self, jobs, env, timeout):
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        self.proc.stdin.write(json.dumps({"jobs": jobs, "env": env, "timeout": timeout}) + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        if not answer:
            self.log.seek(0)
            raise RuntimeError(f"the check's runner process died:\n{self.log.read()[-3000:]}")
        answer = json.loads(answer)
        return answer["codes"], answer["timed_out"]

    def close(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if self.log is not None:
            self.log.close()
            self.log = None


_SERVER = ForkServer()
atexit.register(_SERVER.close)


def close():
    """Stop the warm runner process (it starts again on the next check)."""
    _SERVER.close()


class Launch(NamedTuple):
    """What one attempt ran: the command a person would type, its exit codes and its logs."""
    command: str
    codes: list
    timed_out: bool
    logs: list  # [(stdout path, stderr path)] per rank


def can_fork():
    return sys.platform.startswith("linux") and hasattr(os, "fork")


def launch(target, argv, out_dir, nproc, timeout, spawn, tag):
    """Run `target` (a script path, or "reference NN") with argv on nproc processes; the logs
    go next to out_dir as <out_dir>.<tag>.rank<r>.{out,err}."""
    is_ref = target.startswith("reference ")
    chapter = target.split()[1] if is_ref else None
    logs = [(f"{out_dir}.{tag}.rank{r}.out", f"{out_dir}.{tag}.rank{r}.err") for r in range(nproc)]
    head = ["-m", "reference", chapter] if is_ref else [target]
    shown = " ".join(([f"torchrun --standalone --nproc_per_node={nproc}"] if nproc > 1
                      else ["python"]) + head + [quote(a) for a in argv])
    env = run_env()
    if spawn or not can_fork():
        cmd = [sys.executable] + (["-m", "torch.distributed.run", "--standalone",
                                   f"--nproc_per_node={nproc}"] if nproc > 1 else []) + head + argv
        with open(logs[0][0], "w") as out, open(logs[0][1], "w") as err:
            # its own session: a timeout kills torchrun's workers too, not only torchrun
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=err,
                                    start_new_session=True)
            try:
                code, timed_out = proc.wait(timeout=timeout), False
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                code, timed_out = -signal.SIGKILL, True
        for out, err in logs[1:]:
            open(out, "w").close()
            open(err, "w").close()
        return Launch(shown, torchrun_codes(code, nproc, logs[0][1]), timed_out, logs[:1])
    jobs = []
    for rank in range(nproc):
        job = {"argv": (["-m reference"] + head[2:] if is_ref else [target]) + argv,
               "stdout": logs[rank][0], "stderr": logs[rank][1],
               "env": {"RANK": str(rank), "LOCAL_RANK": str(rank)} if nproc > 1 else {}}
        job["module" if is_ref else "script"] = "reference" if is_ref else target
        jobs.append(job)
    if nproc > 1:
        env.update(WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(free_port()), GROUP_RANK="0", TORCHELASTIC_RESTART_COUNT="0")
    codes, timed_out = _SERVER.run(jobs, env, timeout)
    return Launch(shown, codes, timed_out, logs)


def torchrun_codes(code, nproc, stderr):
    """Per-rank exit codes of a spawned run: torchrun exits 1 when a worker fails, and says in
    its stderr which rank failed first and how (e.g. SIGKILLed by --crash-at-step)."""
    if nproc == 1 or code == 0:
        return [code] * nproc
    first = re.search(r"failed \(exitcode: (-?\d+)\) local_rank: (\d+)", tail(stderr, None))
    codes = [code] * nproc
    if first and int(first.group(2)) < nproc:
        codes[int(first.group(2))] = int(first.group(1))
    return codes


def quote(arg):
    return arg if arg and all(c.isalnum() or c in "-_./=+:," for c in arg) else repr(arg)


# --- A run that failed ---------------------------------------------------------------------

class Problem(Exception):
    """Your run cannot be compared: it crashed, or wrote no or wrong output (exit status 2)."""

    def __init__(self, message, lesson=None, stderr=""):
        super().__init__(message)
        self.lesson = lesson
        self.stderr = stderr


def tail(path, lines=25):
    try:
        with open(path, errors="replace") as f:
            text = f.read()
    except OSError:
        return ""
    return text if lines is None else "\n".join(text.rstrip().splitlines()[-lines:])


def crash_message(launch, what, chapter):
    """A Problem that says how `launch` failed, with the end of its stderr."""
    errs = [(r, tail(err)) for r, (_, err) in enumerate(launch.logs)]
    stderr = "\n".join(f"--- rank {r} stderr (last lines) ---\n{t}" if len(errs) > 1 else t
                       for r, t in errs if t)
    if launch.timed_out:
        return Problem(f"{what} did not finish in time (a hang? with two processes, a collective "
                       "that one rank never reaches)", stderr=stderr)
    bad = [c for c in launch.codes if c != 0]
    code = bad[0] if bad else launch.codes[0]
    how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
    if "unrecognized arguments" in stderr or "invalid choice" in stderr or \
            "expected one argument" in stderr:
        return Problem(f"{what} {how}: it does not take chapter {chapter}'s flags (see "
                       f"`python -m reference {chapter} --help` for the list)", "flags", stderr)
    crash = crash_entry(chapter, [tail(err, None) for _, err in launch.logs])
    if crash:
        return Problem(f"{what} {how}: {crash.when}", crash.lesson, stderr)
    return Problem(f"{what} {how}", None, stderr)

"""reference/examples/: the basic example runs and resumes; the distributed one trains the same
run on 1 and 2 processes (global batch), on two nodes as with --standalone, and survives a
killed worker; every command in the examples README is run here or by the bench, whose
results table the README quotes."""
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, read_jsonl

EXAMPLES = os.path.join(ROOT, "reference", "examples")
SCRIPT = os.path.join(EXAMPLES, "distributed_train_example.py")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
# 20 steps of 64 sequences; the two-process runs split each step as 2 processes x 2 x 16
ARGS = ["--max-steps", "20", "--global-batch-size", "64", "--eval-every", "100"]


def env(threads="1", **extra):
    """threads=None leaves OMP_NUM_THREADS unset, as in a user's shell."""
    e = dict(os.environ, PYTHONPATH=ROOT, TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1", **extra)
    e.pop("OMP_NUM_THREADS", None)
    if threads:
        e["OMP_NUM_THREADS"] = threads
    return e


def load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def losses(out):
    return [r["loss"] for r in read_jsonl(os.path.join(out, "metrics.jsonl"))]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def one_thread():
    """In-process runs on one thread, like the subprocesses: two threads on a busy 2-core
    machine wait on each other. The session's count comes back afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_basic_example_runs_and_resumes(tmp_path, capsys, one_thread):
    basic = load(os.path.join(EXAMPLES, "basic_trainer_example.py"), "basic_trainer_example")
    args = ["--out", str(tmp_path), "--max-steps", "20"]
    basic.main(args)
    assert len(read_jsonl(tmp_path / "metrics.jsonl")) == 20
    capsys.readouterr()
    basic.main(args[:-1] + ["30", "--resume"])
    assert "resumed from" in capsys.readouterr().out
    assert [x["step"] for x in read_jsonl(tmp_path / "metrics.jsonl")] == list(range(1, 31))


def test_every_step_is_the_same_global_batch_on_any_world_size():
    """The ranks' micro-batches of one optimizer step are, together, one process's step."""
    example = load(SCRIPT, "distributed_train_example")
    dataset = list(range(1000))
    global_batch, steps = 64, 1000 // 64

    def step_sets(world_size, micro):
        accum = global_batch // world_size // micro
        per_step = [set() for _ in range(steps)]
        for rank in range(world_size):
            sampler = example.GlobalBatchSampler(dataset, global_batch, world_size, rank)
            sampler.set_epoch(3)
            order = list(sampler)
            assert len(order) == len(sampler) == steps * accum * micro  # the tail waits
            for i in range(0, len(order), micro):
                per_step[i // (micro * accum)].update(order[i:i + micro])
        return per_step

    one = step_sets(1, 64)
    assert all(len(s) == global_batch for s in one)
    assert step_sets(2, 32) == step_sets(4, 8) == step_sets(4, 16) == step_sets(1, 16) == one


def test_batch_layout_errors_name_the_flag_and_the_fix():
    layout = load(SCRIPT, "distributed_train_example").batch_layout
    assert layout(256, None, 2, 9500) == (128, 128, 1)
    assert layout(256, 32, 2, 9500) == (128, 32, 4)
    with pytest.raises(ValueError, match="--global-batch-size 256 does not split evenly over 3 "
                                         "processes; use a multiple of 3, such as 255"):
        layout(256, None, 3, 9500)
    with pytest.raises(ValueError, match=r"--micro-batch-size 48 must divide .* use one of "
                                         r"\[1, 2, 4, 8, 16, 32, 64, 128\]"):
        layout(256, 48, 2, 9500)
    with pytest.raises(ValueError, match="--global-batch-size must be between 1 and the 9500"):
        layout(20000, None, 1, 9500)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """The seed's command, `--batch-size` included, with OMP_NUM_THREADS unset: torchrun sets
    it to 1 because --nproc_per_node > 1."""
    out = str(tmp_path_factory.mktemp("two") / "run")
    cmd = TORCHRUN + ["--standalone", "--nproc_per_node=2", SCRIPT, *ARGS, "--batch-size", "16"]
    r = subprocess.run(cmd + ["--out", out], env=env(threads=None), capture_output=True,
                       text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "global batch 64 = 2 process(es) x 2 micro-batch(es) x 16 sequences" in r.stdout
    assert "2 process(es), step 20" in r.stdout
    return out


def test_one_and_two_processes_train_the_same_run(two_processes, tmp_path, capsys,
                                                  one_thread):
    out = str(tmp_path / "one")
    load(SCRIPT, "distributed_train_example").main([*ARGS, "--out", out])  # in-process
    assert "global batch 64 = 1 process(es) x 1 micro-batch(es) x 64" in capsys.readouterr().out
    one, two = losses(out), losses(two_processes)
    assert len(one) == len(two) == 20  # rank 0 alone writes the log
    torch.testing.assert_close(torch.tensor(two), torch.tensor(one), rtol=1e-5, atol=0)
    tokens = [[r["tokens"] for r in read_jsonl(os.path.join(d, "metrics.jsonl"))]
              for d in (out, two_processes)]
    assert tokens[0] == tokens[1]  # the same sequences in every step


def test_two_nodes_on_loopback_equal_standalone(two_processes, tmp_path):
    """The README's two-machine lines with --master_addr=127.0.0.1, OMP_NUM_THREADS unset (so
    torchrun leaves the threads to the script): the same run as --standalone, bit for bit."""
    out, port = str(tmp_path / "run"), free_port()
    nodes = [subprocess.Popen(
        TORCHRUN + ["--nnodes=2", "--nproc_per_node=1", f"--node_rank={rank}",
                    "--master_addr=127.0.0.1", f"--master_port={port}", SCRIPT, *ARGS,
                    "--batch-size", "16", "--out", out],
        env=env(threads=None), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for rank in (0, 1)]
    results = [node.communicate(timeout=180) for node in nodes]
    assert all(n.returncode == 0 for n in nodes), results[0][1][-2000:] + results[1][1][-2000:]
    assert "1 thread(s) each" in results[0][0]
    assert losses(out) == losses(two_processes)


def workers(pid):
    """The example processes torchrun `pid` started."""
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        children = [int(c) for c in f.read().split()]
    found = []
    for child in children:
        try:
            with open(f"/proc/{child}/cmdline", "rb") as f:
                if b"distributed_train_example.py" in f.read():
                    found.append(child)
        except FileNotFoundError:
            pass
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the workers in /proc")
def test_torchrun_restarts_a_killed_worker_and_resumes(two_processes, tmp_path):
    """The README's --max-restarts command: a worker is SIGKILLed after the step-10 checkpoint;
    torchrun restarts both, they resume, and the run ends as the uninterrupted one did. An
    evaluation every step slows the run down, so the kill lands before the end."""
    out = str(tmp_path / "run")
    proc = subprocess.Popen(
        TORCHRUN + ["--standalone", "--nproc_per_node=2", "--max-restarts=1", SCRIPT, "--resume",
                    *ARGS, "--batch-size", "16", "--eval-every", "1", "--save-every", "10",
                    "--out", out],
        env=env(threads=None), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    checkpoint = os.path.join(out, "checkpoints", "step_000010")
    deadline = time.monotonic() + 120
    while not os.path.isdir(checkpoint) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not os.path.isdir(os.path.join(out, "checkpoints", "step_000020")), "killed too late"
    os.kill(workers(proc.pid)[-1], signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 0, stderr[-3000:]
    assert "resumed from" in stdout and "step_000010" in stdout
    assert losses(out) == losses(two_processes)


def test_every_readme_command_is_run_by_a_test_or_the_bench():
    """The commands of the README's code blocks, each matched to what runs it."""
    bench = load(os.path.join(ROOT, "benchmarks", "examples.py"), "bench_examples")
    with open(os.path.join(EXAMPLES, "README.md")) as f:
        blocks = re.findall(r"```bash\n(.*?)```", f.read(), re.S)
    commands = []
    for line in "\n".join(blocks).replace("\\\n", " ").splitlines():
        line = " ".join(line.split("#")[0].split())
        if line:
            commands.append(line)
    base = "reference/examples/basic_trainer_example.py --out runs/example_basic"
    bench_commands = {command for _, command, _ in bench.RUNS}
    node = ("torchrun --nnodes=2 --nproc_per_node=1 --node_rank={} --master_addr=10.0.0.1 "
            "--master_port=29500 ")
    covered = bench_commands | {
        f"python {base}",  # the bench runs it with --out runs/bench/examples/basic
        f"python {base} --resume",  # test_basic_example_runs_and_resumes
        # the two-node form: the bench and test_two_nodes_on_loopback_equal_standalone, on 127.0.0.1
        node.format(0) + bench.DISTRIBUTED, node.format(1) + bench.DISTRIBUTED,
        # test_torchrun_restarts_a_killed_worker_and_resumes
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --standalone --nproc_per_node=2 "
        "--max-restarts=1 " + bench.DISTRIBUTED + " --resume"}
    assert commands and [c for c in commands if c not in covered] == []


def test_readme_table_is_examples_results_json():
    bench = load(os.path.join(ROOT, "benchmarks", "examples.py"), "bench_examples")
    with open(bench.RESULTS) as f:
        results = json.load(f)
    with open(bench.README) as f:
        text = f.read()
    start, end = bench.MARKERS
    assert text.count(start) == 1 and text.count(end) == 1, f"needs one {start} ... {end} block"
    block = text.split(start)[1].split(end)[0].strip()
    assert block == bench.readme_table(results), \
        "run `python benchmarks/examples.py --update-readme`"
    for name, _, _ in bench.RUNS:  # what the examples promise, as measured at their defaults
        assert results[f"example_{name}_exact_match"] >= 0.99, name
        if name != bench.REFERENCE:  # the same losses as one process, at least at first
            assert results[f"example_{name}_equal_steps"] >= 20, name
    assert results["example_basic_seconds"] <= 60
    assert results["example_distributed_x1_seconds"] <= 60
    assert results["example_distributed_2nodes_equals_x2"]

"""reference/examples/ at their defaults, as a new user runs them: exact match and wall time.

    python benchmarks/examples.py                  # run every command (about 5 minutes, 2 cores)
    python benchmarks/examples.py --update-readme  # only write the table of examples_results.json

Runs the basic example in one process and the distributed one with 1, 2 and 4 processes
(--standalone) and as two "nodes" of one process on loopback, each with the README's command
and no flag but --out, in a user's environment (OMP_NUM_THREADS unset). Writes
benchmarks/examples_results.json and the results table of reference/examples/README.md;
`make bench` calls bench_and_record(). Every run trains on the same global batches, so each
one's losses are compared, step by step, with the one-process run's.
"""
import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join("reference", "examples")
README = os.path.join(ROOT, EXAMPLES, "README.md")
RESULTS = os.path.join(ROOT, "benchmarks", "examples_results.json")
MARKERS = ("<!-- examples:start -->", "<!-- examples:end -->")
BASIC = f"{EXAMPLES}/basic_trainer_example.py"
DISTRIBUTED = f"{EXAMPLES}/distributed_train_example.py"
TORCHRUN = "torchrun --standalone --nproc_per_node={n} " + DISTRIBUTED
NODE = ("torchrun --nnodes=2 --nproc_per_node=1 --node_rank={rank} --master_addr=127.0.0.1 "
        "--master_port={port} " + DISTRIBUTED)

# (name, the command as the README writes it, processes); each run's figures are
# example_<name>_seconds (wall time), example_<name>_exact_match and example_<name>_eval_loss
# (the last evaluation), and but for the reference run, example_<name>_equal_steps: how many
# steps, from the first, log the reference run's loss to 1e-5 relative
RUNS = [
    ("basic", f"python {BASIC}", 1),
    ("distributed_x1", f"python {DISTRIBUTED}", 1),
    ("distributed_x2", TORCHRUN.format(n=2), 2),
    ("distributed_x4", TORCHRUN.format(n=4), 4),
    ("distributed_2nodes", NODE.format(rank="0|1", port=29500), 2),
]
REFERENCE = "distributed_x1"
RTOL = 1e-5


def argv_of(command):
    """A README command as an argv for this interpreter (`torchrun` is torch.distributed.run)."""
    words = command.split()
    head = {"python": [sys.executable], "torchrun": [sys.executable, "-m", "torch.distributed.run"]}
    return head[words[0]] + [os.path.join(ROOT, w) if w.endswith(".py") else w for w in words[1:]]


def user_env():
    """The environment of a user's shell: no OMP_NUM_THREADS (torchrun sets it, or not, itself)."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_commands(commands, out, timeout=900):
    """Start `commands` at once (the two nodes) with --out `out`; wall seconds until all end."""
    start = time.perf_counter()
    procs = [subprocess.Popen(argv_of(c) + ["--out", out], env=user_env(), cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for c in commands]
    outputs = [p.communicate(timeout=timeout) for p in procs]
    seconds = time.perf_counter() - start
    for c, p, (stdout, stderr) in zip(commands, procs, outputs):
        if p.returncode != 0:
            raise RuntimeError(f"`{c}` failed with exit status {p.returncode}:\n{stderr[-3000:]}")
    return seconds


def read_log(out):
    """(every step's loss, the last evaluation) of a run's metrics.jsonl."""
    with open(os.path.join(out, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    evals = [r for r in records if r.get("split") == "eval"]
    return [r["loss"] for r in records if "split" not in r], evals[-1]


def equal_steps(losses, reference, rtol=RTOL):
    """How many steps, from the first, have the reference's loss to `rtol` relative."""
    if len(losses) != len(reference):
        raise RuntimeError(f"{len(losses)} logged steps against the reference's {len(reference)}")
    for i, (a, b) in enumerate(zip(losses, reference)):
        if abs(a - b) > rtol * abs(b):
            return i
    return len(losses)


def bench_examples(out_root=None):
    """Run every command of RUNS; returns the example_* figures."""
    out_root = out_root or os.path.join(ROOT, "runs", "bench", "examples")
    results, losses = {}, {}
    for name, command, _ in RUNS:
        out = os.path.join(out_root, name)
        if name == "distributed_2nodes":
            port = free_port()
            commands = [NODE.format(rank=rank, port=port) for rank in (0, 1)]
        else:
            commands = [command]
        results[f"example_{name}_seconds"] = run_commands(commands, out)
        losses[name], last = read_log(out)
        results[f"example_{name}_exact_match"] = last["accuracy"]
        results[f"example_{name}_eval_loss"] = last["loss"]
        print(f"{name:20s} exact match {last['accuracy']:.3f} in "
              f"{results[f'example_{name}_seconds']:.1f} s", flush=True)
    for name, _, _ in RUNS:
        if name != REFERENCE:
            results[f"example_{name}_equal_steps"] = equal_steps(losses[name], losses[REFERENCE])
    # two nodes and --standalone with the same world size: the same run, to the bit
    results["example_distributed_2nodes_equals_x2"] = (losses["distributed_2nodes"]
                                                       == losses["distributed_x2"])
    results["example_steps"] = len(losses[REFERENCE])
    return results


def readme_table(results):
    """The examples README's results table, rendered from example_* figures."""
    steps = results["example_steps"]
    rows = [f"Measured by `python benchmarks/examples.py` on {results['example_machine']}.",
            "",
            "| command | processes | held-out exact match | eval loss | wall time | steps whose "
            f"loss equals the 1-process run's (to {RTOL:.0e}) |",
            "| --- | --- | --- | --- | --- | --- |"]
    for name, command, nproc in RUNS:
        if name == REFERENCE:
            same = "(the reference)"
        else:
            same = f"1-{results[f'example_{name}_equal_steps']} of {steps}"
        # a pipe in a table cell, even in code, is escaped
        cell = "`" + command.replace("|", "\\|") + "`"
        if name == "distributed_2nodes":
            cell += ", in two shells"
            same += ("; every step equal to `--standalone` with 2 processes, bit for bit"
                     if results["example_distributed_2nodes_equals_x2"] else
                     "; NOT equal to `--standalone` with 2 processes")
        rows.append(f"| {cell} | {nproc} | {results[f'example_{name}_exact_match']:.3f} | "
                    f"{results[f'example_{name}_eval_loss']:.4f} | "
                    f"{results[f'example_{name}_seconds']:.0f} s | {same} |")
    return "\n".join(rows)


def update_readme(results, path=README):
    """Replace the block between MARKERS in `path` with readme_table(results)."""
    with open(path) as f:
        text = f.read()
    head, rest = text.split(MARKERS[0])
    _, tail = rest.split(MARKERS[1])
    with open(path, "w") as f:
        f.write(f"{head}{MARKERS[0]}\n{readme_table(results)}\n{MARKERS[1]}{tail}")


def bench_and_record(out_root=None, results_path=RESULTS, readme=README):
    """What `make bench` calls: run every command, write examples_results.json and the README's
    table, and return the figures (for benchmarks/results.json)."""
    import torch  # only for the record of the machine; the runs are subprocesses

    results = {"example_machine": f"{os.cpu_count()} CPUs ({platform.machine()}), torch "
                                  f"{torch.__version__}"}
    results.update(bench_examples(out_root))
    with open(results_path, "w") as f:
        json.dump(results, f, indent=2)
        f.write("\n")
    update_readme(results, readme)
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--update-readme", action="store_true",
                   help="only write the table of benchmarks/examples_results.json into the README")
    args = p.parse_args(argv)
    if args.update_readme:
        with open(RESULTS) as f:
            results = json.load(f)
        update_readme(results)
    else:
        results = bench_and_record()
    print(readme_table(results))
    return results


if __name__ == "__main__":
    main()

"""Measured ratios, each from one run on this machine: `make bench` (or python benchmarks/run.py).

Every figure is a median over repeats and comes with the machine, the torch version and the
thread count. Results go to benchmarks/results.json and a table on stdout. Nothing here is a
test: a noisy machine changes the numbers, not the verdict of `make test`.
"""
import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from reference import DPOTrainer, SFTTrainer, configure_optimizer  # noqa: E402
from reference.data import (CharTokenizer, PreferenceCollator, PreferenceDataset, SFTCollator,  # noqa: E402
                            SFTDataset, left_pad, make_addition_splits)
from reference.dpo import concat_pairs  # noqa: E402
from reference.model import GPTConfig, TinyGPT  # noqa: E402
from reference.sft import sft_loss_sum  # noqa: E402


def median_time(fn, repeats, warmup=1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def tiny_model(block_size=12, n_embd=64):
    torch.manual_seed(0)
    return TinyGPT(GPTConfig(vocab_size=CharTokenizer().vocab_size, block_size=block_size, n_layer=2, n_head=4,
                             n_embd=n_embd))


def sft_batches(n, batch_size=256):
    tok = CharTokenizer()
    train, _ = make_addition_splits(2, 100, seed=0)
    ds, collate = SFTDataset(train, tok), SFTCollator(tok.pad_id)
    return [collate([ds[(i * batch_size + j) % len(ds)] for j in range(batch_size)]) for i in range(n)]


def bench_trainer_overhead(steps, repeats):
    """SFTTrainer's step time over a bare PyTorch loop's: same model, batches and optimizer."""
    batches = sft_batches(steps)

    def bare():
        model = tiny_model()
        opt = configure_optimizer(model=model, optimizer_type="adamw", lr=1e-3, weight_decay=0.1)
        for b in batches:
            loss_sum, n = sft_loss_sum(model(b["input_ids"], b["attention_mask"]), b["labels"])
            (loss_sum / n).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    def trainer():
        model = tiny_model()
        opt = configure_optimizer(model=model, optimizer_type="adamw", lr=1e-3, weight_decay=0.1)
        SFTTrainer(model=model, optimizer=opt, train_loader=batches, val_loader=None, device="cpu",
                   max_epochs=1, grad_accum_steps=1, use_amp=False, max_grad_norm=None, progress=False).train()

    # interleave the two so that drift in machine speed hits both alike
    t_bare, t_trainer = [], []
    for _ in range(repeats):
        t_bare.append(median_time(bare, 1, warmup=0))
        t_trainer.append(median_time(trainer, 1, warmup=0))
    return {"trainer_overhead": statistics.median(t_trainer) / statistics.median(t_bare),
            "bare_step_ms": 1000 * statistics.median(t_bare) / steps}


def bench_dpo_cost(steps, repeats):
    """A DPO step over an SFT step on the same tokens (chosen + rejected as SFT sequences)."""
    tok = CharTokenizer()
    train, _ = make_addition_splits(2, 100, seed=0)
    pref = PreferenceDataset(train[:128 * steps], tok, seed=0)
    dpo_batches = [PreferenceCollator(tok.pad_id)([pref[i * 128 + j] for j in range(128)]) for i in range(steps)]
    sft = []
    for b in dpo_batches:
        ids, labels, mask = concat_pairs(b, tok.pad_id)
        sft.append({"input_ids": ids, "labels": labels, "attention_mask": mask})

    def run_sft():
        model = tiny_model()
        opt = configure_optimizer(model=model, optimizer_type="adamw", lr=1e-4, weight_decay=0.0)
        SFTTrainer(model=model, optimizer=opt, train_loader=sft, val_loader=None, device="cpu", max_epochs=1,
                   grad_accum_steps=1, use_amp=False, max_grad_norm=None, progress=False).train()

    def run_dpo(precompute):
        def go():
            model = tiny_model()
            opt = configure_optimizer(model=model, optimizer_type="adamw", lr=1e-4, weight_decay=0.0)
            trainer = DPOTrainer(model=model, ref_model=copy.deepcopy(model), optimizer=opt, train_loader=dpo_batches,
                                 val_loader=None, beta=0.1, device="cpu", max_epochs=1, max_grad_norm=None,
                                 precompute_ref_logps=precompute, pad_token_id=tok.pad_id, progress=False)
            if precompute:  # a one-off pass before training, not a step cost: done outside the timer
                trainer.ref_logps, trainer.ref_model = trainer.compute_reference_logps(), None
            start = time.perf_counter()
            trainer.train()
            return time.perf_counter() - start
        return go

    t_sft, t_pre, t_online = [], [], []
    for _ in range(repeats):
        t_sft.append(median_time(run_sft, 1, warmup=0))
        t_pre.append(run_dpo(True)())
        t_online.append(run_dpo(False)())
    sft_t = statistics.median(t_sft)
    return {"dpo_over_sft_precomputed": statistics.median(t_pre) / sft_t,
            "dpo_over_sft_online_ref": statistics.median(t_online) / sft_t}


def bench_kv_cache(repeats, new_tokens=64, batch=64):
    """Cached over uncached sampling of 64 new tokens (greedy, so both produce the same tokens)."""
    model = tiny_model(block_size=new_tokens + 16, n_embd=128).eval()
    tok = CharTokenizer()
    ids, mask = left_pad([tok.encode(f"{i % 100:02d}+{(7 * i) % 100:02d}=") for i in range(batch)], tok.pad_id)
    same = torch.equal(model.generate(ids, mask, max_new_tokens=new_tokens, use_cache=True),
                       model.generate(ids, mask, max_new_tokens=new_tokens, use_cache=False))
    cached = median_time(lambda: model.generate(ids, mask, max_new_tokens=new_tokens, use_cache=True), repeats)
    uncached = median_time(lambda: model.generate(ids, mask, max_new_tokens=new_tokens, use_cache=False), repeats)
    return {"kv_cache_speedup": uncached / cached, "kv_cache_same_tokens": same}


def bench_bf16(steps, repeats):
    """Step time of fp32 over bf16 autocast (> 1 means bf16 is faster) for the chapters' model."""
    batches = sft_batches(steps)

    def run(amp):
        def go():
            model = tiny_model()
            opt = configure_optimizer(model=model, optimizer_type="adamw", lr=1e-3, weight_decay=0.1)
            SFTTrainer(model=model, optimizer=opt, train_loader=batches, val_loader=None, device="cpu", max_epochs=1,
                       grad_accum_steps=1, amp_dtype=amp, max_grad_norm=1.0, progress=False).train()
        return go
    t32, t16 = [], []
    for _ in range(repeats):
        t32.append(median_time(run(None), 1, warmup=0))
        t16.append(median_time(run("bf16"), 1, warmup=0))
    return {"fp32_over_bf16_step_time": statistics.median(t32) / statistics.median(t16)}


def chapter_command(chapter, extra=(), nproc=None, threads=None, tag=""):
    """(command, env, out) of a chapter's run as a subprocess (under torchrun when nproc is given)."""
    script = os.path.join(ROOT, "tutorial", chapter, "train.py")
    out = os.path.join(ROOT, "runs", "bench", chapter + (f"_x{nproc}" if nproc else "") + tag)
    env = dict(os.environ, PYTHONPATH=ROOT, TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, script]
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script]
    return cmd + ["--out", out, *extra], env, out


def summary_of(out):
    with open(os.path.join(out, "summary.json")) as f:
        return json.load(f)


def run_chapter(chapter, extra=(), nproc=None, threads=None):
    """Wall time and summary.json of a chapter's run."""
    cmd, env, out = chapter_command(chapter, extra, nproc, threads)
    start = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    return time.perf_counter() - start, summary_of(out)


def bench_ddp(steps, repeats):
    """Throughput of 2 processes x 1 thread over 1 process x 1 thread (same micro-batch each), and
    the machine's ceiling for it: two independent 1-process runs at the same time."""
    args = ["--max-steps", str(steps), "--eval-every", str(10 * steps), "--save-every", str(10 * steps),
            "--amp", "off", "--eval-size", "100", "--device", "cpu"]
    one, two, apart = [], [], []
    for _ in range(repeats):
        one.append(run_chapter("03_ddp", args, threads=1)[1]["train_seconds"])
        two.append(run_chapter("03_ddp", args, nproc=2, threads=1)[1]["train_seconds"])
        runs = [chapter_command("03_ddp", args, threads=1, tag=f"_apart{i}") for i in range(2)]
        procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                 for cmd, env, _ in runs]
        if any(p.wait() for p in procs):
            raise RuntimeError("an independent chapter 03 run failed")
        apart.append(statistics.mean(summary_of(out)["train_seconds"] for _, _, out in runs))
    # two processes train on twice the sequences per step
    return {"ddp_2x1_over_1x1_throughput": 2 * statistics.median(one) / statistics.median(two),
            "independent_2x1_over_1x1_throughput": 2 * statistics.median(one) / statistics.median(apart)}


def grpo_generation_fraction(out):
    """The mean share of a GRPO step spent sampling, from a chapter 05 run's metrics.jsonl."""
    with open(os.path.join(out, "metrics.jsonl")) as f:
        fractions = [r["generation_fraction"] for r in map(json.loads, f) if "generation_fraction" in r]
    return statistics.mean(fractions)


def last_make_test():
    """What the Makefile recorded about the last `make test` (runs/make_test.json), if any."""
    path = os.path.join(ROOT, "runs", "make_test.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return {f"make_test_{k}": v for k, v in json.load(f).items()}


# (key, what it is, goal): the rows of the README's benchmark table, in order
FIGURES = [
    ("trainer_overhead", "`SFTTrainer` step time / a bare PyTorch loop's", "<= 1.02"),
    ("dpo_over_sft_precomputed", "DPO step (precomputed reference log-probs) / SFT step on the same tokens", "<= 1.15"),
    ("dpo_over_sft_online_ref", "DPO step (online reference model) / SFT step on the same tokens", ""),
    ("kv_cache_speedup", "sampling 64 new tokens: uncached time / KV-cache time", ">= 5"),
    ("ddp_2x1_over_1x1_throughput", "DDP throughput: 2 processes x 1 thread / 1 process x 1 thread", ">= 1.8"),
    ("independent_2x1_over_1x1_throughput", "the machine's ceiling: 2 independent 1-thread runs at once / 1", ""),
    ("fp32_over_bf16_step_time", "fp32 step time / bf16-autocast step time (> 1: bf16 is faster)", ""),
    ("grpo_generation_fraction", "GRPO (chapter 05): share of a step spent sampling", ""),
]
CHAPTERS = [  # (folder, command, what it adds)
    ("01_loop", "python tutorial/01_loop/train.py", "the plain loop"),
    ("02_amp", "python tutorial/02_amp/train.py", "bf16/fp16 autocast, accumulation, clipping"),
    ("03_ddp", "python tutorial/03_ddp/train.py", "DDP, checkpoints, exact resume"),
    ("04_dpo", "python tutorial/04_dpo/train.py", "DPO against a frozen reference"),
    ("05_grpo", "python tutorial/05_grpo/train.py", "GRPO on the model's own samples"),
]


def outcome(summary):
    """Held-out exact match before -> after the chapter's subject (SFT alone: its final value)."""
    if "eval_accuracy_grpo" in summary:
        return f"{summary['eval_accuracy_sft']:.2f} after SFT -> {summary['eval_accuracy_grpo']:.2f} after GRPO"
    if "eval_accuracy_dpo" in summary:
        return (f"{summary['eval_accuracy_sft']:.2f} after SFT -> {summary['eval_accuracy_dpo']:.2f} after DPO "
                f"(preference accuracy {summary['pref_accuracy_sft']:.2f} -> {summary['pref_accuracy_dpo']:.2f})")
    return f"{summary['eval_accuracy']:.3f} after {summary['steps']} steps"


def readme_tables(results):
    """The README's two results tables, rendered from results.json: `make bench` prints them,
    `--update-readme` writes them in, and tests/test_readme.py checks that they agree."""
    rows = ["| chapter | command | adds | wall time | held-out exact match |", "| --- | --- | --- | --- | --- |"]
    for folder, command, adds in CHAPTERS:
        if f"chapter_{folder}_seconds" in results:
            rows.append(f"| {folder} | `{command}` | {adds} | {results[f'chapter_{folder}_seconds']:.0f} s | "
                        f"{outcome(results[f'chapter_{folder}_summary'])} |")
    rows += ["", "| figure | what | value | goal |", "| --- | --- | --- | --- |"]
    for key, what, goal in FIGURES:
        if key in results:
            rows.append(f"| `{key}` | {what} | {results[key]:.2f} | {goal} |")
    if "make_test_seconds" in results:
        rows.append(f"| `make_test_seconds` | `make test`: every test and notebook | {results['make_test_seconds']:.0f} | |")
    return "\n".join(rows)


MARKERS = ("<!-- bench:start -->", "<!-- bench:end -->")


def update_readme(path, results):
    """Replace the block between MARKERS in `path` with readme_tables(results)."""
    with open(path) as f:
        text = f.read()
    head, rest = text.split(MARKERS[0])
    _, tail = rest.split(MARKERS[1])
    with open(path, "w") as f:
        f.write(f"{head}{MARKERS[0]}\n{readme_tables(results)}\n{MARKERS[1]}{tail}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer repeats, no chapter runs (a smoke test)")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results.json"))
    p.add_argument("--update-readme", action="store_true",
                   help="only write the tables of --out (an earlier run's results) into README.md and README.zh-CN.md")
    args = p.parse_args(argv)
    if args.update_readme:
        with open(args.out) as f:
            results = json.load(f)
        for name in ("README.md", "README.zh-CN.md"):
            update_readme(os.path.join(ROOT, name), results)
        return results
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    reps = 2 if args.quick else 5
    results = {"machine": platform.platform(), "processor": platform.processor() or platform.machine(),
               "cpu_count": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads()}
    started = time.perf_counter()
    results.update(bench_trainer_overhead(20 if args.quick else 60, reps))
    results.update(bench_dpo_cost(10 if args.quick else 30, reps))
    results.update(bench_kv_cache(reps))
    results.update(bench_bf16(20 if args.quick else 60, reps))
    results.update(bench_ddp(50 if args.quick else 200, 1 if args.quick else 3))
    if not args.quick:
        for chapter in ("01_loop", "02_amp", "03_ddp", "04_dpo", "05_grpo"):
            if os.path.exists(os.path.join(ROOT, "tutorial", chapter, "train.py")):
                wall, summary = run_chapter(chapter, ["--device", "cpu"])
                results[f"chapter_{chapter}_seconds"] = wall
                results[f"chapter_{chapter}_summary"] = summary
        results["grpo_generation_fraction"] = grpo_generation_fraction(chapter_command("05_grpo")[2])
    results.update(last_make_test())
    results["bench_seconds"] = time.perf_counter() - started
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"{results['machine']}, {results['cpu_count']} CPUs, torch {results['torch']}, "
          f"{results['threads']} threads")
    print(f"{'figure':40s} {'value':>10s}  goal")
    goals = {"trainer_overhead": (1.02, -1), "dpo_over_sft_precomputed": (1.15, -1), "kv_cache_speedup": (5, 1),
             "ddp_2x1_over_1x1_throughput": (1.8, 1)}
    for key, value in results.items():
        if isinstance(value, float):
            goal = ""
            if key in goals:
                bound, sign = goals[key]
                goal = f"{'>=' if sign > 0 else '<='} {bound}: {'met' if sign * (value - bound) >= 0 else 'MISSED'}"
            print(f"{key:40s} {value:10.3f}  {goal}")
    if "make_test_seconds" not in results:
        print("make_test_seconds: not measured here; `make test` records it in runs/make_test.json")
    print("\n" + readme_tables(results))
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()

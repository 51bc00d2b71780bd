"""Measured figures, each from runs on this machine: `make bench` (python benchmarks/run.py).

Every ratio is a median over interleaved repeats and comes with the machine, the torch version
and the thread count. Results go to benchmarks/results.json and tables on stdout; the READMEs'
tables are rendered from results.json (`--update-readme`, tested by tests/test_readme.py).
Nothing here is a test: a noisy machine changes the numbers, not the verdict of `make test`.
"""
import argparse
import copy
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

from reference import DPOTrainer, GRPOTrainer, SFTTrainer, configure_optimizer
from reference.data import (CharTokenizer, PreferenceCollator, PreferenceDataset, PromptCollator,
                            PromptDataset, SFTCollator, SFTDataset, left_pad, make_addition_splits)
from reference.dpo import concat_pairs
from reference.model import GPTConfig, TinyGPT
from reference.rewards import correctness_reward
from reference.sft import sft_loss_sum

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.join(ROOT, "benchmarks")
SEEDS = (0, 1, 2, 3, 4)

# (key, what it is, goal): the rows of the README's figures table, in order; a goal is
# (">=" or "<=", bound) and is stated here only
FIGURES = [
    ("trainer_overhead", "`SFTTrainer` step time / a bare PyTorch loop's", ("<=", 1.02)),
    ("dpo_over_sft_precomputed",
     "DPO step (precomputed reference log-probs) / SFT step on the same tokens", ("<=", 1.15)),
    ("dpo_over_sft_online_ref", "DPO step (online reference model) / SFT step on the same tokens",
     None),
    ("kv_cache_speedup", "TinyGPT sampling 64 new tokens: uncached time / KV-cache time",
     (">=", 5)),
    ("hf_kv_cache_speedup", "a tiny Llama (Hugging Face) sampling 64 new tokens: uncached / cached",
     (">=", 5)),
    ("ddp_2x1_over_1x1_throughput", "DDP throughput: 2 processes x 1 thread / 1 process x 1 thread",
     (">=", 1.8)),
    ("independent_2x1_over_1x1_throughput",
     "the machine's ceiling: 2 independent 1-thread runs at once / 1", None),
    ("fsdp_over_ddp_step_time", "FSDP2 / DDP step time, 2 processes", None),
    ("fsdp_shard_fraction", "FSDP2: the share of the parameters each of 2 ranks holds", None),
    ("fp32_over_bf16_step_time", "fp32 / bf16-autocast step time on this CPU (> 1: bf16 faster)",
     None),
    ("grpo_generation_fraction", "GRPO: share of a step's time spent sampling", None),
]
CHAPTERS = [  # (folder, command, what it adds)
    ("01_loop", "python tutorial/01_loop/train.py", "the plain loop"),
    ("02_amp", "python tutorial/02_amp/train.py", "autocast, accumulation, clipping"),
    ("03_ddp", "python tutorial/03_ddp/train.py", "DDP, checkpoints, exact resume"),
    ("04_dpo", "python tutorial/04_dpo/train.py", "DPO against a frozen reference"),
    ("05_grpo", "python tutorial/05_grpo/train.py", "GRPO on the model's own samples"),
    ("06_fsdp", "python tutorial/06_fsdp/train.py", "FSDP2, sharded checkpoints (from 03)"),
]


def sibling(name):
    """benchmarks/<name>.py as a module (they import benchmarks/timing.py beside them)."""
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(HERE, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def median_time(fn, repeats, warmup=1):
    return sibling("timing").median_time(fn, repeats, warmup)


def tiny_model(block_size=12, n_embd=64):
    torch.manual_seed(0)
    return TinyGPT(GPTConfig(vocab_size=CharTokenizer().vocab_size, block_size=block_size,
                             n_layer=2, n_head=4, n_embd=n_embd))


def sft_batches(n, batch_size=256):
    tok = CharTokenizer()
    train, _ = make_addition_splits(2, 100, seed=0)
    ds, collate = SFTDataset(train, tok), SFTCollator(tok.pad_id)
    return [collate([ds[(i * batch_size + j) % len(ds)] for j in range(batch_size)])
            for i in range(n)]


def sft_trainer(batches, **kw):
    model = tiny_model()
    opt = configure_optimizer(model=model, optimizer_type="adamw", lr=1e-3, weight_decay=0.1)
    return SFTTrainer(model=model, optimizer=opt, train_loader=batches, val_loader=None,
                      device="cpu", max_epochs=1, grad_accum_steps=1, progress=False, **kw)


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
        sft_trainer(batches, use_amp=False, max_grad_norm=None).train()

    t_bare, t_trainer = [], []  # interleaved, so drift in machine speed hits both alike
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
    dpo_batches = [PreferenceCollator(tok.pad_id)([pref[i * 128 + j] for j in range(128)])
                   for i in range(steps)]
    sft = []
    for b in dpo_batches:
        ids, labels, mask = concat_pairs(b, tok.pad_id)
        sft.append({"input_ids": ids, "labels": labels, "attention_mask": mask})

    def run_dpo(precompute):
        model = tiny_model()
        opt = configure_optimizer(model=model, optimizer_type="adamw", lr=1e-4, weight_decay=0.0)
        trainer = DPOTrainer(model=model, ref_model=copy.deepcopy(model), optimizer=opt,
                             train_loader=dpo_batches, val_loader=None, beta=0.1, device="cpu",
                             max_epochs=1, max_grad_norm=None, precompute_ref_logps=precompute,
                             pad_token_id=tok.pad_id, progress=False)
        trainer.prepare()  # the one-off reference pass is not a step cost: outside the timer
        start = time.perf_counter()
        trainer.train()
        return time.perf_counter() - start

    t_sft, t_pre, t_online = [], [], []
    for _ in range(repeats):
        t_sft.append(median_time(lambda: sft_trainer(sft, max_grad_norm=None).train(), 1, 0))
        t_pre.append(run_dpo(True))
        t_online.append(run_dpo(False))
    sft_t = statistics.median(t_sft)
    return {"dpo_over_sft_precomputed": statistics.median(t_pre) / sft_t,
            "dpo_over_sft_online_ref": statistics.median(t_online) / sft_t}


def bench_kv_cache(repeats, new_tokens=64, batch=64):
    """Cached over uncached sampling of 64 new tokens (greedy: both give the same tokens)."""
    model = tiny_model(block_size=new_tokens + 16, n_embd=128).eval()
    tok = CharTokenizer()
    ids, mask = left_pad([tok.encode(f"{i % 100:02d}+{(7 * i) % 100:02d}=") for i in range(batch)],
                         tok.pad_id)

    def gen(cache):
        return model.generate(ids, mask, max_new_tokens=new_tokens, use_cache=cache)
    same = torch.equal(gen(True), gen(False))
    cached = median_time(lambda: gen(True), repeats)
    uncached = median_time(lambda: gen(False), repeats)
    return {"kv_cache_speedup": uncached / cached, "kv_cache_same_tokens": same}


def bench_bf16(steps, repeats):
    """Step time of fp32 over bf16 autocast (> 1: bf16 is faster) for the chapters' model."""
    batches = sft_batches(steps)
    t32, t16 = [], []
    for _ in range(repeats):
        t32.append(median_time(lambda: sft_trainer(batches, amp_dtype=None).train(), 1, 0))
        t16.append(median_time(lambda: sft_trainer(batches, amp_dtype="bf16").train(), 1, 0))
    return {"fp32_over_bf16_step_time": statistics.median(t32) / statistics.median(t16)}


def bench_grpo_generation(steps=40):
    """The share of GRPO's training time spent sampling (GRPOTrainer.generation_seconds), on
    chapter 05's shapes: 64 prompts x 8 samples per step, a 2-digit task."""
    tok = CharTokenizer()
    train, _ = make_addition_splits(2, 100, seed=0)
    loader = torch.utils.data.DataLoader(PromptDataset(train, tok), batch_size=64, shuffle=True,
                                         drop_last=True, collate_fn=PromptCollator(tok.pad_id),
                                         generator=torch.Generator().manual_seed(0))
    model = tiny_model()
    opt = configure_optimizer(model=model, optimizer_type="adamw", lr=1e-3, weight_decay=0.1)
    trainer = GRPOTrainer(model=model, optimizer=opt, train_loader=loader, device="cpu",
                          num_samples_per_prompt=8, reward_fn=correctness_reward, tokenizer=tok,
                          max_completion_length=4, generation_seed=0, max_steps=steps,
                          progress=False)
    trainer.train()
    return {"grpo_generation_fraction": trainer.generation_seconds / trainer.train_seconds}


def chapter_command(chapter, extra=(), nproc=None, threads=None, tag=""):
    """(command, env, out) of a chapter's run as a subprocess (under torchrun with nproc)."""
    script = os.path.join(ROOT, "tutorial", chapter, "train.py")
    out = os.path.join(ROOT, "runs", "bench", chapter + (f"_x{nproc}" if nproc else "") + tag)
    env = dict(os.environ, TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, script]
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", script]
    return cmd + ["--out", out, *extra], env, out


def summary_of(out):
    with open(os.path.join(out, "summary.json")) as f:
        return json.load(f)


def run_chapter(chapter, extra=(), nproc=None, threads=None, tag=""):
    """Wall time, summary.json and output folder of a chapter's run."""
    cmd, env, out = chapter_command(chapter, extra, nproc, threads, tag)
    start = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    return time.perf_counter() - start, summary_of(out), out


def bench_ddp(steps, repeats):
    """Throughput of 2 processes x 1 thread over 1 process x 1 thread (the same micro-batch
    each, so 2 processes train on twice the sequences), and the machine's ceiling for it: two
    independent 1-process runs at the same time. Interleaved repeats, medians."""
    args = ["--max-steps", str(steps), "--eval-every", str(10 * steps), "--save-every",
            str(10 * steps), "--amp", "off", "--eval-size", "20", "--device", "cpu"]
    one, two, apart = [], [], []
    for _ in range(repeats):
        one.append(run_chapter("03_ddp", args, threads=1)[1]["train_seconds"])
        two.append(run_chapter("03_ddp", args, nproc=2, threads=1)[1]["train_seconds"])
        runs = [chapter_command("03_ddp", args, threads=1, tag=f"_apart{i}") for i in range(2)]
        procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL) for cmd, env, _ in runs]
        if any(p.wait() for p in procs):
            raise RuntimeError("an independent chapter 03 run failed")
        apart.append(statistics.mean(summary_of(out)["train_seconds"] for _, _, out in runs))
    return {"ddp_2x1_over_1x1_throughput": 2 * statistics.median(one) / statistics.median(two),
            "independent_2x1_over_1x1_throughput":
                2 * statistics.median(one) / statistics.median(apart)}


def first_at(out, threshold=0.90):
    """The first eval record of a run whose exact match reaches threshold, or None."""
    with open(os.path.join(out, "metrics.jsonl")) as f:
        evals = [r for r in map(json.loads, f) if r.get("split") == "eval"]
    return next((r for r in evals if r["accuracy"] >= threshold), None)


def bench_seeds(seeds=SEEDS):
    """Chapters 04 and 05 at their defaults for every seed: the weak start, DPO's outcome, and
    how soon GRPO reaches 0.90 (its seconds estimated as grpo_seconds * step / steps)."""
    out = {}
    for seed in seeds:
        _, dpo, _ = run_chapter("04_dpo", ["--seed", str(seed), "--device", "cpu"],
                                tag=f"_seed{seed}")
        _, grpo, folder = run_chapter("05_grpo", ["--seed", str(seed), "--device", "cpu"],
                                      tag=f"_seed{seed}")
        hit = first_at(folder)
        out[str(seed)] = {
            "weak_start": dpo["eval_accuracy_sft"], "sft_steps": dpo["sft_steps"],
            "exact_match_dpo": dpo["eval_accuracy_dpo"], "pref_accuracy_sft":
                dpo["pref_accuracy_sft"], "pref_accuracy_dpo": dpo["pref_accuracy_dpo"],
            "weak_start_05": grpo["eval_accuracy_sft"], "exact_match_grpo":
                grpo["eval_accuracy_grpo"], "grpo_step_at_090": hit and hit["step"],
            "grpo_seconds_to_090": hit and grpo["grpo_seconds"] * hit["step"] / grpo["steps"],
            "grpo_seconds": grpo["grpo_seconds"]}
    return {"seeds": out}


def bench_plain_dpo():
    """Chapter 04 with plain DPO (--rpo-alpha 0), beside the default DPO + NLL run."""
    _, summary, _ = run_chapter("04_dpo", ["--rpo-alpha", "0", "--device", "cpu"], tag="_plain")
    return {"plain_dpo_summary": summary}


def last_make_test():
    """What `make test` recorded about itself (runs/make_test.json), if anything."""
    path = os.path.join(ROOT, "runs", "make_test.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return {f"make_test_{k}": v for k, v in json.load(f).items()}


def verdict(key, value):
    goal = dict((k, g) for k, _, g in FIGURES).get(key)
    if goal is None:
        return ""
    sign, bound = goal
    met = value >= bound if sign == ">=" else value <= bound
    return f"{sign} {bound}: {'met' if met else 'MISSED'}"


def outcome(summary):
    """Held-out exact match before -> after the chapter's subject (SFT alone: its final value)."""
    if "eval_accuracy_grpo" in summary:
        return (f"{summary['eval_accuracy_sft']:.2f} after SFT -> "
                f"{summary['eval_accuracy_grpo']:.2f} after GRPO")
    if "eval_accuracy_dpo" in summary:
        return (f"{summary['eval_accuracy_sft']:.2f} after SFT -> "
                f"{summary['eval_accuracy_dpo']:.2f} after DPO (preference accuracy "
                f"{summary['pref_accuracy_sft']:.2f} -> {summary['pref_accuracy_dpo']:.2f})")
    return f"{summary['eval_accuracy']:.3f} after {summary['steps']} steps"


def readme_tables(results):
    """The READMEs' results tables, rendered from results.json: `make bench` prints them,
    `--update-readme` writes them in, and tests/test_readme.py checks that they agree."""
    rows = ["| chapter | command | adds | wall time | held-out exact match |",
            "| --- | --- | --- | --- | --- |"]
    for folder, command, adds in CHAPTERS:
        if f"chapter_{folder}_seconds" in results:
            rows.append(f"| {folder} | `{command}` | {adds} | "
                        f"{results[f'chapter_{folder}_seconds']:.0f} s | "
                        f"{outcome(results[f'chapter_{folder}_summary'])} |")
    if "plain_dpo_summary" in results:
        rows.append(f"| 04_dpo, plain DPO | `python tutorial/04_dpo/train.py --rpo-alpha 0` | "
                    f"DPO without the NLL term | | {outcome(results['plain_dpo_summary'])} |")
    rows += ["", "| figure | what | value | goal |", "| --- | --- | --- | --- |"]
    for key, what, goal in FIGURES:
        if key in results:
            rows.append(f"| `{key}` | {what} | {results[key]:.2f} | "
                        f"{'' if goal is None else ' '.join(map(str, goal))} |")
    if "make_test_seconds" in results:
        rows.append(f"| `make_test_seconds` | `make test`: every test and notebook | "
                    f"{results['make_test_seconds']:.0f} | <= 600 |")
    if "seeds" in results:
        rows += ["", "| seed | weak start | DPO: exact match | DPO: preference accuracy | "
                 "GRPO: exact match | GRPO reaches 0.90 |", "| --- | --- | --- | --- | --- | --- |"]
        for seed, s in results["seeds"].items():
            reached = ("never" if s["grpo_step_at_090"] is None else
                       f"step {s['grpo_step_at_090']}, ~{s['grpo_seconds_to_090']:.0f} s")
            rows.append(f"| {seed} | {s['weak_start']:.2f} | {s['exact_match_dpo']:.2f} | "
                        f"{s['pref_accuracy_sft']:.2f} -> {s['pref_accuracy_dpo']:.2f} | "
                        f"{s['exact_match_grpo']:.2f} | {reached} |")
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
    p.add_argument("--quick", action="store_true",
                   help="fewer repeats; no chapter, seed or example runs (a smoke test)")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results.json"))
    p.add_argument("--update-readme", action="store_true",
                   help="only write --out's tables (an earlier run's) into both READMEs")
    args = p.parse_args(argv)
    if args.update_readme:
        with open(args.out) as f:
            results = json.load(f)
        for name in ("README.md", "README.zh-CN.md"):
            update_readme(os.path.join(ROOT, name), results)
        return results
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    reps = 2 if args.quick else 5
    results = {"machine": platform.platform(), "processor": platform.processor() or
               platform.machine(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
               "threads": torch.get_num_threads()}
    started = time.perf_counter()
    results.update(bench_trainer_overhead(20 if args.quick else 60, reps))
    results.update(bench_dpo_cost(10 if args.quick else 30, reps))
    results.update(bench_kv_cache(reps))
    results.update(sibling("hf").bench_hf_kv_cache(reps))
    results.update(bench_bf16(10 if args.quick else 30, reps))
    results.update(bench_grpo_generation(10 if args.quick else 40))
    results.update(bench_ddp(50 if args.quick else 300, 1 if args.quick else 5))
    results.update(sibling("fsdp").bench_fsdp())
    if not args.quick:
        for chapter, _, _ in CHAPTERS:
            wall, summary, _ = run_chapter(chapter, ["--device", "cpu"])
            results[f"chapter_{chapter}_seconds"] = wall
            results[f"chapter_{chapter}_summary"] = summary
        results.update(bench_plain_dpo())
        results.update(bench_seeds())
        results.update(sibling("examples").bench_and_record())
    results.update(last_make_test())
    results["bench_seconds"] = time.perf_counter() - started
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"{results['machine']}, {results['cpu_count']} CPUs, torch {results['torch']}, "
          f"{results['threads']} threads")
    for key, value in results.items():
        if isinstance(value, float):
            print(f"{key:40s} {value:10.3f}  {verdict(key, value)}")
    print("\n" + readme_tables(results))
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()

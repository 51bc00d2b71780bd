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


def run_chapter(chapter, extra=(), nproc=None, threads=None):
    """Wall time of a chapter's run as a subprocess (with torchrun when nproc is given)."""
    script = os.path.join(ROOT, "tutorial", chapter, "train.py")
    out = os.path.join(ROOT, "runs", "bench", chapter + (f"_x{nproc}" if nproc else ""))
    env = dict(os.environ, PYTHONPATH=ROOT)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, script]
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script]
    start = time.perf_counter()
    subprocess.run(cmd + ["--out", out, *extra], env=env, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - start
    with open(os.path.join(out, "summary.json")) as f:
        return wall, json.load(f)


def bench_ddp(steps, repeats):
    """Throughput of 2 processes x 1 thread over 1 process x 1 thread (same micro-batch each)."""
    args = ["--max-steps", str(steps), "--eval-every", str(10 * steps), "--save-every", str(10 * steps),
            "--amp", "off", "--eval-size", "100"]
    one, two = [], []
    for _ in range(repeats):
        one.append(run_chapter("03_ddp", args, threads=1)[1]["train_seconds"])
        two.append(run_chapter("03_ddp", args, nproc=2, threads=1)[1]["train_seconds"])
    # two processes train on twice the sequences per step
    return {"ddp_2x1_over_1x1_throughput": 2 * statistics.median(one) / statistics.median(two)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer repeats, no chapter runs (a smoke test)")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results.json"))
    args = p.parse_args(argv)
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
                wall, summary = run_chapter(chapter)
                results[f"chapter_{chapter}_seconds"] = wall
                results[f"chapter_{chapter}_summary"] = summary
                if "generation_fraction" in summary:
                    results["grpo_generation_fraction"] = summary["generation_fraction"]
    results["bench_seconds"] = time.perf_counter() - started
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"{'figure':40s} {'value':>10s}  goal")
    goals = {"trainer_overhead": "<= 1.02", "dpo_over_sft_precomputed": "<= 1.15", "kv_cache_speedup": ">= 5",
             "ddp_2x1_over_1x1_throughput": ">= 1.8"}
    for key, value in results.items():
        if isinstance(value, float):
            print(f"{key:40s} {value:10.3f}  {goals.get(key, '')}")
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()

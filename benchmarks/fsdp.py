"""FSDP2 against DDP, 2 processes on this machine's CPU (gloo), the same tiny SFT run: how much of
the model each rank holds, and how much longer a step takes.

    python benchmarks/fsdp.py            # prints the two figures as JSON (about 40 s)

`bench_fsdp()` launches this file under torchrun; each rank trains the reference SFTTrainer with
parallelism="ddp", then "fsdp", alternately `repeats` times, and every step's wall time is
taken (the first `warmup` steps of each run are left out: lazy initialisation, first
all-gathers). Returns
  fsdp_shard_fraction      the largest share of the parameters (and so of the gradients and
                           AdamW moments) that one rank holds under FSDP; DDP's is 1.0
  fsdp_over_ddp_step_time  the median FSDP step time over the median DDP step time
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from reference import SFTTrainer, configure_optimizer  # noqa: E402
from reference.chapters.common import sharded_loader  # noqa: E402
from reference.data import (CharTokenizer, SFTCollator, SFTDataset,  # noqa: E402
                            make_addition_splits)
from reference.distributed import all_gather_object, teardown, torchrun_env  # noqa: E402
from reference.model import GPTConfig, TinyGPT  # noqa: E402


def step_times(parallelism, steps, batch_size=64):
    """(seconds of each step, this rank's parameter elements, all parameter elements)."""
    torch.manual_seed(0)
    tok = CharTokenizer()
    train, _ = make_addition_splits(2, 100, seed=0)
    loader = sharded_loader(SFTDataset(train, tok), batch_size, SFTCollator(tok.pad_id), seed=0)
    model = TinyGPT(GPTConfig(vocab_size=tok.vocab_size, block_size=12, n_layer=2, n_head=4,
                              n_embd=64))
    optimizer = configure_optimizer(model, lr=1e-3, weight_decay=0.1)
    ends = []
    trainer = SFTTrainer(model=model, optimizer=optimizer, train_loader=loader, device="cpu",
                         max_steps=steps, progress=False, parallelism=parallelism,
                         step_callback=lambda _: ends.append(time.perf_counter()))
    start = time.perf_counter()
    trainer.train()
    held = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel()
               for p in trainer.raw_model.parameters())
    ends = [start] + ends
    return [b - a for a, b in zip(ends, ends[1:])], held, trainer.raw_model.num_parameters()


def worker(out, steps, repeats, warmup):
    torch.set_num_threads(1)
    times = {"ddp": [], "fsdp": []}
    fraction = None
    for _ in range(repeats):
        for parallelism in ("ddp", "fsdp"):  # alternated: drift in machine speed hits both
            seconds, held, total = step_times(parallelism, steps)
            times[parallelism] += seconds[warmup:]
            if parallelism == "fsdp":
                fraction = max(all_gather_object(held)) / total
    if torchrun_env().is_main:
        ddp, fsdp = (statistics.median(times[k]) for k in ("ddp", "fsdp"))
        with open(out, "w") as f:
            json.dump({"fsdp_shard_fraction": fraction, "fsdp_over_ddp_step_time": fsdp / ddp},
                      f)
    teardown()


def bench_fsdp(steps=30, repeats=2, warmup=5):
    """{"fsdp_shard_fraction", "fsdp_over_ddp_step_time"} from 2 processes x `repeats` runs of
    `steps` steps of each parallelism (about 40 s on a 2-core CPU)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT,
               TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "fsdp.json")
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                            "--nproc_per_node=2", os.path.abspath(__file__), "--worker", out,
                            "--steps", str(steps), "--repeats", str(repeats), "--warmup",
                            str(warmup)], env=env, capture_output=True, text=True, timeout=900)
        if r.returncode != 0:
            raise RuntimeError(f"the FSDP benchmark failed:\n{r.stderr[-3000:]}")
        with open(out) as f:
            return json.load(f)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--worker", help="(under torchrun) write the figures to this file")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--warmup", type=int, default=5)
    args = p.parse_args()
    if args.worker:
        worker(args.worker, args.steps, args.repeats, args.warmup)
    else:
        start = time.perf_counter()
        results = bench_fsdp(args.steps, args.repeats, args.warmup)
        print(json.dumps(results), f"({time.perf_counter() - start:.0f} s)")

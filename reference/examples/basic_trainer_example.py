"""Every component of the reference trainer, in one process.

    python reference/examples/basic_trainer_example.py --out runs/example_basic
    python reference/examples/basic_trainer_example.py --out runs/example_basic --resume

SFT on 2-digit addition with: configure_optimizer (AdamW, decay on matrices only), warmup +
cosine schedule, gradient accumulation (2 micro-batches of 128 per step), autocast (bf16 on a
GPU; fp32 on a CPU, where bf16 is usually slower), gradient clipping, periodic evaluation (loss
and held-out exact match), metrics.jsonl, and checkpoints with exact resume.
"""
import argparse
import os
import shutil
import time

import torch

from reference import SFTTrainer
from reference.data import (CharTokenizer, SFTCollator, SFTDataset, exact_match,
                            make_addition_splits)
from reference.model import GPTConfig, TinyGPT
from reference.optimizer import configure_optimizer, warmup_cosine_scheduler
from reference.runtime import resolve_device


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/example_basic")
    p.add_argument("--max-steps", type=int, default=800)
    p.add_argument("--amp", default="auto", choices=["auto", "on", "off"],
                   help="bf16 autocast (fp16 on GPUs without bf16); auto: on for CUDA only, "
                        "since CPUs without native bf16 run it several times slower than fp32")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    args = p.parse_args(argv)
    device = resolve_device("auto")
    torch.manual_seed(0)

    tok = CharTokenizer()
    train_problems, eval_problems = make_addition_splits(digits=2, n_eval=500, seed=0)
    collate = SFTCollator(tok.pad_id)
    train_set = SFTDataset(train_problems, tok)
    # one replica: a fresh order each epoch from seed + epoch, so a resumed run knows the order
    # it stopped in (distributed_train_example.py shards the same idea over processes)
    sampler = torch.utils.data.DistributedSampler(train_set, num_replicas=1, rank=0, shuffle=True,
                                                  seed=0, drop_last=True)
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=128, sampler=sampler,
                                               drop_last=True, collate_fn=collate,
                                               generator=torch.Generator().manual_seed(0))
    val_loader = torch.utils.data.DataLoader(SFTDataset(eval_problems, tok), batch_size=256,
                                             collate_fn=collate)
    checkpoints = os.path.join(args.out, "checkpoints")
    if not args.resume and os.path.isdir(checkpoints):  # a rerun replaces the last run
        print(f"starting fresh: removing the previous run's checkpoints in {checkpoints}")
        shutil.rmtree(checkpoints)

    cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=12, n_layer=2, n_head=4, n_embd=64)
    model = TinyGPT(cfg)
    optimizer = configure_optimizer(model=model, optimizer_type="adamw", lr=5e-3,
                                    weight_decay=0.1)
    trainer = SFTTrainer(
        model=model, optimizer=optimizer, train_loader=train_loader, val_loader=val_loader,
        device=device, max_epochs=None, max_steps=args.max_steps, grad_accum_steps=2,
        use_amp=args.amp == "on" or (args.amp == "auto" and device.type == "cuda"),
        max_grad_norm=1.0, scheduler=warmup_cosine_scheduler(optimizer, 30, args.max_steps),
        eval_every=200,
        eval_fn=lambda m: {"accuracy": exact_match(m, eval_problems, tok, device=device)},
        out_dir=args.out, save_every=100, keep_last=2,
        resume_from="latest" if args.resume else None)
    start = time.perf_counter()
    history = trainer.train()
    evals = [r for r in history if r.get("split") == "eval"]
    if evals:
        print(f"step {trainer.step}: held-out exact match {evals[-1]['accuracy']:.3f}; "
              f"{time.perf_counter() - start:.1f} s; metrics in {args.out}/metrics.jsonl, "
              f"checkpoints in {trainer.checkpoint_dir}")
    return trainer


if __name__ == "__main__":
    main()

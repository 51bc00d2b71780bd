"""What every chapter's experiment shares: its flags, the SFT loaders and phase, the model, the
output folder's fresh start and summary.json."""
import argparse
import json
import os
import shutil
import time
from types import SimpleNamespace

import torch
from torch.utils.data.distributed import DistributedSampler

from ..data import CharTokenizer, SFTCollator, SFTDataset, exact_match, make_addition_splits
from ..distributed import torchrun_env
from ..model import GPTConfig, TinyGPT
from ..optimizer import configure_optimizer, warmup_cosine_scheduler
from ..runtime import resolve_device
from ..sft import SFTTrainer

DPO_LOSSES, GRPO_LOSSES = ("sigmoid", "ipo", "hinge"), ("grpo", "bnpo", "dr_grpo", "dapo")


def get_args(chapter, argv=None):
    """The flags of tutorial/<chapter>/train.py, with the same names and defaults."""
    p = argparse.ArgumentParser(prog=f"python -m reference {chapter}",
                                description=f"Chapter {chapter}'s experiment with the reference trainers.")
    p.add_argument("--out", default=f"runs/reference_{chapter}")
    p.add_argument("--max-steps", type=int, default={"04": 150, "05": None}.get(chapter, 800))  # 05: by --method
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--batch-size", type=int, default=64 if chapter >= "04" else 256)
    if chapter >= "02":
        p.add_argument("--grad-accum-steps", type=int, default=1)
        p.add_argument("--amp", default="bf16", choices=["off", "bf16", "fp16"])
        p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--warmup-steps", type=int, default=30)
    p.add_argument("--digits", type=int, default=2)
    p.add_argument("--eval-size", type=int, default=500)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=64)
    if chapter >= "03":
        p.add_argument("--save-every", type=int, default=200)
        p.add_argument("--keep-last", type=int, default=2)
        p.add_argument("--resume", action="store_true")
    if chapter >= "04":  # --max-steps is the DPO (or GRPO) phase's; SFT first trains --sft-steps to a weak start
        p.add_argument("--sft-steps", type=int, default=600)
        p.add_argument("--beta", type=float, default=None if chapter >= "05" else 0.1)  # 05: by --method
        p.add_argument("--dpo-lr", type=float, default=2e-3)
        p.add_argument("--dpo-warmup-steps", type=int, default=10)
        p.add_argument("--loss-type", default=None if chapter >= "05" else "sigmoid",
                       choices=DPO_LOSSES + (GRPO_LOSSES if chapter >= "05" else ()))
        p.add_argument("--label-smoothing", type=float, default=0.0)
        p.add_argument("--rpo-alpha", type=float, default=1.0)
        p.add_argument("--precompute-ref-logps", action="store_true")
    if chapter >= "05":  # the phase after SFT is GRPO (default) or chapter 04's DPO
        p.add_argument("--method", default="grpo", choices=["grpo", "dpo"])
        p.add_argument("--num-samples-per-prompt", type=int, default=8)
        p.add_argument("--clip-eps", type=float, default=0.2)
        p.add_argument("--num-iterations", type=int, default=1)
        p.add_argument("--temperature", type=float, default=1.0)
        p.add_argument("--top-k", type=int, default=None)
        p.add_argument("--max-completion-length", type=int, default=None)
        p.add_argument("--grpo-lr", type=float, default=1e-3)
        p.add_argument("--grpo-warmup-steps", type=int, default=10)
        p.add_argument("--format-reward-weight", type=float, default=0.0)
    args = p.parse_args(argv)
    if chapter >= "05":  # DPO's beta is 0.1; GRPO's KL weight is 0 (no reference model)
        if args.max_steps is None:
            args.max_steps = 150 if args.method == "dpo" else 800
        if args.beta is None:
            args.beta = 0.1 if args.method == "dpo" else 0.0
        if args.loss_type is None:
            args.loss_type = "sigmoid" if args.method == "dpo" else "grpo"
        if (args.loss_type in DPO_LOSSES) != (args.method == "dpo"):
            p.error(f"--loss-type {args.loss_type} is not a --method {args.method} loss")
    for name in ("max_steps", "batch_size", "eval_every", "eval_size", "grad_accum_steps", "save_every",
                 "keep_last", "sft_steps"):
        if getattr(args, name, 1) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if getattr(args, "max_grad_norm", 1.0) <= 0:
        p.error("--max-grad-norm must be > 0")
    if getattr(args, "method", "dpo") == "dpo" and (getattr(args, "beta", 1.0) <= 0 or getattr(args, "dpo_lr", 1.0) <= 0):
        p.error("--beta and --dpo-lr must be > 0")
    if not 0 <= getattr(args, "label_smoothing", 0.0) < 0.5:
        p.error("--label-smoothing must be in [0, 0.5)")
    if getattr(args, "rpo_alpha", 0.0) < 0:
        p.error("--rpo-alpha must be >= 0")
    return args  # GRPOTrainer checks the GRPO values itself (G >= 2, beta >= 0, ...)


def trainer_options(args):
    """The Trainer arguments that a chapter's flags stand for; earlier chapters lack the flags."""
    amp = getattr(args, "amp", "off")
    return {"grad_accum_steps": getattr(args, "grad_accum_steps", 1),
            "amp_dtype": None if amp == "off" else amp,
            "max_grad_norm": getattr(args, "max_grad_norm", None),
            "save_every": getattr(args, "save_every", None),
            "keep_last": getattr(args, "keep_last", None),
            "resume_from": "latest" if getattr(args, "resume", False) else None}


def sft_loaders(args, tok, train_problems, eval_problems, chapter):
    """Chapters 01-02 shuffle with a seeded generator; from 03 on a DistributedSampler shards
    the data (with one replica in a single process, so the order is the same either way)."""
    collate = SFTCollator(tok.pad_id)
    train_set = SFTDataset(train_problems, tok)
    if chapter >= "03":
        train_loader = sharded_loader(train_set, args.batch_size, collate, args.seed)
    else:
        train_loader = torch.utils.data.DataLoader(
            train_set, batch_size=args.batch_size, shuffle=True, drop_last=True, collate_fn=collate,
            generator=torch.Generator().manual_seed(args.seed))
    val_loader = torch.utils.data.DataLoader(SFTDataset(eval_problems, tok), batch_size=256, collate_fn=collate)
    return train_loader, val_loader


def sharded_loader(dataset, batch_size, collate, seed):
    """This rank's shard of `dataset`, reshuffled every epoch by a DistributedSampler (one replica
    outside torchrun: the whole dataset). The loader's own generator means that starting an epoch
    draws nothing from the global RNG, which an exact resume relies on."""
    env = torchrun_env()
    sampler = DistributedSampler(dataset, num_replicas=env.world_size, rank=env.rank, shuffle=True, seed=seed,
                                 drop_last=True)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True,
                                       collate_fn=collate, generator=torch.Generator().manual_seed(seed))


def weak_start(args, chapter):
    """Phase 1 of chapters 04 and 05: SFT for --sft-steps steps, in DIR/sft, to a deliberately weak
    model (with --resume, a finished phase only loads its end). Both phases' folders start fresh
    first, and the random draws come in the chapter scripts' order. Returns what phase 2 needs."""
    start_fresh(args, os.path.join(args.out, "sft"), args.out)
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    tok = CharTokenizer()
    train_problems, eval_problems = make_addition_splits(args.digits, args.eval_size, seed=args.seed)
    train_loader, val_loader = sft_loaders(args, tok, train_problems, eval_problems, chapter)
    model = build_model(args, tok, device)
    optimizer = configure_optimizer(model=model, optimizer_type="adamw", lr=args.lr, weight_decay=args.weight_decay)
    sft = SFTTrainer(
        model=model, optimizer=optimizer, train_loader=train_loader, val_loader=val_loader, device=device,
        max_steps=args.sft_steps, scheduler=warmup_cosine_scheduler(optimizer, args.warmup_steps, args.sft_steps),
        eval_every=args.eval_every, out_dir=os.path.join(args.out, "sft"),
        eval_fn=lambda m: {"accuracy": exact_match(m, eval_problems, tok, device=device)}, **trainer_options(args))
    start = time.perf_counter()
    sft.train()
    return SimpleNamespace(sft=sft, model=model, tok=tok, device=device, train_problems=train_problems,
                           eval_problems=eval_problems, seconds=time.perf_counter() - start)


def build_model(args, tok, device):
    cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=4 * args.digits + 4,
                    n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd)
    return TinyGPT(cfg).to(device)


def start_fresh(args, *outs):
    """Like the chapter scripts: a run without --resume replaces an earlier run's checkpoints, in
    each of `outs` (default: --out; a two-phase chapter passes both of its phases' folders)."""
    for out in outs or (args.out,):
        path = os.path.join(out, "checkpoints")
        if not getattr(args, "resume", False) and torchrun_env().is_main and os.path.isdir(path):
            print(f"starting fresh: removing the previous run's checkpoints in {path}")
            shutil.rmtree(path)


def run_sft(chapter, args):
    start_fresh(args)
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)  # the same order of random draws as the chapter scripts
    tok = CharTokenizer()
    train_problems, eval_problems = make_addition_splits(args.digits, args.eval_size, seed=args.seed)
    train_loader, val_loader = sft_loaders(args, tok, train_problems, eval_problems, chapter)
    model = build_model(args, tok, device)
    optimizer = configure_optimizer(model=model, optimizer_type="adamw", lr=args.lr, weight_decay=args.weight_decay)
    scheduler = warmup_cosine_scheduler(optimizer, args.warmup_steps, args.max_steps)
    trainer = SFTTrainer(
        model=model, optimizer=optimizer, train_loader=train_loader, val_loader=val_loader,
        device=device, max_steps=args.max_steps, scheduler=scheduler, eval_every=args.eval_every,
        out_dir=args.out, eval_fn=lambda m: {"accuracy": exact_match(m, eval_problems, tok, device=trainer.device)},
        **trainer_options(args))
    start = time.perf_counter()
    history = trainer.train()
    return write_summary(args, trainer, history, time.perf_counter() - start)


def write_summary(args, trainer, history, train_seconds, **extra):
    """summary.json from the last train and eval records (rank 0 only)."""
    if not trainer.dist.is_main:
        return None
    path = os.path.join(args.out, "summary.json")
    train = [r for r in history if "split" not in r]
    evals = [r for r in history if r.get("split") == "eval"]
    if not train:  # resumed from the final checkpoint: the earlier run's summary stands
        with open(path) as f:
            return json.load(f)
    summary = {"eval_accuracy": evals[-1]["accuracy"], "eval_loss": evals[-1]["loss"],
               "final_loss": train[-1]["loss"], "steps": trainer.step, "train_seconds": train_seconds,
               "parameters": trainer.raw_model.num_parameters(), **extra}
    with open(path, "w") as f:
        json.dump(summary, f, indent=2)
    print(f"held-out exact match {summary['eval_accuracy']:.3f} after {trainer.step} steps; "
          f"wrote {args.out}/metrics.jsonl and summary.json")
    return summary

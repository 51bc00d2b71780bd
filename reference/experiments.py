"""Each chapter's experiment, built from the reference package: the same data, model, seed and
flags as `tutorial/NN/train.py`, so the two runs can be compared number for number."""
import argparse
import json
import os
import time

import torch

from .data import CharTokenizer, SFTCollator, SFTDataset, exact_match, make_addition_splits
from .model import GPTConfig, TinyGPT
from .optimizer import configure_optimizer, warmup_cosine_scheduler
from .sft import SFTTrainer

CHAPTERS = ("01", "02")


def get_args(chapter, argv=None):
    p = argparse.ArgumentParser(prog=f"python -m reference {chapter}",
                                description=f"Chapter {chapter}'s experiment with the reference trainers.")
    p.add_argument("--out", default=f"runs/reference_{chapter}")
    p.add_argument("--max-steps", type=int, default=800)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--batch-size", type=int, default=256)
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
    args = p.parse_args(argv)
    for name in ("max_steps", "batch_size", "eval_every", "eval_size", "grad_accum_steps"):
        if getattr(args, name, 1) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if getattr(args, "max_grad_norm", 1.0) <= 0:
        p.error("--max-grad-norm must be > 0")
    return args


def trainer_options(args):
    """The Trainer arguments a chapter's flags stand for (chapter 01 has none of these flags)."""
    amp = getattr(args, "amp", "off")
    return {"grad_accum_steps": getattr(args, "grad_accum_steps", 1),
            "amp_dtype": None if amp == "off" else amp,
            "max_grad_norm": getattr(args, "max_grad_norm", None)}


def build_sft(args, device):
    """Tokenizer, problems, loaders and model, created in the chapter scripts' order (the order
    decides which random numbers each piece draws)."""
    tok = CharTokenizer()
    train_problems, eval_problems = make_addition_splits(args.digits, args.eval_size, seed=args.seed)
    collate = SFTCollator(tok.pad_id)
    train_loader = torch.utils.data.DataLoader(
        SFTDataset(train_problems, tok), batch_size=args.batch_size, shuffle=True, drop_last=True,
        collate_fn=collate, generator=torch.Generator().manual_seed(args.seed))
    val_loader = torch.utils.data.DataLoader(SFTDataset(eval_problems, tok), batch_size=256, collate_fn=collate)
    cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=4 * args.digits + 4,
                    n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd)
    model = TinyGPT(cfg).to(device)
    return tok, train_problems, eval_problems, train_loader, val_loader, model


def run(chapter, argv=None):
    args = get_args(chapter, argv)
    torch.manual_seed(args.seed)
    from .runtime import resolve_device
    device = resolve_device(args.device)
    tok, train_problems, eval_problems, train_loader, val_loader, model = build_sft(args, device)
    optimizer = configure_optimizer(model, "adamw", lr=args.lr, weight_decay=args.weight_decay)
    scheduler = warmup_cosine_scheduler(optimizer, args.warmup_steps, args.max_steps)
    trainer = SFTTrainer(
        model=model, optimizer=optimizer, train_loader=train_loader, val_loader=val_loader,
        device=device, max_steps=args.max_steps, scheduler=scheduler, eval_every=args.eval_every,
        out_dir=args.out, **trainer_options(args),
        eval_fn=lambda m: {"accuracy": exact_match(m, eval_problems, tok, device=device)})
    start = time.perf_counter()
    history = trainer.train()
    train_seconds = time.perf_counter() - start
    last_train = [r for r in history if "split" not in r][-1]
    last_eval = [r for r in history if r.get("split") == "eval"][-1]
    summary = {"eval_accuracy": last_eval["accuracy"], "eval_loss": last_eval["loss"],
               "final_loss": last_train["loss"], "steps": trainer.step, "train_seconds": train_seconds,
               "parameters": model.num_parameters()}
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"held-out exact match {summary['eval_accuracy']:.3f} after {trainer.step} steps; "
          f"wrote {args.out}/metrics.jsonl and summary.json")
    return summary

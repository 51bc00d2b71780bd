"""Chapter 01: the plain training loop.

Supervised fine-tuning (SFT) of a tiny GPT on n-digit addition ("12+34=" -> "46<eos>"):
masked next-token loss, AdamW with weight decay on linear-layer weights only, linear warmup
then cosine decay, periodic evaluation, and one JSON record per optimizer step in
DIR/metrics.jsonl.

    python tutorial/01_loop/train.py --out runs/01_loop
"""
import argparse
import json
import math
import os
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from reference.data import CharTokenizer, SFTCollator, SFTDataset, exact_match, make_addition_splits
from reference.model import GPTConfig, TinyGPT
from reference.optimizer import configure_optimizer


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Chapter 01: the plain training loop (SFT).")
    p.add_argument("--out", default="runs/01_loop", help="where metrics.jsonl, summary.json and model.pt go")
    p.add_argument("--max-steps", type=int, default=800, help="optimizer steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=5e-3, help="peak learning rate")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--warmup-steps", type=int, default=30)
    p.add_argument("--digits", type=int, default=2, help="the task: addition of numbers below 10**digits")
    p.add_argument("--eval-size", type=int, default=500, help="held-out problems, never trained on")
    p.add_argument("--eval-every", type=int, default=100, help="steps between evaluations")
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=64)
    args = p.parse_args(argv)
    for name in ("max_steps", "batch_size", "eval_every", "eval_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def pick_device(name):
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but CUDA is not available; use --device auto or cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ValueError("--device mps was asked for, but MPS is not available; use --device auto or cpu")
    return torch.device(name)


def lr_multiplier(step, warmup_steps, max_steps, min_ratio=0.1):
    """Linear warmup from 0, then cosine decay to min_ratio of the peak learning rate."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def sft_loss_sum(logits, labels):
    """Summed next-token cross-entropy over the target tokens, and how many targets there are.

    The logits at position t predict the token at t+1, so labels shift left by one. Labels of
    -100 (prompt and padding) are ignored. The caller divides by the count, so that every
    target token weighs the same however the batch is padded."""
    logits, targets = logits[:, :-1, :], labels[:, 1:]
    loss_sum = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1),
                               ignore_index=-100, reduction="sum")
    return loss_sum, (targets != -100).sum()


def forever(loader):
    """Batches without end: a fresh shuffle at every pass over the data."""
    while True:
        yield from loader


@torch.no_grad()
def evaluate(model, loader, device):
    model.eval()
    total, count = 0.0, 0
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        loss_sum, n = sft_loss_sum(model(batch["input_ids"], batch["attention_mask"]), batch["labels"])
        total, count = total + loss_sum.item(), count + n.item()
    model.train()
    return total / count


def train(model, optimizer, scheduler, train_loader, evaluate_fn, args):
    """The loop: forward, loss, backward, step. One metrics record per optimizer step, and an
    evaluation every --eval-every steps. Returns the last train and eval records."""
    log = open(os.path.join(args.out, "metrics.jsonl"), "w")
    batches = forever(train_loader)
    model.train()
    bar = tqdm(range(1, args.max_steps + 1), desc="train", disable=None)
    for step in bar:
        batch = {k: v.to(args.device) for k, v in next(batches).items()}
        logits = model(batch["input_ids"], batch["attention_mask"])
        loss_sum, n_tokens = sft_loss_sum(logits, batch["labels"])
        loss = loss_sum / n_tokens
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at step {step}; lower --lr")
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()

        record = {"step": step, "loss": loss.item(), "lr": lr, "grad_norm": grad_norm.item(),
                  "tokens": int(n_tokens)}
        log.write(json.dumps(record) + "\n")
        bar.set_postfix(loss=f"{record['loss']:.4f}")
        if step % args.eval_every == 0 or step == args.max_steps:
            eval_record = {"step": step, "split": "eval", **evaluate_fn()}
            log.write(json.dumps(eval_record) + "\n")
            tqdm.write(f"step {step}: train loss {record['loss']:.4f}, "
                       + ", ".join(f"eval {k} {v:.4f}" for k, v in eval_record.items() if k not in ("step", "split")))
    log.close()
    return record, eval_record


def main(argv=None):
    args = get_args(argv)
    args.device = pick_device(args.device)
    torch.manual_seed(args.seed)
    os.makedirs(args.out, exist_ok=True)

    # data: disjoint train and held-out problems, right-padded batches, labels only on the answer
    tok = CharTokenizer()
    train_problems, eval_problems = make_addition_splits(args.digits, args.eval_size, seed=args.seed)
    collate = SFTCollator(tok.pad_id)
    train_loader = torch.utils.data.DataLoader(
        SFTDataset(train_problems, tok), batch_size=args.batch_size, shuffle=True, drop_last=True,
        collate_fn=collate, generator=torch.Generator().manual_seed(args.seed))
    val_loader = torch.utils.data.DataLoader(SFTDataset(eval_problems, tok), batch_size=256, collate_fn=collate)

    # model, optimizer and learning-rate schedule
    cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=4 * args.digits + 4,
                    n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd)
    model = TinyGPT(cfg).to(args.device)
    optimizer = configure_optimizer(model, "adamw", lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, args.warmup_steps, args.max_steps))
    print(f"TinyGPT: {model.num_parameters():,} parameters on {args.device}; "
          f"{len(train_problems)} train / {len(eval_problems)} held-out {args.digits}-digit problems")

    def evaluate_fn():
        return {"loss": evaluate(model, val_loader, args.device),
                "accuracy": exact_match(model, eval_problems, tok, device=args.device)}

    start = time.perf_counter()
    record, eval_record = train(model, optimizer, scheduler, train_loader, evaluate_fn, args)
    train_seconds = time.perf_counter() - start

    # save the final model atomically: write a temporary file, then rename it into place
    path = os.path.join(args.out, "model.pt")
    torch.save({"model": model.state_dict(), "config": vars(cfg)}, path + ".tmp")
    os.replace(path + ".tmp", path)
    summary = {"eval_accuracy": eval_record["accuracy"], "eval_loss": eval_record["loss"],
               "final_loss": record["loss"], "steps": record["step"], "train_seconds": train_seconds,
               "parameters": model.num_parameters()}
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"held-out exact match {summary['eval_accuracy']:.3f} after {summary['steps']} steps "
          f"({train_seconds:.1f} s of training); wrote {args.out}/metrics.jsonl and summary.json")
    return summary


if __name__ == "__main__":
    main()

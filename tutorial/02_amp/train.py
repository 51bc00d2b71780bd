"""Chapter 02: chapter 01 plus mixed precision, gradient accumulation and gradient clipping.

--amp bf16|fp16 runs the forward pass under torch.autocast (fp16 with a GradScaler);
--grad-accum-steps K makes one optimizer step from K micro-batches of --batch-size, with the
loss normalized by the step's total target tokens; --max-grad-norm clips the gradient norm.

    python tutorial/02_amp/train.py --out runs/02_amp
"""
import argparse
import json
import math
import os
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from tqdm import tqdm

from reference.data import CharTokenizer, SFTCollator, SFTDataset, exact_match, make_addition_splits
from reference.model import GPTConfig, TinyGPT
from reference.optimizer import configure_optimizer


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Chapter 02: + mixed precision, accumulation, clipping.")
    p.add_argument("--out", default="runs/02_amp", help="where metrics.jsonl, summary.json and model.pt go")
    p.add_argument("--max-steps", type=int, default=800, help="optimizer steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--batch-size", type=int, default=256, help="the micro-batch")
    p.add_argument("--grad-accum-steps", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--amp", default="bf16", choices=["off", "bf16", "fp16"], help="autocast dtype")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="clip the gradient norm to this")
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
    for name in ("max_steps", "batch_size", "eval_every", "eval_size", "grad_accum_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.max_grad_norm <= 0:
        p.error("--max-grad-norm must be > 0")
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


def amp_dtype_for(amp, device):
    """The autocast dtype for --amp, or None for fp32. fp16 must actually work on the device."""
    if amp == "off":
        return None
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    try:
        with torch.autocast(device.type, dtype=dtype):
            x = torch.ones(2, 2, device=device)
            ok = (x @ x).dtype == dtype
    except (RuntimeError, AssertionError):
        ok = False
    if not ok:
        raise ValueError(f"--amp {amp} autocast is not supported on {device}; use --amp bf16 or off")
    return dtype


def autocast(device, dtype):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


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
def evaluate(model, loader, device, amp_dtype=None):
    model.eval()
    total, count = 0.0, 0
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast(device, amp_dtype):
            loss_sum, n = sft_loss_sum(model(batch["input_ids"], batch["attention_mask"]), batch["labels"])
        total, count = total + loss_sum.item(), count + n.item()
    model.train()
    return total / count


def train(model, optimizer, scheduler, train_loader, evaluate_fn, args):
    """The loop: forward, loss, backward, step. One metrics record per optimizer step, and an
    evaluation every --eval-every steps. Returns the last train and eval records.

    Each step accumulates gradients over K micro-batches. Every micro-batch's summed loss is
    divided by the target tokens of the whole step, so the step's gradient is that of one big
    batch, however unequal the micro-batches' lengths (a mean of per-micro-batch means is not)."""
    log = open(os.path.join(args.out, "metrics.jsonl"), "w")
    batches = forever(train_loader)
    # fp16 has too little range for small gradients: scale the loss up, and the gradients back down
    scaler = torch.amp.GradScaler(args.device.type, enabled=args.amp_dtype == torch.float16)
    skipped_steps = 0
    model.train()
    bar = tqdm(range(1, args.max_steps + 1), desc="train", disable=None)
    for step in bar:
        micro = [{k: v.to(args.device) for k, v in next(batches).items()} for _ in range(args.grad_accum_steps)]
        n_tokens = sum((batch["labels"][:, 1:] != -100).sum() for batch in micro)
        loss_sum = torch.zeros((), device=args.device)
        optimizer.zero_grad(set_to_none=True)
        for batch in micro:
            with autocast(args.device, args.amp_dtype):
                logits = model(batch["input_ids"], batch["attention_mask"])
                part, _ = sft_loss_sum(logits, batch["labels"])
            scaler.scale(part / n_tokens).backward()
            loss_sum += part.detach()
        loss = loss_sum / n_tokens
        if not torch.isfinite(loss) and not scaler.is_enabled():
            raise FloatingPointError(f"loss is {loss.item()} at step {step}; lower --lr")
        scaler.unscale_(optimizer)  # clip the true gradients, not the loss-scaled ones
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)  # the pre-clip norm
        lr = scheduler.get_last_lr()[0]
        scale_before = scaler.get_scale()
        scaler.step(optimizer)  # skips the step if any gradient is inf or NaN
        scaler.update()
        skipped_steps += scaler.get_scale() < scale_before  # a skipped step lowers the scale
        scheduler.step()

        record = {"step": step, "loss": loss.item(), "lr": lr, "grad_norm": grad_norm.item(),
                  "tokens": int(n_tokens), "skipped_steps": skipped_steps}
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
    args.amp_dtype = amp_dtype_for(args.amp, args.device)
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
        return {"loss": evaluate(model, val_loader, args.device, args.amp_dtype),
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

# Chapter 02's exercise: tutorial/02_amp/train.py with the places of the chapter's lesson left as
# TODOs. Each TODO is a `raise NotImplementedError("TODO 02.<name>: <what to write>")`; the
# docstrings and comments around it say what it must do. As it is, the script runs until it reaches
# the first one and stops there. Replace each with your code, then check yours against the
# reference, which names the lesson behind the first difference:
#
#     python -m reference.check 02 tutorial/02_amp/exercise.py
#
# The TODOs, in the order of the file:
#     02.autocast    the body of autocast()
#     02.counts      in train()
#     02.normalize   in train()
#     02.clip        in train()
#
# The solution is tutorial/02_amp/train.py. This file is written by `python
# tutorial/make_exercises.py` from the `# exercise` markers in train.py, and writing it again
# overwrites your work: fill in a copy if you want to keep this one.
# The TODOs leave names unset and imports unused, until you write them:
# ruff: noqa: F401, F821, F841
"""Chapter 02: chapter 01 plus mixed precision, gradient accumulation and gradient clipping.

--amp bf16|fp16 runs the forward pass under torch.autocast (fp16 with a GradScaler; the default,
auto, is bf16 on a GPU and fp32 on a CPU); --grad-accum-steps K makes one optimizer step from K
micro-batches of --batch-size, with the loss normalized by the step's total target tokens;
--max-grad-norm clips the gradient norm.

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
from reference.metrics import MetricsLog
from reference.model import GPTConfig, TinyGPT
from reference.runtime import resolve_amp_dtype, resolve_device


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Chapter 02: + mixed precision, accumulation, clips.")
    p.add_argument("--out", default="runs/02_amp", help="folder for metrics.jsonl, summary.json")
    p.add_argument("--max-steps", type=int, default=800, help="optimizer steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--batch-size", type=int, default=256, help="the micro-batch")
    p.add_argument("--grad-accum-steps", type=int, default=1, help="micro-batches per step")
    p.add_argument("--amp", default="auto", choices=["auto", "off", "bf16", "fp16"],
                   help="autocast dtype; auto: bf16 on a GPU, off (fp32) on a CPU")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="clip the gradient norm")
    p.add_argument("--lr", type=float, default=5e-3, help="peak learning rate")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--warmup-steps", type=int, default=30)
    p.add_argument("--digits", type=int, default=2, help="the task: a + b with a, b < 10**digits")
    p.add_argument("--eval-size", type=int, default=500, help="held-out problems, never trained on")
    p.add_argument("--eval-every", type=int, default=100, help="steps between evaluations")
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=64)
    args = p.parse_args(argv)
    for name in ("max_steps", "batch_size", "eval_every", "eval_size", "grad_accum_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.lr <= 0 or args.weight_decay < 0 or args.warmup_steps < 0:
        p.error("need --lr > 0, --weight-decay >= 0 and --warmup-steps >= 0")
    if args.max_grad_norm <= 0:
        p.error("--max-grad-norm must be > 0")
    return args


def autocast(device, dtype):  # exercise 02
    raise NotImplementedError(
        "TODO 02.autocast: torch.autocast(device.type, dtype=dtype) when dtype is not None, else a "
        "context that does nothing (nullcontext())")


def configure_optimizer(model, lr, weight_decay):  # exercise 01
    """AdamW with two parameter groups. Weight decay pulls weights towards zero; it goes on the
    matrices that mix features (linear layers). Biases and LayerNorm gains are left alone, and
    so are the embeddings here, a recipe choice (nanoGPT decays its token embedding)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay = [p for p in model.parameters() if p.dim() >= 2 and id(p) not in embeddings]
    no_decay = [p for p in model.parameters() if p.dim() < 2 or id(p) in embeddings]
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


def lr_multiplier(step, warmup_steps, max_steps, min_ratio=0.1):  # exercise 01
    """Linear warmup from 0, then cosine decay to min_ratio of the peak learning rate."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def sft_loss_sum(logits, labels):  # exercise 01
    """Summed next-token cross-entropy over the target tokens, and how many there are.

    The logits at position t predict the token at t+1, so labels shift left by one. Labels of
    -100 (prompt and padding) are ignored. The caller divides by the count, so that every
    target token weighs the same however the batch is padded."""
    logits, targets = logits[:, :-1, :], labels[:, 1:]
    loss_sum = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1),
                               ignore_index=-100, reduction="sum")
    return loss_sum, (targets != -100).sum()


def sft_loss(model, batch):
    """The loss summed over the batch's target tokens, and metrics as (sum, count): here the
    target tokens that the model already predicts (TRL's mean_token_accuracy)."""
    logits = model(batch["input_ids"], batch["attention_mask"])
    loss_sum, n = sft_loss_sum(logits, batch["labels"])
    right = (logits[:, :-1].argmax(dim=-1) == batch["labels"][:, 1:]).sum()  # -100 never matches
    return loss_sum, {"mean_token_accuracy": (right, n)}


def count_targets(batch):  # exercise 01
    """What the loss is averaged over, and how many tokens it trains: for SFT both are the
    target tokens (chapter 04's DPO averages over pairs instead)."""
    n = (batch["labels"][:, 1:] != -100).sum()
    return n, n


def forever(loader):
    """Batches without end: a fresh shuffle at every pass over the data."""
    while True:
        yield from loader


def to_device(batch, device):
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


@torch.no_grad()
def evaluate(model, loader, device, amp_dtype=None, loss_fn=sft_loss, count_fn=count_targets):
    """The mean loss over a held-out loader."""
    model.eval()  # dropout off: evaluation measures the model, not a random sub-network
    total, count = 0.0, 0
    for batch in loader:
        batch = to_device(batch, device)
        with autocast(device, amp_dtype):
            loss_sum, _ = loss_fn(model, batch)
        total, count = total + loss_sum.item(), count + count_fn(batch)[0].item()
    model.train()
    if count == 0:
        raise ValueError("the held-out set has no target tokens to score; check --eval-size")
    if not math.isfinite(total / count):
        raise FloatingPointError(f"the held-out loss is {total / count}; lower --lr")
    return total / count


def train(model, optimizer, scheduler, train_loader, evaluate_fn, args,
          loss_fn=sft_loss, count_fn=count_targets):
    """The loop: forward, loss, backward, step. One metrics record per optimizer step, and an
    evaluation every --eval-every steps. Returns the last train and eval records.

    loss_fn(model, batch) returns the loss summed over what count_fn(batch) counts, so the step's
    loss is a mean over target tokens however the batch is padded, and metrics as (sum, count).

    Each step accumulates gradients over K micro-batches. Every micro-batch's summed loss is
    divided by the target tokens of the whole step, so the step's gradient is that of one big
    batch, however unequal the micro-batches' lengths (a mean of per-micro-batch means is not)."""
    log = MetricsLog(args.out)  # metrics.jsonl, one JSON record a line, flushed as written
    batches = forever(train_loader)
    # fp16 has too little range for small gradients: scale the loss up, and the gradients back down
    scaler = torch.amp.GradScaler(args.device.type, enabled=args.amp_dtype == torch.float16)
    skipped_steps = skipped_in_a_row = 0
    model.train()
    bar = tqdm(range(1, args.max_steps + 1), desc="train", disable=None)
    for step in bar:
        micro = [to_device(next(batches), args.device) for _ in range(args.grad_accum_steps)]
        # the step's [loss count, tokens], known before any forward: every micro-batch divides by it
        raise NotImplementedError(
            "TODO 02.counts: the step's [loss count, tokens]: count_fn(batch) of every "
            "micro-batch, stacked and summed, before any forward (it sets counts)")
        loss_sum, sums = 0.0, {}
        optimizer.zero_grad(set_to_none=True)
        for batch in micro:
            with autocast(args.device, args.amp_dtype):
                part, metrics = loss_fn(model, batch)
            raise NotImplementedError(
                "TODO 02.normalize: backward this micro-batch's summed loss divided by the whole "
                "step's loss count, counts[0], through scaler.scale() (fp16's loss scaling)")
            loss_sum = loss_sum + part.detach()
            for name, (s, n) in metrics.items():  # summed over micro-batches, divided once
                total = torch.stack([s.detach().float(), torch.as_tensor(n).float()])
                sums[name] = sums.get(name, 0) + total
        # exercise 02: clip
        raise NotImplementedError(
            "TODO 02.clip: scaler.unscale_(optimizer) first, then torch.nn.utils.clip_grad_norm_ "
            "to args.max_grad_norm: its return value, the norm before clipping, is the logged "
            "grad_norm (it sets grad_norm)")
        # end exercise
        if not torch.isfinite(grad_norm) and not scaler.is_enabled():
            # stop before a NaN or inf reaches the weights (with fp16, the scaler skips the step)
            raise FloatingPointError(f"step {step}: the gradient norm is {grad_norm.item()}; "
                                     "lower --lr")
        lr = scheduler.get_last_lr()[0]
        scale_before = scaler.get_scale()
        scaler.step(optimizer)  # skips the step if any gradient is inf or NaN
        scaler.update()
        skipped = scaler.get_scale() < scale_before  # a skipped step lowers the scale
        skipped_steps += skipped
        skipped_in_a_row = skipped_in_a_row + 1 if skipped else 0
        if skipped_in_a_row == 10:  # not an overflow that a lower scale fixes: the run diverged
            raise FloatingPointError(f"step {step}: the last 10 steps had inf/NaN gradients at "
                                     "every loss scale and were skipped; lower --lr or use bf16")
        scheduler.step()

        record = {"step": step, "loss": float(loss_sum / counts[0]), "lr": lr,
                  "grad_norm": grad_norm.item(), "tokens": int(counts[1]),
                  "loss_count": int(counts[0])}
        record.update({name: float(s) / float(n) for name, (s, n) in sums.items()})
        if scaler.is_enabled():
            record["skipped_steps"] = skipped_steps
        log.write(record)
        bar.set_postfix(loss=f"{record['loss']:.4f}")
        if step % args.eval_every == 0 or step == args.max_steps:
            eval_record = {"step": step, "split": "eval", **evaluate_fn()}
            log.write(eval_record)
            tqdm.write(f"step {step}: train loss {record['loss']:.4f}, " + ", ".join(
                f"eval {k} {v:.4f}" for k, v in eval_record.items() if k not in ("step", "split")))
    log.close()
    return record, eval_record


def write_atomic(path, write):
    """Write a file under a temporary name, flush it to the disk, then rename it into place: a
    crash leaves the old file or the new one, never half of one. The temporary name starts with
    .tmp_, so a later run can tell a dead run's leftover; a failed write removes its own."""
    tmp = os.path.join(os.path.dirname(path), ".tmp_" + os.path.basename(path))
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    os.replace(tmp, path)


def main(argv=None):
    args = get_args(argv)
    args.device = resolve_device(args.device)
    args.amp_dtype = resolve_amp_dtype(args.device, amp_dtype=args.amp)  # auto: fp32 on CPU
    torch.manual_seed(args.seed)
    os.makedirs(args.out, exist_ok=True)

    # data: disjoint train and held-out problems, right-padded batches, labels only on the answer
    tok = CharTokenizer()
    train_problems, eval_problems = make_addition_splits(args.digits, args.eval_size,
                                                         seed=args.seed)
    collate = SFTCollator(tok.pad_id)
    train_loader = torch.utils.data.DataLoader(
        SFTDataset(train_problems, tok), batch_size=args.batch_size, shuffle=True,
        drop_last=True, collate_fn=collate, generator=torch.Generator().manual_seed(args.seed))
    val_loader = torch.utils.data.DataLoader(SFTDataset(eval_problems, tok), batch_size=256,
                                             collate_fn=collate)

    # model, optimizer and learning-rate schedule
    cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=4 * args.digits + 4,
                    n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd)
    model = TinyGPT(cfg).to(args.device)
    optimizer = configure_optimizer(model, lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, args.warmup_steps, args.max_steps))
    print(f"TinyGPT: {model.num_parameters():,} parameters on {args.device}; "
          f"{len(train_problems)} train / {len(eval_problems)} held-out problems")

    def evaluate_fn():
        return {"loss": evaluate(model, val_loader, args.device, args.amp_dtype),
                "accuracy": exact_match(model, eval_problems, tok, device=args.device)}

    start = time.perf_counter()
    record, eval_record = train(model, optimizer, scheduler, train_loader, evaluate_fn, args)
    train_seconds = time.perf_counter() - start

    write_atomic(os.path.join(args.out, "model.pt"),
                 lambda f: torch.save({"model": model.state_dict(), "config": vars(cfg)}, f))
    summary = {"eval_accuracy": eval_record["accuracy"], "eval_loss": eval_record["loss"],
               "final_loss": record["loss"], "steps": record["step"],
               "train_seconds": train_seconds, "parameters": model.num_parameters()}
    write_atomic(os.path.join(args.out, "summary.json"),
                 lambda f: f.write(json.dumps(summary, indent=2).encode()))
    print(f"held-out exact match {summary['eval_accuracy']:.3f} after {summary['steps']} steps "
          f"({train_seconds:.1f} s of training); wrote {args.out}/metrics.jsonl, summary.json")
    return summary


if __name__ == "__main__":
    main()

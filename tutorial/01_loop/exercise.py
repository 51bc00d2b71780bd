# Chapter 01's exercise: tutorial/01_loop/train.py with the places of the chapter's lesson left as
# TODOs. Each TODO is a `raise NotImplementedError("TODO 01.<name>: <what to write>")`; the
# docstrings and comments around it say what it must do. As it is, the script runs until it reaches
# the first one and stops there. Replace each with your code, then check yours against the
# reference, which names the lesson behind the first difference:
#
#     python -m reference.check 01 tutorial/01_loop/exercise.py
#
# The TODOs, in the order of the file:
#     01.configure_optimizer   the body of configure_optimizer()
#     01.lr_multiplier         the body of lr_multiplier()
#     01.sft_loss_sum          the body of sft_loss_sum()
#     01.count_targets         the body of count_targets()
#
# The solution is tutorial/01_loop/train.py. This file is written by `python
# tutorial/make_exercises.py` from the `# exercise` markers in train.py, and writing it again
# overwrites your work: fill in a copy if you want to keep this one.
# The TODOs leave names unset and imports unused, until you write them:
# ruff: noqa: F401, F821, F841
"""Chapter 01: the plain training loop.

Supervised fine-tuning (SFT) of a tiny GPT on n-digit addition ("12+34=" -> "46<eos>"): masked
next-token loss, AdamW with weight decay on the weight matrices only, linear warmup then cosine
decay, periodic evaluation, and one JSON record per optimizer step in DIR/metrics.jsonl.

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
from reference.metrics import MetricsLog
from reference.model import GPTConfig, TinyGPT
from reference.runtime import resolve_device


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Chapter 01: the plain training loop (SFT).")
    p.add_argument("--out", default="runs/01_loop", help="folder for metrics.jsonl, summary.json")
    p.add_argument("--max-steps", type=int, default=800, help="optimizer steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--batch-size", type=int, default=256)
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
    for name in ("max_steps", "batch_size", "eval_every", "eval_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.lr <= 0 or args.weight_decay < 0 or args.warmup_steps < 0:
        p.error("need --lr > 0, --weight-decay >= 0 and --warmup-steps >= 0")
    return args


def configure_optimizer(model, lr, weight_decay):  # exercise 01
    """AdamW with two parameter groups. Weight decay pulls weights towards zero; it goes on the
    matrices that mix features (linear layers). Biases and LayerNorm gains are left alone, and
    so are the embeddings here, a recipe choice (nanoGPT decays its token embedding)."""
    raise NotImplementedError(
        "TODO 01.configure_optimizer: AdamW(betas=(0.9, 0.95)) over two groups, in this order: "
        "weight_decay on the parameters of 2 or more dimensions that are not embeddings, 0.0 on "
        "the rest")


def lr_multiplier(step, warmup_steps, max_steps, min_ratio=0.1):  # exercise 01
    """Linear warmup from 0, then cosine decay to min_ratio of the peak learning rate."""
    raise NotImplementedError(
        "TODO 01.lr_multiplier: (step + 1) / warmup_steps while step < warmup_steps, then a cosine "
        "from 1 down to min_ratio at max_steps")


def sft_loss_sum(logits, labels):  # exercise 01
    """Summed next-token cross-entropy over the target tokens, and how many there are.

    The logits at position t predict the token at t+1, so labels shift left by one. Labels of
    -100 (prompt and padding) are ignored. The caller divides by the count, so that every
    target token weighs the same however the batch is padded."""
    raise NotImplementedError(
        "TODO 01.sft_loss_sum: logits[:, :-1] predict labels[:, 1:]: the cross-entropy in float32, "
        "summed over the targets that are not -100, and how many there are")


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
    raise NotImplementedError(
        "TODO 01.count_targets: the target tokens after the shift, (labels[:, 1:] != -100).sum(), "
        "are both the loss's count and the tokens")


def forever(loader):
    """Batches without end: a fresh shuffle at every pass over the data."""
    while True:
        yield from loader


def to_device(batch, device):
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


@torch.no_grad()
def evaluate(model, loader, device, loss_fn=sft_loss, count_fn=count_targets):
    """The mean loss over a held-out loader."""
    model.eval()  # dropout off: evaluation measures the model, not a random sub-network
    total, count = 0.0, 0
    for batch in loader:
        batch = to_device(batch, device)
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
    loss is a mean over target tokens however the batch is padded, and metrics as (sum, count)."""
    log = MetricsLog(args.out)  # metrics.jsonl, one JSON record a line, flushed as written
    batches = forever(train_loader)
    model.train()
    bar = tqdm(range(1, args.max_steps + 1), desc="train", disable=None)
    for step in bar:
        batch = to_device(next(batches), args.device)
        loss_count, tokens = count_fn(batch)
        loss_sum, metrics = loss_fn(model, batch)
        loss = loss_sum / loss_count
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.get_total_norm(
            [p.grad for p in model.parameters() if p.grad is not None])
        if not torch.isfinite(grad_norm):  # stop before a NaN or inf reaches the weights
            raise FloatingPointError(f"step {step}: the gradient norm is {grad_norm.item()} "
                                     f"(loss {loss.item()}); lower --lr")
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()

        record = {"step": step, "loss": loss.item(), "lr": lr, "grad_norm": grad_norm.item(),
                  "tokens": int(tokens), "loss_count": int(loss_count)}
        record.update({name: float(s) / float(n) for name, (s, n) in metrics.items()})
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
        return {"loss": evaluate(model, val_loader, args.device),
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

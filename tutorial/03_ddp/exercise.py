# Chapter 03's exercise: tutorial/03_ddp/train.py with the places of the chapter's lesson left as
# TODOs. Each TODO is a `raise NotImplementedError("TODO 03.<name>: <what to write>")`; the
# docstrings and comments around it say what it must do. As it is, the script runs until it reaches
# the first one and stops there. Replace each with your code, then check yours against the
# reference, which names the lesson behind the first difference:
#
#     python -m reference.check 03 tutorial/03_ddp/exercise.py
#
# The TODOs, in the order of the file:
#     03.setup_distributed   the body of setup_distributed()
#     03.forever             the body of forever()
#     03.sharded_loader      the body of sharded_loader()
#     03.save_checkpoint     the body of save_checkpoint()
#     03.load_latest         the body of load_latest()
#     03.checkpoint_state    the body of checkpoint_state()
#     03.resume              the body of resume()
#     03.factor              in train()
#     03.ddp                 in run()
#
# The solution is tutorial/03_ddp/train.py. This file is written by `python
# tutorial/make_exercises.py` from the `# exercise` markers in train.py, and writing it again
# overwrites your work: fill in a copy if you want to keep this one.
# The TODOs leave names unset and imports unused, until you write them:
# ruff: noqa: F401, F821, F841
"""Chapter 03: chapter 02 plus DDP under torchrun, checkpoints and exact resume.

The same file runs as one process or many: torchrun sets RANK, WORLD_SIZE and LOCAL_RANK, and
the script joins the process group (gloo on CPU, nccl on CUDA), wraps the model in DDP and
shards the data with a DistributedSampler. The loss is normalized by the global token count.
--save-every N writes DIR/checkpoints/step_XXXXXX/ atomically and with a checksum (rank 0
writes, every rank reads); --resume continues bit for bit from the newest checkpoint that
verifies. One run at a time may use DIR: rank 0 holds a lock on it.

    python tutorial/03_ddp/train.py --out runs/03_ddp
    torchrun --standalone --nproc_per_node=2 tutorial/03_ddp/train.py --out runs/03_ddp --resume
"""
import argparse
import hashlib
import io
import json
import math
import os
import shutil
import signal
import time
import warnings
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from reference.data import CharTokenizer, SFTCollator, SFTDataset, exact_match, make_addition_splits
from reference.metrics import MetricsLog, read_metrics
from reference.model import GPTConfig, TinyGPT
from reference.rundir import locked, remove_stale_temporaries
from reference.runtime import resolve_amp_dtype, resolve_device


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Chapter 03: + DDP, checkpoints and exact resume.")
    p.add_argument("--out", default="runs/03_ddp", help="folder for metrics.jsonl, summary.json")
    p.add_argument("--max-steps", type=int, default=800, help="optimizer steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--batch-size", type=int, default=256, help="the micro-batch, per process")
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
    p.add_argument("--save-every", type=int, default=200, help="steps between checkpoints")
    p.add_argument("--keep-last", type=int, default=2, help="checkpoints to keep")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest good checkpoint in DIR/checkpoints")
    p.add_argument("--crash-at-step", type=int, default=None,
                   help="a fault demo: the last rank SIGKILLs itself after this step, once")
    args = p.parse_args(argv)
    for name in ("max_steps", "batch_size", "eval_every", "eval_size", "grad_accum_steps",
                 "save_every", "keep_last"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.lr <= 0 or args.weight_decay < 0 or args.warmup_steps < 0:
        p.error("need --lr > 0, --weight-decay >= 0 and --warmup-steps >= 0")
    if args.max_grad_norm <= 0:
        p.error("--max-grad-norm must be > 0")
    return args


def setup_distributed(device):  # exercise 03
    """Join the process group if torchrun started us. Returns (rank, world_size, device)."""
    raise NotImplementedError(
        "TODO 03.setup_distributed: without torchrun (no RANK in os.environ): (0, 1, device); else "
        "RANK, WORLD_SIZE and LOCAL_RANK from os.environ, cuda:LOCAL_RANK on CUDA, and "
        "dist.init_process_group (nccl on CUDA, gloo on the CPU)")


def autocast(device, dtype):  # exercise 02
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


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


def forever(loader, position):  # exercise 03
    """Batches without end: a fresh shuffle at every pass over the data. `position` (epoch, and
    batches already taken in it) is kept up to date, so a resumed run skips exactly those."""
    raise NotImplementedError(
        "TODO 03.forever: before every pass loader.sampler.set_epoch(position['epoch']); skip the "
        "position['batch_in_epoch'] batches already taken; keep position up to date")


def to_device(batch, device):
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def sharded_loader(dataset, collate, args):  # exercise 03
    """This rank's own 1/world_size of every epoch (one process: the whole epoch), reshuffled at
    each epoch. The loader's own generator keeps epoch starts off the global RNG (exact resume)."""
    raise NotImplementedError(
        "TODO 03.sharded_loader: DistributedSampler(dataset, num_replicas=args.world_size, "
        "rank=args.rank, shuffle=True, seed=args.seed, drop_last=True) in a DataLoader of "
        "args.batch_size with its own torch.Generator().manual_seed(args.seed)")


def start_fresh(folder, args):
    """Rank 0, under the lock: remove what killed runs left half-written in folder and, unless
    resuming, an earlier run's checkpoints (or a later --resume could pick them up)."""
    checkpoints = os.path.join(folder, "checkpoints")
    if args.rank == 0:
        remove_stale_temporaries(folder, checkpoints)
        if not args.resume and os.path.isdir(checkpoints):
            print(f"starting fresh: removing the previous run's checkpoints in {checkpoints}")
            shutil.rmtree(checkpoints)


def rng_state():
    """The global RNG: a step's draws (dropout) and each evaluation loader's seed come from it."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(folder, step, state, keep_last):  # exercise 03
    """folder/step_XXXXXX/ with state.pt and its SHA-256. Both are written into a temporary
    folder, flushed to the disk, and only then is the folder renamed into place: a crash or a
    full disk mid-save leaves the previous checkpoint the newest complete one."""
    raise NotImplementedError(
        "TODO 03.save_checkpoint: torch.save(state) into folder/.tmp_step_XXXXXX/state.pt and its "
        "SHA-256 into state.pt.sha256 (write_atomic), then rename the folder to step_XXXXXX and "
        "delete all but the newest keep_last")


def load_latest(folder, keys):  # exercise 03
    """(path, state) of the newest checkpoint in folder that verifies: its checksum matches, it
    loads with weights_only=True (tensors and plain containers, never pickled code), and it has
    every one of keys. A damaged one is skipped with a warning that says why. (None, None) when
    there is no checkpoint; an error when there are some and none verifies."""
    raise NotImplementedError(
        "TODO 03.load_latest: newest first, the first checkpoint whose state.pt matches its "
        ".sha256, loads with torch.load(weights_only=True) and has every key; warn and skip a bad "
        "one")


CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "scaler", "step", "epoch", "batch_in_epoch",
                   "skipped_steps", "world_size", "rng")


def checkpoint_state(model, optimizer, scheduler, scaler, progress, args):  # exercise 03
    """Everything a bitwise resume needs. Every rank's RNG states go in: ranks draw differently."""
    raise NotImplementedError(
        "TODO 03.checkpoint_state: the model's, optimizer's, scheduler's and scaler's "
        "state_dict(), the progress, args.world_size, and every rank's rng_state() "
        "(dist.all_gather_object)")


def resume(model, optimizer, scheduler, scaler, progress, args):  # exercise 03
    """Load the newest checkpoint that verifies (every rank reads it). Returns its step, or 0."""
    raise NotImplementedError(
        "TODO 03.resume: load_latest(); refuse another world size; load the model, optimizer, "
        "scheduler and scaler, copy the progress, set_rng_state(this rank's); return the step")


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
    batch, however unequal the micro-batches' lengths (a mean of per-micro-batch means is not).
    Under DDP the counts are summed over ranks too, and since DDP averages gradients over the
    world_size ranks, each rank's loss is multiplied by world_size to turn that mean into a sum."""
    raw_model = model.module if isinstance(model, DDP) else model
    # fp16 has too little range for small gradients: scale the loss up, and the gradients back down
    scaler = torch.amp.GradScaler(args.device.type, enabled=args.amp_dtype == torch.float16)
    progress = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "skipped_steps": 0}
    resumed_step = resume(raw_model, optimizer, scheduler, scaler, progress, args) \
        if args.resume else 0
    # rank 0 writes the log; a resume keeps the records up to its checkpoint (rewritten whole)
    log = MetricsLog(args.out, args.rank == 0, truncate_after=resumed_step or None)
    path, record, eval_record = os.path.join(args.out, "metrics.jsonl"), None, None
    if resumed_step and args.rank == 0:  # what a finished run reports when nothing is left
        record, eval_record = ((read_metrics(path, split) or [None])[-1]
                               for split in ("train", "eval"))
    batches = forever(train_loader, progress)
    skipped_steps, skipped_in_a_row = progress["skipped_steps"], 0
    model.train()
    bar = tqdm(range(resumed_step + 1, args.max_steps + 1), desc="train",
               disable=None if args.rank == 0 else True)
    for step in bar:
        micro = [to_device(next(batches), args.device) for _ in range(args.grad_accum_steps)]
        # the step's [loss count, tokens], known before any forward: every micro-batch divides by
        # it. Summed over ranks by an all-reduce that runs while the first forward does
        counts = sum(torch.stack(count_fn(batch)) for batch in micro)  # exercise 02: counts
        counting = dist.all_reduce(counts, async_op=True) if args.world_size > 1 else None
        loss_sum, sums = 0.0, {}
        optimizer.zero_grad(set_to_none=True)
        for i, batch in enumerate(micro):
            # all-reduce gradients only after the last micro-batch: the others just accumulate
            last = i == len(micro) - 1
            with model.no_sync() if args.world_size > 1 and not last else nullcontext():
                with autocast(args.device, args.amp_dtype):
                    part, metrics = loss_fn(model, batch)
                if counting is not None:
                    counting.wait()  # the global counts, needed from here on
                raise NotImplementedError(
                    "TODO 03.factor: backward the micro-batch's summed loss times args.world_size "
                    "/ the step's global count, through scaler.scale(): DDP averages the gradients "
                    "over the ranks")
            loss_sum = loss_sum + part.detach()
            for name, (s, n) in metrics.items():  # summed over micro-batches, divided once
                total = torch.stack([s.detach().float(), torch.as_tensor(n).float()])
                sums[name] = sums.get(name, 0) + total
        # everything logged, summed over ranks by one all-reduce that runs during the update
        logged = torch.cat([loss_sum.reshape(1), *sums.values()])
        logging = dist.all_reduce(logged, async_op=True) if args.world_size > 1 else None
        # exercise 02: clip
        scaler.unscale_(optimizer)  # clip the true gradients, not the loss-scaled ones
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
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
        progress["step"], progress["skipped_steps"] = step, skipped_steps

        if logging is not None:
            logging.wait()
        record = {"step": step, "loss": float(logged[0] / counts[0]), "lr": lr,
                  "grad_norm": grad_norm.item(), "tokens": int(counts[1]),
                  "loss_count": int(counts[0])}
        record.update({name: float(s) / float(n)
                       for name, (s, n) in zip(sums, logged[1:].view(-1, 2))})
        if scaler.is_enabled():
            record["skipped_steps"] = skipped_steps
        log.write(record)
        bar.set_postfix(loss=f"{record['loss']:.4f}")
        if step % args.eval_every == 0 or step == args.max_steps:
            eval_record = {"step": step, "split": "eval", **evaluate_fn()}
            log.write(eval_record)
            if args.rank == 0:
                tqdm.write(f"step {step}: train loss {record['loss']:.4f}, " + ", ".join(
                    f"eval {k} {v:.4f}" for k, v in eval_record.items()
                    if k not in ("step", "split")))
        if step % args.save_every == 0 or step == args.max_steps:
            state = checkpoint_state(raw_model, optimizer, scheduler, scaler, progress, args)
            if args.rank == 0:
                save_checkpoint(os.path.join(args.out, "checkpoints"), step, state, args.keep_last)
            if args.world_size > 1:
                dist.barrier()  # nobody runs ahead while the checkpoint is being written
        if step == args.crash_at_step and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0" \
                and args.rank == args.world_size - 1:
            os.kill(os.getpid(), signal.SIGKILL)  # a hard crash: no cleanup, no goodbye
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
    args.rank, args.world_size, args.device = setup_distributed(resolve_device(args.device))
    os.makedirs(args.out, exist_ok=True)
    try:
        # one run per folder: rank 0, the writer, holds a lock on --out for the whole run
        with locked(args.out if args.rank == 0 else None):
            summary = run(args)
    except BaseException:
        if dist.is_initialized():
            dist.destroy_process_group()  # no barrier: the other ranks may be gone
        raise
    if dist.is_initialized():
        dist.barrier()  # leave together, or a rank still talking to us sees a broken connection
        dist.destroy_process_group()
    return summary


def run(args):
    args.amp_dtype = resolve_amp_dtype(args.device, amp_dtype=args.amp)  # auto: fp32 on CPU
    torch.manual_seed(args.seed)
    start_fresh(args.out, args)

    # data: disjoint train and held-out problems, right-padded batches, labels only on the answer
    tok = CharTokenizer()
    train_problems, eval_problems = make_addition_splits(args.digits, args.eval_size,
                                                         seed=args.seed)
    collate = SFTCollator(tok.pad_id)
    train_loader = sharded_loader(SFTDataset(train_problems, tok), collate, args)
    val_loader = torch.utils.data.DataLoader(SFTDataset(eval_problems, tok), batch_size=256,
                                             collate_fn=collate)

    # model, optimizer and learning-rate schedule
    cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=4 * args.digits + 4,
                    n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd)
    model = TinyGPT(cfg).to(args.device)
    optimizer = configure_optimizer(model, lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, args.warmup_steps, args.max_steps))
    if args.rank == 0:
        print(f"TinyGPT: {model.num_parameters():,} parameters on {args.device} x "
              f"{args.world_size} process(es); {len(train_problems)} train / "
              f"{len(eval_problems)} held-out problems")
    # DDP broadcasts rank 0's weights at construction and all-reduces gradients in backward
    raise NotImplementedError(
        "TODO 03.ddp: the model wrapped in DDP when there are 2 or more processes "
        "(it broadcasts rank 0's weights and all-reduces the gradients); one process trains the "
        "model itself (it sets train_model)")

    def evaluate_fn():
        return {"loss": evaluate(model, val_loader, args.device, args.amp_dtype),
                "accuracy": exact_match(model, eval_problems, tok, device=args.device)}

    start = time.perf_counter()
    record, eval_record = train(train_model, optimizer, scheduler, train_loader, evaluate_fn, args)
    train_seconds = time.perf_counter() - start
    if args.rank != 0:  # only rank 0 writes files
        return None

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

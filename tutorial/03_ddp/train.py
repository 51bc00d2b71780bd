"""Chapter 03: chapter 02 plus DDP under torchrun, checkpoints and exact resume.

The same file runs as one process or many: torchrun sets RANK, WORLD_SIZE and LOCAL_RANK, and
the script joins the process group (gloo on CPU, nccl on CUDA), wraps the model in DDP and
shards the data with a DistributedSampler. The loss is normalized by the global token count.
--save-every N writes DIR/checkpoints/step_XXXXXX/ atomically (rank 0 writes, every rank
reads); --resume continues bit for bit from the newest good checkpoint.

    python tutorial/03_ddp/train.py --out runs/03_ddp
    torchrun --standalone --nproc_per_node=2 tutorial/03_ddp/train.py --out runs/03_ddp --resume
"""
import argparse
import json
import math
import os
import shutil
import signal
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from reference.checkpoint import load_latest, rng_state, save_checkpoint, set_rng_state
from reference.data import CharTokenizer, SFTCollator, SFTDataset, exact_match, make_addition_splits
from reference.model import GPTConfig, TinyGPT
from reference.optimizer import configure_optimizer


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Chapter 03: + DDP, checkpoints and exact resume.")
    p.add_argument("--out", default="runs/03_ddp", help="where metrics.jsonl, summary.json and model.pt go")
    p.add_argument("--max-steps", type=int, default=800, help="optimizer steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--batch-size", type=int, default=256, help="the micro-batch, per process")
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
    p.add_argument("--save-every", type=int, default=200, help="steps between checkpoints")
    p.add_argument("--keep-last", type=int, default=2, help="checkpoints to keep")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in DIR/checkpoints (starts fresh if none)")
    p.add_argument("--crash-at-step", type=int, default=None,
                   help="fault-tolerance demo: the last rank SIGKILLs itself after this step (first attempt only)")
    args = p.parse_args(argv)
    for name in ("max_steps", "batch_size", "eval_every", "eval_size", "grad_accum_steps", "save_every", "keep_last"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.max_grad_norm <= 0:
        p.error("--max-grad-norm must be > 0")
    return args


def setup_distributed(device):
    """Join the process group if torchrun started us. Returns (rank, world_size, device)."""
    if "RANK" not in os.environ:
        return 0, 1, device
    rank, world_size, local_rank = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return rank, world_size, device


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


def forever(loader, position):
    """Batches without end: a fresh shuffle at every pass over the data. `position` (epoch, and
    batches already taken in it) is kept up to date, so a resumed run skips exactly those."""
    while True:
        loader.sampler.set_epoch(position["epoch"])  # the shuffle is a function of (seed, epoch)
        for i, batch in enumerate(loader):
            if i >= position["batch_in_epoch"]:
                position["batch_in_epoch"] = i + 1
                yield batch
        position["epoch"], position["batch_in_epoch"] = position["epoch"] + 1, 0


def checkpoint_state(model, optimizer, scheduler, scaler, progress, args):
    """Everything a bitwise resume needs. Every rank's RNG states go in: ranks draw differently."""
    rngs = [rng_state()]
    if args.world_size > 1:
        rngs = [None] * args.world_size
        dist.all_gather_object(rngs, rng_state())
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), **progress,
            "world_size": args.world_size, "rng": rngs}


def resume(model, optimizer, scheduler, scaler, progress, args):
    """Load the newest checkpoint that loads (every rank reads it). Returns its step, or 0."""
    path, state = load_latest(os.path.join(args.out, "checkpoints"))
    if state is None:
        if args.rank == 0:
            print("--resume: no checkpoint yet, starting fresh")
        return 0
    if state["world_size"] != args.world_size:
        raise ValueError(f"{path} was written by {state['world_size']} process(es), this run has "
                         f"{args.world_size}: the data shards and RNG streams depend on it. Resume "
                         f"with --nproc_per_node={state['world_size']}, or start fresh without --resume")
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise ValueError(f"{path} does not fit this model (different --n-layer/--n-embd?): {err}") from None
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    for key in progress:
        progress[key] = state[key]
    set_rng_state(state["rng"][args.rank])
    if args.rank == 0:
        print(f"resumed from {path}")
    return state["step"]


def open_log(args, resumed_step):
    """metrics.jsonl, written by rank 0 only. A resumed run keeps the records up to its
    checkpoint and drops the later ones, which it is about to redo."""
    if args.rank != 0:
        return open(os.devnull, "w")
    path = os.path.join(args.out, "metrics.jsonl")
    kept = []
    if resumed_step and os.path.exists(path):
        with open(path) as f:
            kept = [line for line in f if line.strip() and json.loads(line)["step"] <= resumed_step]
    log = open(path, "w")
    log.writelines(kept)
    return log


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
    batch, however unequal the micro-batches' lengths (a mean of per-micro-batch means is not).
    Under DDP the count is summed over ranks too, and since DDP averages gradients over the
    world_size ranks, each rank's loss is multiplied by world_size to turn that mean into a sum."""
    raw_model = model.module if isinstance(model, DDP) else model
    # fp16 has too little range for small gradients: scale the loss up, and the gradients back down
    scaler = torch.amp.GradScaler(args.device.type, enabled=args.amp_dtype == torch.float16)
    progress = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "skipped_steps": 0}
    resumed_step = resume(raw_model, optimizer, scheduler, scaler, progress, args) if args.resume else 0
    log = open_log(args, resumed_step)
    batches = forever(train_loader, progress)
    skipped_steps = progress["skipped_steps"]
    model.train()
    bar = tqdm(range(resumed_step + 1, args.max_steps + 1), desc="train", disable=None if args.rank == 0 else True)
    for step in bar:
        micro = [{k: v.to(args.device) for k, v in next(batches).items()} for _ in range(args.grad_accum_steps)]
        n_tokens = sum((batch["labels"][:, 1:] != -100).sum() for batch in micro)
        if args.world_size > 1:
            dist.all_reduce(n_tokens)  # the global count: every rank divides by the same number
        loss_sum = torch.zeros((), device=args.device)
        optimizer.zero_grad(set_to_none=True)
        for i, batch in enumerate(micro):
            # all-reduce gradients only after the last micro-batch: the others just accumulate
            last = i == len(micro) - 1
            with model.no_sync() if args.world_size > 1 and not last else nullcontext():
                with autocast(args.device, args.amp_dtype):
                    logits = model(batch["input_ids"], batch["attention_mask"])
                    part, _ = sft_loss_sum(logits, batch["labels"])
                scaler.scale(part * args.world_size / n_tokens).backward()
            loss_sum += part.detach()
        if args.world_size > 1:
            dist.all_reduce(loss_sum)
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
        progress["step"], progress["skipped_steps"] = step, skipped_steps

        record = {"step": step, "loss": loss.item(), "lr": lr, "grad_norm": grad_norm.item(),
                  "tokens": int(n_tokens), "skipped_steps": skipped_steps}
        log.write(json.dumps(record) + "\n")
        bar.set_postfix(loss=f"{record['loss']:.4f}")
        if step % args.eval_every == 0 or step == args.max_steps:
            eval_record = {"step": step, "split": "eval", **evaluate_fn()}
            log.write(json.dumps(eval_record) + "\n")
            if args.rank == 0:
                tqdm.write(f"step {step}: train loss {record['loss']:.4f}, "
                           + ", ".join(f"eval {k} {v:.4f}" for k, v in eval_record.items() if k not in ("step", "split")))
        if step % args.save_every == 0 or step == args.max_steps:
            state = checkpoint_state(raw_model, optimizer, scheduler, scaler, progress, args)
            if args.rank == 0:
                log.flush()  # the records up to this checkpoint must survive a crash
                save_checkpoint(os.path.join(args.out, "checkpoints"), step, state, keep_last=args.keep_last)
            if args.world_size > 1:
                dist.barrier()  # nobody runs ahead while the checkpoint is being written
        if step == args.crash_at_step and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0" \
                and args.rank == args.world_size - 1:
            os.kill(os.getpid(), signal.SIGKILL)  # a hard crash: no cleanup, no goodbye
    log.close()
    if resumed_step >= args.max_steps:  # resumed from the final checkpoint: nothing left to do
        return None, None
    return record, eval_record


def main(argv=None):
    args = get_args(argv)
    args.rank, args.world_size, args.device = setup_distributed(pick_device(args.device))
    try:
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
    args.amp_dtype = amp_dtype_for(args.amp, args.device)
    torch.manual_seed(args.seed)
    os.makedirs(args.out, exist_ok=True)
    if not args.resume and args.rank == 0 and os.path.isdir(os.path.join(args.out, "checkpoints")):
        print(f"starting fresh: removing the previous run's checkpoints in {args.out}/checkpoints")
        shutil.rmtree(os.path.join(args.out, "checkpoints"))  # or a later --resume could pick them up

    # data: disjoint train and held-out problems, right-padded batches, labels only on the answer
    tok = CharTokenizer()
    train_problems, eval_problems = make_addition_splits(args.digits, args.eval_size, seed=args.seed)
    collate = SFTCollator(tok.pad_id)
    # each rank trains on its own 1/world_size of every epoch (one process: the whole epoch);
    # the loader's own generator keeps epoch starts from drawing on the global RNG (exact resume)
    train_set = SFTDataset(train_problems, tok)
    sampler = DistributedSampler(train_set, num_replicas=args.world_size, rank=args.rank, shuffle=True,
                                 seed=args.seed, drop_last=True)
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, sampler=sampler,
                                               drop_last=True, collate_fn=collate,
                                               generator=torch.Generator().manual_seed(args.seed))
    val_loader = torch.utils.data.DataLoader(SFTDataset(eval_problems, tok), batch_size=256, collate_fn=collate)
    if len(train_loader) == 0:  # or forever() would spin without end
        raise ValueError(f"each of the {args.world_size} process(es) gets {len(sampler)} training problems, "
                         f"fewer than one --batch-size {args.batch_size}; lower --batch-size")

    # model, optimizer and learning-rate schedule
    cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=4 * args.digits + 4,
                    n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd)
    model = TinyGPT(cfg).to(args.device)
    optimizer = configure_optimizer(model, "adamw", lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, args.warmup_steps, args.max_steps))
    if args.rank == 0:
        print(f"TinyGPT: {model.num_parameters():,} parameters on {args.device} x {args.world_size} "
              f"process(es); {len(train_problems)} train / {len(eval_problems)} held-out problems")
    # DDP broadcasts rank 0's weights at construction and all-reduces gradients in backward
    train_model = DDP(model) if args.world_size > 1 else model

    def evaluate_fn():
        return {"loss": evaluate(model, val_loader, args.device, args.amp_dtype),
                "accuracy": exact_match(model, eval_problems, tok, device=args.device)}

    start = time.perf_counter()
    record, eval_record = train(train_model, optimizer, scheduler, train_loader, evaluate_fn, args)
    train_seconds = time.perf_counter() - start
    if record is None:
        if args.rank == 0:
            print(f"the newest checkpoint is already at --max-steps {args.max_steps}: nothing to do")
        with open(os.path.join(args.out, "summary.json")) as f:
            return json.load(f)
    if args.rank != 0:  # only rank 0 writes files
        return None

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

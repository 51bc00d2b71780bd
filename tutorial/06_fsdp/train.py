"""Chapter 06: chapter 03 with FSDP2 in place of DDP, and sharded (DCP) checkpoints.

DDP keeps a whole copy of the weights, gradients and AdamW moments on every rank. FSDP2 shards
each of them: fully_shard() on every transformer block, then on the root, leaves each rank 1/N
of every parameter (a DTensor); a block's full weights are all-gathered just before its forward
and backward and freed after, and gradients are reduce-scattered, so each rank keeps and updates
only its own shard. Gradient clipping takes the global norm across ranks. One process is a
valid 1-rank FSDP run: it creates a process group of its own (FSDP needs one).

--save-every N writes DIR/checkpoints/step_XXXXXX/ with torch.distributed.checkpoint (DCP):
every rank writes its own shard, nothing is gathered onto rank 0, and rank 0 renames the folder
into place once every rank is done. DCP reshards on load, so a run saved by 2 processes resumes
with 1 and the other way round, keeping the global batch: the data position is a global sample
count. With the same world size the resumed run is bitwise the uninterrupted one.

    python tutorial/06_fsdp/train.py --out runs/06_fsdp
    torchrun --standalone --nproc_per_node=2 tutorial/06_fsdp/train.py --out runs/06_fsdp
    python tutorial/06_fsdp/train.py --out runs/06_fsdp --batch-size 512 --resume  # 2 -> 1
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
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch.distributed._composable import checkpoint as activation_checkpointing
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_state_dict, set_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from reference.data import CharTokenizer, SFTCollator, SFTDataset, exact_match, make_addition_splits
from reference.metrics import MetricsLog, read_metrics
from reference.model import GPTConfig, TinyGPT
from reference.rundir import locked, remove_stale_temporaries
from reference.runtime import resolve_amp_dtype, resolve_device


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Chapter 06: chapter 03 with FSDP2 and DCP.")
    p.add_argument("--out", default="runs/06_fsdp", help="folder for metrics.jsonl, summary.json")
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
    p.add_argument("--mixed-precision", default="off", choices=["off", "bf16"],
                   help="FSDP's own mixed precision in place of autocast: bf16 parameters in "
                        "forward and backward, gradients reduced in fp32")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="keep only each block's input; recompute its activations in backward")
    args = p.parse_args(argv)
    for name in ("max_steps", "batch_size", "eval_every", "eval_size", "grad_accum_steps",
                 "save_every", "keep_last"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.lr <= 0 or args.weight_decay < 0 or args.warmup_steps < 0:
        p.error("need --lr > 0, --weight-decay >= 0 and --warmup-steps >= 0")
    if args.max_grad_norm <= 0:
        p.error("--max-grad-norm must be > 0")
    if args.mixed_precision == "bf16" and args.amp not in ("auto", "off"):
        p.error("--mixed-precision bf16 replaces autocast: use it with --amp off")
    return args


def setup_distributed(device):  # exercise 03
    """Join torchrun's process group, or, as one process, make a group of one: FSDP shards over a
    process group even when it has one rank. Returns (rank, world_size, device)."""
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"FSDP needs a process group backend for {device.type}: there is gloo "
                         "for CPU and nccl for CUDA; use --device cpu or cuda")
    if "RANK" not in os.environ:  # no torchrun: an in-memory store, no port to open
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                store=dist.HashStore(), rank=0, world_size=1)
        return 0, 1, device
    rank, world_size, local_rank = (int(os.environ[k])
                                    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return rank, world_size, device


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


def forever(loader, position, samples_per_batch):  # exercise 06
    """Batches without end: a fresh shuffle at every pass over the data. `position` (epoch, and
    samples all ranks together took from it) is kept up to date, so a resumed run skips exactly
    those, whatever its world size: the epoch's order is one permutation for every world size,
    of which each rank takes every world_size-th sample, so one batch on every rank takes the
    next samples_per_batch = world_size * batch_size samples of it."""
    while True:
        loader.sampler.set_epoch(position["epoch"])  # the shuffle is a function of (seed, epoch)
        for i, batch in enumerate(loader):
            if i >= position["sample_in_epoch"] // samples_per_batch:
                position["sample_in_epoch"] = (i + 1) * samples_per_batch
                yield batch
        position["epoch"], position["sample_in_epoch"] = position["epoch"] + 1, 0


def to_device(batch, device):
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def sharded_loader(dataset, collate, args):  # exercise 03
    """This rank's own 1/world_size of every epoch (one process: the whole epoch), reshuffled at
    each epoch. The loader's own generator keeps epoch starts off the global RNG (exact resume)."""
    sampler = DistributedSampler(dataset, num_replicas=args.world_size, rank=args.rank,
                                 shuffle=True, seed=args.seed, drop_last=True)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size, sampler=sampler, drop_last=True, collate_fn=collate,
        generator=torch.Generator().manual_seed(args.seed))
    if len(loader) == 0:  # or forever() would spin without end
        raise ValueError(f"each of the {args.world_size} process(es) gets {len(sampler)} training "
                         f"items, fewer than one --batch-size {args.batch_size}; lower it")
    return loader


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


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_checkpoint(folder, step, state, args):  # exercise 06
    """folder/step_XXXXXX/, written by every rank: DCP puts each rank's shard of the model and
    optimizer state in its own file (__RANK_0.distcp) and an index of which slice of which tensor
    is where (.metadata); rank 0 adds trainer.pt, the small rest of the state, and sha256.json,
    the checksum of every file, each taken by the rank that wrote it. All of it goes into a
    temporary folder that rank 0 renames into place once every rank is done: a crash or a full
    disk mid-save leaves the previous checkpoint the newest complete one."""
    final = os.path.join(folder, f"step_{step:06d}")
    tmp = os.path.join(folder, f".tmp_step_{step:06d}")
    sharded = {key: state.pop(key) for key in ("model", "optimizer")}
    try:
        dcp.save(sharded, checkpoint_id=tmp)  # returns once every rank has written its shard
        mine = [name for name in os.listdir(tmp) if name.startswith(f"__{args.rank}_")]
        if args.rank == 0:
            buffer = io.BytesIO()
            torch.save(state, buffer)
            write_atomic(os.path.join(tmp, "trainer.pt"), lambda f: f.write(buffer.getvalue()))
            mine += [".metadata", "trainer.pt"]
        digests = {name: sha256(os.path.join(tmp, name)) for name in mine}
    except (OSError, dcp.CheckpointException) as err:  # most often a full disk
        digests = f"rank {args.rank}: {err}"
    everyone = [None] * args.world_size
    dist.all_gather_object(everyone, digests)  # so that all ranks fail together, or none
    failed = [d for d in everyone if isinstance(d, str)]
    if failed:
        if args.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(f"could not write a checkpoint in {folder} ({failed[0]}); "
                      "the previous checkpoint is intact") from None
    if args.rank == 0:
        digests = dict(sorted(item for d in everyone for item in d.items()))
        write_atomic(os.path.join(tmp, "sha256.json"),
                     lambda f: f.write(json.dumps(digests, indent=1).encode()))
        shutil.rmtree(final, ignore_errors=True)  # the same step saved again after a fallback
        os.replace(tmp, final)
        names = sorted(n for n in os.listdir(folder) if n.startswith("step_"))
        for name in names[:-args.keep_last]:
            shutil.rmtree(os.path.join(folder, name))


def load_latest(folder, keys, args):
    """(path, state) of the newest checkpoint that verifies: every file that sha256.json lists
    has its checksum (each rank checks its share of the files, and the ranks agree), and
    trainer.pt loads with weights_only=True and has every one of keys. A damaged one is skipped
    with a warning that says why. (None, None) when there is no checkpoint; an error when there
    are some and none verifies. resume() then reads the shards; DCP's index (.metadata) and its
    few non-tensor entries are pickles, so resume only from checkpoints you trust."""
    names = sorted(n for n in os.listdir(folder) if n.startswith("step_")) \
        if os.path.isdir(folder) else []
    for name in reversed(names):
        path = os.path.join(folder, name)
        if os.path.exists(os.path.join(path, "state.pt")):  # not damage: another kind of run
            raise ValueError(f"{path} holds state.pt, a chapter 03 (DDP) checkpoint: the whole "
                             "state in one file from rank 0. This chapter resumes from sharded "
                             "DCP checkpoints (.metadata and a __RANK_0.distcp per rank): "
                             "resume it with tutorial/03_ddp/train.py, or use another --out")
        error, state = None, None
        try:
            with open(os.path.join(path, "sha256.json")) as f:
                digests = json.load(f)
            for file in sorted(digests)[args.rank::args.world_size]:
                if sha256(os.path.join(path, file)) != digests[file]:
                    raise ValueError(f"the checksum of {file} does not match: it is damaged")
            state = torch.load(os.path.join(path, "trainer.pt"), map_location="cpu",
                               weights_only=True)
            missing = [key for key in keys if key not in state]
            if missing:
                raise ValueError(f"it has no {missing}")
        except Exception as err:  # noqa: BLE001 - anything unreadable means "try the one before"
            error = err
            warnings.warn(f"skipping checkpoint {path}: {err}", stacklevel=2)
        verified = torch.tensor(int(error is None), device=args.device)
        dist.all_reduce(verified, op=dist.ReduceOp.MIN)  # every rank takes the same checkpoint
        if verified:
            return path, state
        if error is None:
            warnings.warn(f"skipping checkpoint {path}: another rank found it damaged",
                          stacklevel=2)
    if names:
        raise ValueError(f"no checkpoint in {folder} could be loaded (see the warnings above); "
                         "start fresh without --resume")
    return None, None


CHECKPOINT_KEYS = ("scheduler", "scaler", "step", "epoch", "sample_in_epoch", "skipped_steps",
                   "world_size", "global_batch", "rng")  # trainer.pt's; the shards hold the rest


def checkpoint_state(model, optimizer, scheduler, scaler, progress, args):  # exercise 06
    """Everything a bitwise resume needs. The model and optimizer states are this rank's shards
    (DTensors), named by parameter, not by position, so that any world size can read them back.
    Every rank's RNG states go in: ranks draw differently."""
    rngs = [rng_state()]
    if args.world_size > 1:
        rngs = [None] * args.world_size
        dist.all_gather_object(rngs, rng_state())
    model_state, optimizer_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optimizer_state,
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), **progress,
            "world_size": args.world_size, "rng": rngs,
            "global_batch": args.world_size * args.batch_size * args.grad_accum_steps}


def check_fits(path, model_state):
    """A clear error, before anything is read, when the checkpoint holds another model."""
    index = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    saved = {k[len("model."):]: list(v.size) for k, v in index.items() if k.startswith("model.")}
    here = {k: list(v.shape) for k, v in model_state.items()}
    differ = sorted(k for k in saved.keys() | here.keys() if saved.get(k) != here.get(k))
    if differ:
        raise ValueError(f"{path} does not fit this model (another --n-layer/--n-embd?): " +
                         "; ".join(f"{k} is {saved.get(k, 'missing')} there and "
                                   f"{here.get(k, 'missing')} here" for k in differ[:3]))


def resume(model, optimizer, scheduler, scaler, progress, args):  # exercise 06
    """Load the newest checkpoint that verifies. Each rank reads, from whichever files hold
    them, the slices that make up its shards now: DCP reshards, so the world size may change.
    The step's global batch may not, nor may the data position fall mid-batch. Returns the
    checkpoint's step, or 0."""
    path, state = load_latest(os.path.join(args.out, "checkpoints"), CHECKPOINT_KEYS, args)
    if state is None:
        if args.rank == 0:
            print("--resume: no checkpoint yet, starting fresh")
        return 0
    global_batch, per_batch = (args.world_size * args.batch_size * args.grad_accum_steps,
                               args.world_size * args.batch_size)
    if state["global_batch"] != global_batch:  # the schedule and data position count in it
        per_rank, rest = divmod(state["global_batch"], args.world_size)
        fix = f"pick --batch-size x --grad-accum-steps = {per_rank}" if not rest else \
            f"it does not split over {args.world_size} processes"
        raise ValueError(f"{path} trained on {state['global_batch']} sequences per step "
                         f"({state['world_size']} process(es) x --batch-size x "
                         f"--grad-accum-steps), this run on {args.world_size} x {args.batch_size}"
                         f" x {args.grad_accum_steps} = {global_batch}. Keep the global batch: "
                         f"with {args.world_size} process(es), {fix}")
    if state["sample_in_epoch"] % per_batch:
        raise ValueError(f"{path} stopped {state['sample_in_epoch']} samples into its epoch, not "
                         f"a whole number of this run's {per_batch} (processes x --batch-size) "
                         "per batch; pick a --batch-size that divides it")
    model_state, optimizer_state = get_state_dict(model, optimizer)
    check_fits(path, model_state)
    sharded = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(sharded, checkpoint_id=path)  # in place: each rank reads only what it holds
    set_state_dict(model, optimizer, model_state_dict=sharded["model"],
                   optim_state_dict=sharded["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    for key in progress:
        progress[key] = state[key]
    if state["world_size"] == args.world_size:
        set_rng_state(state["rng"][args.rank])
    else:  # no rank's stream fits another world size: new ones, the same only in distribution
        torch.manual_seed(args.seed + 1000 * state["step"] + args.rank)
    if args.rank == 0:
        print(f"resumed from {path}: step {state['step']}, sample {state['sample_in_epoch']} of "
              f"epoch {state['epoch']}, written by {state['world_size']} process(es), read by "
              f"{args.world_size}")
    return state["step"]


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


def clip_grad_norm_(model, max_norm):  # exercise 06
    """Scale the gradient down to max_norm if its norm is larger; return that norm. Each rank
    holds only a shard of every gradient, and its own norm is not the one: every rank sums its
    squares, an all-reduce adds up the sums of all ranks, and every rank scales its shard by the
    same factor, as if the whole gradient were in one place."""
    grads = [p.grad.to_local() for p in model.parameters() if p.grad is not None]
    squares = torch.stack([g.float().square().sum() for g in grads]).sum()
    dist.all_reduce(squares)
    norm = squares.sqrt()
    scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for g in grads:
        g.mul_(scale)
    return norm


def train(model, optimizer, scheduler, train_loader, evaluate_fn, args,
          loss_fn=sft_loss, count_fn=count_targets):
    """The loop: forward, loss, backward, step. One metrics record per optimizer step, and an
    evaluation every --eval-every steps. Returns the last train and eval records.

    loss_fn(model, batch) returns the loss summed over what count_fn(batch) counts, so the step's
    loss is a mean over target tokens however the batch is padded, and metrics as (sum, count).

    Each step accumulates gradients over K micro-batches. Every micro-batch's summed loss is
    divided by the target tokens of the whole step, so the step's gradient is that of one big
    batch, however unequal the micro-batches' lengths (a mean of per-micro-batch means is not).
    Under FSDP the counts are summed over ranks too, and since FSDP, like DDP, averages gradients
    over the world_size ranks, each rank's loss is multiplied by world_size to turn that mean into
    a sum."""
    # fp16 has too little range for small gradients: scale the loss up, and the gradients back down
    scaler = torch.amp.GradScaler(args.device.type, enabled=args.amp_dtype == torch.float16)
    progress = {"step": 0, "epoch": 0, "sample_in_epoch": 0, "skipped_steps": 0}
    resumed_step = resume(model, optimizer, scheduler, scaler, progress, args) \
        if args.resume else 0
    # rank 0 writes the log; a resume keeps the records up to its checkpoint (rewritten whole)
    log = MetricsLog(args.out, args.rank == 0, truncate_after=resumed_step or None)
    path, record, eval_record = os.path.join(args.out, "metrics.jsonl"), None, None
    if resumed_step and args.rank == 0:  # what a finished run reports when nothing is left
        record, eval_record = ((read_metrics(path, split) or [None])[-1]
                               for split in ("train", "eval"))
    batches = forever(train_loader, progress, args.world_size * args.batch_size)
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
        for batch in micro:
            # no no_sync(): every micro-batch's gradient is reduce-scattered and added to the
            # shard; skipping that would hold a whole unsharded gradient on every rank meanwhile
            with autocast(args.device, args.amp_dtype):
                part, metrics = loss_fn(model, batch)
            if counting is not None:
                counting.wait()  # the global counts, needed from here on
            scaler.scale(part * (args.world_size / counts[0])).backward()
            loss_sum = loss_sum + part.detach()
            for name, (s, n) in metrics.items():  # summed over micro-batches, divided once
                total = torch.stack([s.detach().float(), torch.as_tensor(n).float()])
                sums[name] = sums.get(name, 0) + total
        # everything logged, summed over ranks by one all-reduce that runs during the update
        logged = torch.cat([loss_sum.reshape(1), *sums.values()])
        logging = dist.all_reduce(logged, async_op=True) if args.world_size > 1 else None
        # exercise 02: clip
        scaler.unscale_(optimizer)  # clip the true gradients, not the loss-scaled ones
        grad_norm = clip_grad_norm_(model, args.max_grad_norm)
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
            state = checkpoint_state(model, optimizer, scheduler, scaler, progress, args)
            save_checkpoint(os.path.join(args.out, "checkpoints"), step, state, args)  # all ranks
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
    # auto: fp32 on CPU; --mixed-precision bf16 takes autocast's place
    args.amp_dtype = resolve_amp_dtype(args.device, amp_dtype="off"
                                       if args.mixed_precision == "bf16" else args.amp)
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
    # FSDP2: shard every block, then the root (embeddings, final norm, head). Nothing is broadcast:
    # every rank built the same weights from the same seed, and keeps only its 1/N of each
    # exercise 06: fsdp
    mesh = init_device_mesh(args.device.type, (args.world_size,))
    # bf16 weights make bf16 activations; no input casts, which would copy generate()'s KV cache
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                  cast_forward_inputs=False) \
        if args.mixed_precision == "bf16" else MixedPrecisionPolicy()
    for block in model.blocks:
        if args.activation_checkpointing:  # backward recomputes what forward would have kept
            activation_checkpointing(block)
        fully_shard(block, mesh=mesh, mp_policy=policy)  # gathered for its forward, then freed
    fully_shard(model, mesh=mesh, mp_policy=policy)
    register_fsdp_forward_method(model, "generate")  # generate() gathers weights as forward() does
    # end exercise
    optimizer = configure_optimizer(model, lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, args.warmup_steps, args.max_steps))
    if args.rank == 0:
        print(f"TinyGPT: {model.num_parameters():,} parameters on {args.device} x "
              f"{args.world_size} process(es), rank 0 holds "
              f"{sum(p.to_local().numel() for p in model.parameters()):,} of them; "
              f"{len(train_problems)} train / {len(eval_problems)} held-out problems")

    def evaluate_fn():
        return {"loss": evaluate(model, val_loader, args.device, args.amp_dtype),
                "accuracy": exact_match(model, eval_problems, tok, device=args.device)}

    start = time.perf_counter()
    record, eval_record = train(model, optimizer, scheduler, train_loader, evaluate_fn, args)
    train_seconds = time.perf_counter() - start
    # the one place the whole weights meet: model.pt, for inference, gathered to rank 0's CPU
    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                   cpu_offload=True))
    if args.rank != 0:  # only rank 0 writes files
        return None

    write_atomic(os.path.join(args.out, "model.pt"),
                 lambda f: torch.save({"model": weights, "config": vars(cfg)}, f))
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

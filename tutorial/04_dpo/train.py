"""Chapter 04: chapter 03 plus DPO against a frozen reference model.

Two phases. SFT (chapter 03's loop, unchanged) for --sft-steps steps, to a deliberately weak
starting point. Then DPO for --max-steps steps: on pairs of one prompt with the right sum
(chosen) and a plausible wrong one (rejected), the policy learns to prefer chosen by more than
a frozen copy of the SFT model (the reference) does. Chosen and rejected go through the model
in one concatenated forward pass. The chosen answer's NLL is added to the loss (RPO,
--rpo-alpha; 0 = plain DPO): on pairs that differ in one digit, plain DPO lowers the right
answer's likelihood along with the wrong one's. AMP, accumulation, clipping, DDP, checkpoints
and exact resume work for both phases; --resume skips the SFT phase if it already finished.

Output: DIR/sft/ holds the SFT phase's metrics.jsonl and checkpoints/; DIR/metrics.jsonl and
DIR/checkpoints/ are the DPO phase's (the chapter's subject, so `python -m reference.compare`
diffs it); DIR/model.pt is the final policy; DIR/summary.json has eval_accuracy (after DPO),
eval_accuracy_sft / _dpo (held-out exact match before and after DPO) and pref_accuracy_sft /
_dpo (held-out pairs where the model ranks chosen above rejected).

    python tutorial/04_dpo/train.py --out runs/04_dpo
    torchrun --standalone --nproc_per_node=2 tutorial/04_dpo/train.py --out runs/04_dpo --resume
"""
import argparse
import copy
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
from reference.data import PreferenceCollator, PreferenceDataset
from reference.dpo import preference_accuracy
from reference.model import GPTConfig, TinyGPT
from reference.optimizer import configure_optimizer


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Chapter 04: + DPO against a frozen reference model.")
    p.add_argument("--out", default="runs/04_dpo", help="where metrics.jsonl, summary.json and model.pt go")
    p.add_argument("--max-steps", type=int, default=150, help="optimizer steps of the DPO phase")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--batch-size", type=int, default=64, help="the micro-batch (sequences, or pairs), per process")
    p.add_argument("--grad-accum-steps", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--amp", default="bf16", choices=["off", "bf16", "fp16"], help="autocast dtype")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="clip the gradient norm to this")
    p.add_argument("--lr", type=float, default=5e-3, help="peak learning rate of the SFT phase")
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
                   help="continue each phase from its newest checkpoint in DIR/sft/checkpoints and DIR/checkpoints")
    p.add_argument("--crash-at-step", type=int, default=None,
                   help="fault-tolerance demo: the last rank SIGKILLs itself after this step (first attempt only)")
    p.add_argument("--sft-steps", type=int, default=600, help="optimizer steps of the SFT phase: a weak start")
    p.add_argument("--beta", type=float, default=0.1, help="DPO's beta: how far the policy may move from the reference")
    p.add_argument("--dpo-lr", type=float, default=2e-3, help="peak learning rate of the DPO phase")
    p.add_argument("--dpo-warmup-steps", type=int, default=10)
    p.add_argument("--loss-type", default="sigmoid", choices=["sigmoid", "ipo", "hinge"], help="the DPO loss")
    p.add_argument("--label-smoothing", type=float, default=0.0,
                   help="conservative DPO: the probability that a preference label is wrong (sigmoid loss)")
    p.add_argument("--rpo-alpha", type=float, default=1.0,
                   help="weight of the chosen answer's NLL added to the DPO loss (RPO; 0 = plain DPO)")
    p.add_argument("--precompute-ref-logps", action="store_true",
                   help="score every pair under the reference once, before DPO, then free the reference model")
    args = p.parse_args(argv)
    for name in ("max_steps", "batch_size", "eval_every", "eval_size", "grad_accum_steps", "save_every", "keep_last",
                 "sft_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.max_grad_norm <= 0:
        p.error("--max-grad-norm must be > 0")
    if args.beta <= 0 or args.dpo_lr <= 0:
        p.error("--beta and --dpo-lr must be > 0")
    if not 0 <= args.label_smoothing < 0.5:
        p.error("--label-smoothing must be in [0, 0.5)")
    if args.rpo_alpha < 0:
        p.error("--rpo-alpha must be >= 0")
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


def sft_loss(model, batch):
    """The SFT loss of a batch, summed over its target tokens; SFT logs no extra metrics."""
    loss_sum, _ = sft_loss_sum(model(batch["input_ids"], batch["attention_mask"]), batch["labels"])
    return loss_sum, {}


def count_targets(batch):
    """What the SFT loss is averaged over: target tokens."""
    return (batch["labels"][:, 1:] != -100).sum()


def sequence_logps(logits, labels):
    """log p(completion | prompt), one per row: the summed log-probs of the target tokens. In
    float32: in bf16, sums over many tokens lose the small differences DPO is made of."""
    logits, targets = logits[:, :-1, :].float(), labels[:, 1:]
    per_token = logits.log_softmax(dim=-1).gather(2, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(targets != -100, per_token, torch.zeros_like(per_token)).sum(dim=-1)


def concatenated_logps(model, batch, pad_id):
    """log p(chosen) and log p(rejected), from ONE forward pass over both halves: the weights
    are read once, and DDP sees one forward per backward. The narrower half is right-padded."""
    T = max(batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1])

    def both(key, value):  # chosen rows, then rejected rows, each padded with `value` to width T
        return torch.cat([F.pad(batch[f"{side}_{key}"], (0, T - batch[f"{side}_{key}"].shape[1]), value=value)
                          for side in ("chosen", "rejected")])
    logits = model(both("input_ids", pad_id), both("attention_mask", 0))
    logps = sequence_logps(logits, both("labels", -100))
    B = batch["chosen_input_ids"].shape[0]
    return logps[:B], logps[B:]


def dpo_loss(model, ref_model, batch, args):
    """The DPO loss summed over the batch's pairs, and TRL's metrics as (sum, pairs).

    logits = log pi(chosen) - log pi(rejected) - (the same under the reference): how much more
    the policy prefers chosen than the reference did. The implicit rewards beta * log(pi / ref)
    are only logged."""
    chosen, rejected = concatenated_logps(model, batch, args.pad_id)
    if "ref_chosen_logps" in batch:  # --precompute-ref-logps: scored once, before training
        ref_chosen, ref_rejected = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
    else:
        with torch.no_grad():  # the reference is frozen: no graph, no gradient
            ref_chosen, ref_rejected = concatenated_logps(ref_model, batch, args.pad_id)
    logits = (chosen - rejected) - (ref_chosen - ref_rejected)
    beta, eps = args.beta, args.label_smoothing
    if args.loss_type == "sigmoid":  # the DPO paper's; eps > 0: each label may be wrong (cDPO)
        losses = -F.logsigmoid(beta * logits) * (1 - eps) - F.logsigmoid(-beta * logits) * eps
    elif args.loss_type == "ipo":  # regress the margin to 1/(2 beta) instead of pushing it to infinity
        losses = (logits - 1 / (2 * beta)) ** 2
    else:  # hinge (SLiC)
        losses = torch.relu(1 - beta * logits)
    chosen_rewards = beta * (chosen - ref_chosen).detach()
    rejected_rewards = beta * (rejected - ref_rejected).detach()
    n = len(losses)
    if args.rpo_alpha:  # RPO: + the right answer's NLL per token, or DPO lowers it along with the wrong one
        nll = -chosen / (batch["chosen_labels"][:, 1:] != -100).sum(dim=1)
        losses = losses + args.rpo_alpha * nll
    metrics = {"rewards/chosen": (chosen_rewards.sum(), n), "rewards/rejected": (rejected_rewards.sum(), n),
               "rewards/accuracies": ((chosen_rewards > rejected_rewards).float().sum(), n),
               "rewards/margins": ((chosen_rewards - rejected_rewards).sum(), n),
               "logps/chosen": (chosen.detach().sum(), n), "logps/rejected": (rejected.detach().sum(), n)}
    if args.rpo_alpha:
        metrics["nll_loss"] = (nll.detach().sum(), n)
    return losses.sum(), metrics


def count_pairs(batch):
    """What the DPO loss is averaged over: pairs."""
    return torch.tensor(batch["chosen_input_ids"].shape[0], device=batch["chosen_input_ids"].device)


class WithRefLogps(torch.utils.data.Dataset):
    """--precompute-ref-logps: the pairs, each with the reference's log-prob of both sides."""

    def __init__(self, pairs, ref_model, collate, batch_size, args):
        logps = []
        with torch.no_grad():
            for batch in torch.utils.data.DataLoader(pairs, batch_size=batch_size, collate_fn=collate):
                batch = {k: v.to(args.device) for k, v in batch.items()}
                with autocast(args.device, args.amp_dtype):  # as the reference runs when not precomputed
                    logps.append(torch.stack(concatenated_logps(ref_model, batch, args.pad_id), dim=1).cpu())
        self.pairs, self.logps = pairs, torch.cat(logps)

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        return {**self.pairs[i], "ref_chosen_logps": self.logps[i, 0], "ref_rejected_logps": self.logps[i, 1]}


def collate_pairs(pad_id):
    """PreferenceCollator, plus the precomputed reference log-probs when the items carry them."""
    collate = PreferenceCollator(pad_id)

    def collate_fn(items):
        batch = collate(items)
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            if key in items[0]:
                batch[key] = torch.stack([item[key] for item in items])
        return batch
    return collate_fn


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
def evaluate(model, loader, device, amp_dtype=None, loss_fn=sft_loss, count_fn=count_targets):
    model.eval()
    total, count = 0.0, 0
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast(device, amp_dtype):
            loss_sum, _ = loss_fn(model, batch)
        total, count = total + loss_sum.item(), count + count_fn(batch).item()
    model.train()
    return total / count


def train(model, optimizer, scheduler, train_loader, evaluate_fn, args, loss_fn=sft_loss, count_fn=count_targets):
    """The loop: forward, loss, backward, step. One metrics record per optimizer step, and an
    evaluation every --eval-every steps. Returns the last train and eval records.

    Each step accumulates gradients over K micro-batches. Every micro-batch's summed loss is
    divided by the target tokens of the whole step, so the step's gradient is that of one big
    batch, however unequal the micro-batches' lengths (a mean of per-micro-batch means is not).
    Under DDP the count is summed over ranks too, and since DDP averages gradients over the
    world_size ranks, each rank's loss is multiplied by world_size to turn that mean into a sum.
    loss_fn and count_fn say what is trained: SFT over target tokens (the default), or DPO over
    pairs. loss_fn also returns metrics as (sum, count), so they too average over the whole step."""
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
        n_tokens = sum(count_fn(batch) for batch in micro)  # target tokens (SFT) or pairs (DPO)
        if args.world_size > 1:
            dist.all_reduce(n_tokens)  # the global count: every rank divides by the same number
        loss_sum = torch.zeros((), device=args.device)
        sums = {}  # loss_fn's metrics, e.g. DPO's rewards/margins: (sum, count) over the step
        optimizer.zero_grad(set_to_none=True)
        for i, batch in enumerate(micro):
            # all-reduce gradients only after the last micro-batch: the others just accumulate
            last = i == len(micro) - 1
            with model.no_sync() if args.world_size > 1 and not last else nullcontext():
                with autocast(args.device, args.amp_dtype):
                    part, metrics = loss_fn(model, batch)
                scaler.scale(part * args.world_size / n_tokens).backward()
            loss_sum += part.detach()
            for name, (s, n) in metrics.items():
                sums[name] = sums.get(name, 0) + torch.stack([s.float(), torch.tensor(float(n), device=args.device)])
        if args.world_size > 1:
            dist.all_reduce(loss_sum)
            for total in sums.values():
                dist.all_reduce(total)
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
        for name, total in sums.items():
            s, n = total.tolist()
            record[name] = s / n
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
    os.makedirs(os.path.join(args.out, "sft"), exist_ok=True)
    for out in (os.path.join(args.out, "sft"), args.out):  # the SFT phase's checkpoints, and DPO's
        if not args.resume and args.rank == 0 and os.path.isdir(os.path.join(out, "checkpoints")):
            print(f"starting fresh: removing the previous run's checkpoints in {out}/checkpoints")
            shutil.rmtree(os.path.join(out, "checkpoints"))  # or a later --resume could pick them up

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
        optimizer, lambda step: lr_multiplier(step, args.warmup_steps, args.sft_steps))
    if args.rank == 0:
        print(f"TinyGPT: {model.num_parameters():,} parameters on {args.device} x {args.world_size} "
              f"process(es); {len(train_problems)} train / {len(eval_problems)} held-out problems")
    # DDP broadcasts rank 0's weights at construction and all-reduces gradients in backward
    train_model = DDP(model) if args.world_size > 1 else model

    def evaluate_fn():
        return {"loss": evaluate(model, val_loader, args.device, args.amp_dtype),
                "accuracy": exact_match(model, eval_problems, tok, device=args.device)}

    # phase 1, SFT to a weak start, in DIR/sft; with --resume it stops at once if already complete.
    # --crash-at-step counts DPO steps
    sft_args = argparse.Namespace(**{**vars(args), "out": os.path.join(args.out, "sft"),
                                     "max_steps": args.sft_steps, "crash_at_step": None})
    start = time.perf_counter()
    train(train_model, optimizer, scheduler, train_loader, evaluate_fn, sft_args)
    sft_seconds = time.perf_counter() - start

    # phase 2, DPO: pairs of one prompt with the right sum (chosen) and a plausible wrong one
    start = time.perf_counter()
    args.pad_id = tok.pad_id
    collate_pairs_fn = collate_pairs(tok.pad_id)
    train_pairs = PreferenceDataset(train_problems, tok, seed=args.seed)
    val_pairs = PreferenceDataset(eval_problems, tok, seed=args.seed)
    # the reference: a frozen copy of the SFT model (eval(): no dropout; no gradients)
    ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    if args.precompute_ref_logps:
        train_pairs = WithRefLogps(train_pairs, ref_model, collate_pairs_fn, args.batch_size, args)
        val_pairs = WithRefLogps(val_pairs, ref_model, collate_pairs_fn, 256, args)
        ref_model = None  # every log-prob it would give is in the data now: free it
    pair_sampler = DistributedSampler(train_pairs, num_replicas=args.world_size, rank=args.rank, shuffle=True,
                                      seed=args.seed, drop_last=True)
    pair_loader = torch.utils.data.DataLoader(train_pairs, batch_size=args.batch_size, sampler=pair_sampler,
                                              drop_last=True, collate_fn=collate_pairs_fn,
                                              generator=torch.Generator().manual_seed(args.seed))
    val_pair_loader = torch.utils.data.DataLoader(val_pairs, batch_size=256, collate_fn=collate_pairs_fn)
    dpo_optimizer = configure_optimizer(model, "adamw", lr=args.dpo_lr, weight_decay=args.weight_decay)
    dpo_scheduler = torch.optim.lr_scheduler.LambdaLR(
        dpo_optimizer, lambda step: lr_multiplier(step, args.dpo_warmup_steps, args.max_steps))

    def dpo_loss_fn(model, batch):
        return dpo_loss(model, ref_model, batch, args)

    def evaluate_pairs():
        return {"loss": evaluate(model, val_pair_loader, args.device, args.amp_dtype, dpo_loss_fn, count_pairs),
                "accuracy": exact_match(model, eval_problems, tok, device=args.device),
                "pref_accuracy": preference_accuracy(model, val_pair_loader, device=args.device)}

    eval_accuracy_sft = exact_match(model, eval_problems, tok, device=args.device)  # the starting point
    pref_accuracy_sft = preference_accuracy(model, val_pair_loader, device=args.device)
    record, eval_record = train(train_model, dpo_optimizer, dpo_scheduler, pair_loader, evaluate_pairs, args,
                                loss_fn=dpo_loss_fn, count_fn=count_pairs)
    dpo_seconds = time.perf_counter() - start
    train_seconds = sft_seconds + dpo_seconds
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
               "parameters": model.num_parameters(),
               "eval_accuracy_sft": eval_accuracy_sft, "eval_accuracy_dpo": eval_record["accuracy"],
               "pref_accuracy_sft": pref_accuracy_sft, "pref_accuracy_dpo": eval_record["pref_accuracy"],
               "sft_steps": args.sft_steps, "sft_seconds": sft_seconds, "dpo_seconds": dpo_seconds}
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"held-out exact match {eval_accuracy_sft:.3f} -> {summary['eval_accuracy']:.3f} and preference "
          f"accuracy {pref_accuracy_sft:.3f} -> {summary['pref_accuracy_dpo']:.3f} after {summary['steps']} DPO "
          f"steps ({dpo_seconds:.1f} s of DPO); wrote {args.out}/metrics.jsonl and summary.json")
    return summary


if __name__ == "__main__":
    main()

"""Chapter 05: chapter 04 plus GRPO: sampling, verifiable rewards, group advantages, clip, KL.

Two phases, as in chapter 04: SFT to a weak start, then (--method grpo, the default) GRPO for
--max-steps steps. The model samples --num-samples-per-prompt answers to each prompt, a program
scores every completion (1 for the right sum), and each completion's advantage is its reward
relative to the others of its group. The loss makes the better-than-average completions more
likely, with PPO's clip on the ratio pi / pi_old and, with --grpo-beta > 0, a k3 KL penalty
towards a frozen copy of the SFT model. --method dpo runs chapter 04's DPO phase instead.

DIR/sft/ holds the SFT phase's metrics.jsonl and checkpoints/; DIR/metrics.jsonl and
DIR/checkpoints/ are the second phase's; DIR/summary.json has held-out exact match before (_sft)
and after (_grpo or _dpo) it.

    python tutorial/05_grpo/train.py --out runs/05_grpo
    torchrun --standalone --nproc_per_node=2 tutorial/05_grpo/train.py --out runs/05_grpo --resume
"""
import argparse
import copy
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
from reference.data import PreferenceCollator, PreferenceDataset, PromptCollator, PromptDataset
from reference.model import GPTConfig, TinyGPT
from reference.rundir import locked, remove_stale_temporaries
from reference.runtime import resolve_amp_dtype, resolve_device


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Chapter 05: + GRPO on the model's own samples.")
    p.add_argument("--out", default="runs/05_grpo", help="folder for metrics.jsonl, summary.json")
    p.add_argument("--max-steps", type=int, default=None,
                   help="optimizer steps after SFT (default: 400 of GRPO, 150 of DPO)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--batch-size", type=int, default=64, help="the micro-batch, per process")
    p.add_argument("--grad-accum-steps", type=int, default=1, help="micro-batches per step")
    p.add_argument("--amp", default="auto", choices=["auto", "off", "bf16", "fp16"],
                   help="autocast dtype; auto: bf16 on a GPU, off (fp32) on a CPU")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="clip the gradient norm")
    p.add_argument("--lr", type=float, default=5e-3, help="peak learning rate of SFT")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--warmup-steps", type=int, default=30)
    p.add_argument("--digits", type=int, default=2, help="the task: a + b with a, b < 10**digits")
    p.add_argument("--eval-size", type=int, default=500, help="held-out problems, never trained on")
    p.add_argument("--eval-every", type=int, default=20, help="steps between evaluations")
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=64)
    p.add_argument("--save-every", type=int, default=200, help="steps between checkpoints")
    p.add_argument("--keep-last", type=int, default=2, help="checkpoints to keep")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest good checkpoint in DIR/checkpoints")
    p.add_argument("--crash-at-step", type=int, default=None,
                   help="a fault demo: the last rank SIGKILLs itself after this step, once")
    p.add_argument("--sft-steps", type=int, default=1000, help="most optimizer steps of SFT")
    p.add_argument("--sft-target", type=float, default=0.4,
                   help="stop SFT at the first evaluation with this held-out exact match")
    p.add_argument("--beta", type=float, default=0.1, help="how far DPO may move from the start")
    p.add_argument("--dpo-lr", type=float, default=2e-3, help="peak learning rate of DPO")
    p.add_argument("--dpo-warmup-steps", type=int, default=10)
    p.add_argument("--rpo-alpha", type=float, default=1.0,
                   help="weight of the chosen answer's NLL in the loss (0: plain DPO)")
    p.add_argument("--method", default="grpo", choices=["grpo", "dpo"], help="the phase after SFT")
    p.add_argument("--num-samples-per-prompt", type=int, default=8,
                   help="G: completions per prompt, one group; a micro-batch has --batch-size * G")
    p.add_argument("--clip-eps", type=float, default=0.2, help="pi / pi_old is kept in 1 +- this")
    p.add_argument("--num-iterations", type=int, default=1,
                   help="mu: optimizer steps on each batch of completions (1: the ratio is 1)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    p.add_argument("--max-completion-length", type=int, default=None,
                   help="tokens sampled per completion (default: the longest sum + its end token)")
    p.add_argument("--grpo-lr", type=float, default=2e-3, help="peak learning rate of GRPO")
    p.add_argument("--grpo-warmup-steps", type=int, default=10)
    p.add_argument("--grpo-beta", type=float, default=0.0,
                   help="weight of the KL penalty towards the SFT model (0: no reference model)")
    args = p.parse_args(argv)
    if args.max_steps is None:
        args.max_steps = 150 if args.method == "dpo" else 400
    for name in ("max_steps", "batch_size", "eval_every", "eval_size", "grad_accum_steps",
                 "save_every", "keep_last", "sft_steps", "num_iterations"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.lr <= 0 or args.weight_decay < 0 or args.warmup_steps < 0:
        p.error("need --lr > 0, --weight-decay >= 0 and --warmup-steps >= 0")
    if args.max_grad_norm <= 0:
        p.error("--max-grad-norm must be > 0")
    if args.beta <= 0 or args.dpo_lr <= 0 or args.rpo_alpha < 0:
        p.error("need --beta > 0, --dpo-lr > 0 and --rpo-alpha >= 0")
    if args.method == "grpo":
        if args.num_samples_per_prompt < 2:
            p.error("--num-samples-per-prompt must be >= 2: a completion's advantage is its "
                    "reward relative to the others of its group")
        if args.grpo_beta < 0 or args.grpo_lr <= 0 or args.clip_eps < 0 or args.temperature <= 0:
            p.error("need --grpo-beta >= 0, --grpo-lr > 0, --clip-eps >= 0 and --temperature > 0")
        if (args.max_completion_length or 1) < 1:
            p.error("--max-completion-length must be >= 1")
        if args.save_every % args.num_iterations:
            p.error("--save-every must be a multiple of --num-iterations: a checkpoint comes "
                    "between two batches of completions")
    return args


def setup_distributed(device):  # exercise 03
    """Join the process group if torchrun started us. Returns (rank, world_size, device)."""
    if "RANK" not in os.environ:
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


def sequence_logps(logits, labels):  # exercise 04
    """log p(completion | prompt), one per row: the summed log-probs of the target tokens. In
    float32: in bf16, sums over many tokens lose the small differences DPO is made of."""
    logps = logits[:, :-1].float().log_softmax(dim=-1)
    targets = labels[:, 1:]
    per_token = logps.gather(2, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(targets != -100, per_token, 0.0).sum(dim=-1)


def concatenated_logps(model, batch, pad_id):  # exercise 04
    """log p(chosen) and log p(rejected), from ONE forward pass over both halves: the weights
    are read once. The narrower half is right-padded to the width of the other."""
    T = max(batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1])

    def both(key, value):  # chosen rows, then rejected rows, padded with `value` to width T
        return torch.cat([F.pad(batch[f"{side}_{key}"], (0, T - batch[f"{side}_{key}"].shape[1]),
                                value=value) for side in ("chosen", "rejected")])
    logits = model(both("input_ids", pad_id), both("attention_mask", 0))
    return sequence_logps(logits, both("labels", -100)).chunk(2)


def dpo_loss(model, ref_model, batch, args):  # exercise 04
    """The DPO loss summed over the batch's pairs, and TRL's metrics as (sum, pairs).

    logits = log pi(chosen) - log pi(rejected) - (the same under the reference): how much more
    the policy prefers chosen than the reference did; the loss is -log sigmoid(beta * logits).
    The implicit rewards beta * log(pi / ref) of each side are only logged."""
    chosen, rejected = concatenated_logps(model, batch, args.pad_id)
    with torch.no_grad():  # the reference is frozen: no graph, no gradient
        ref_chosen, ref_rejected = concatenated_logps(ref_model, batch, args.pad_id)
    logits = (chosen - rejected) - (ref_chosen - ref_rejected)
    losses = -F.logsigmoid(args.beta * logits)
    chosen_rewards = args.beta * (chosen - ref_chosen).detach()
    rejected_rewards = args.beta * (rejected - ref_rejected).detach()
    n = len(losses)
    metrics = {"rewards/chosen": (chosen_rewards.sum(), n),
               "rewards/rejected": (rejected_rewards.sum(), n),
               "rewards/accuracies": ((chosen_rewards > rejected_rewards).float().sum(), n),
               "rewards/margins": ((chosen_rewards - rejected_rewards).sum(), n),
               "logps/chosen": (chosen.detach().sum(), n),
               "logps/rejected": (rejected.detach().sum(), n)}
    if args.rpo_alpha:  # RPO: + the right answer's NLL per token, so that DPO cannot lower it
        nll = -chosen / (batch["chosen_labels"][:, 1:] != -100).sum(dim=1)
        losses = losses + args.rpo_alpha * nll
        metrics["nll_loss"] = (nll.detach().sum(), n)
    return losses.sum(), metrics


def count_pairs(batch):  # exercise 04
    """DPO averages its loss over pairs; the tokens it trains are both completions'."""
    labels = [batch[f"{side}_labels"][:, 1:] for side in ("chosen", "rejected")]
    return torch.tensor(len(labels[0])), sum((side != -100).sum() for side in labels)


@torch.no_grad()
def preference_accuracy(model, loader, args):
    """The share of held-out pairs in which the model gives chosen a higher log-prob than
    rejected: what DPO trains, measured without the reference."""
    model.eval()
    wins = total = 0
    for batch in loader:
        chosen, rejected = concatenated_logps(model, to_device(batch, args.device), args.pad_id)
        wins, total = wins + int((chosen > rejected).sum()), total + len(chosen)
    model.train()
    return wins / total


def correctness_reward(completions, problems):
    """1 where the completion is exactly the sum, else 0: a program checks, no reward model."""
    return [float(text == problem.answer) for text, problem in zip(completions, problems)]


@torch.no_grad()
def sample_and_score(model, batch, args):
    """One micro-batch of prompts in, G scored completions per prompt out (a "rollout").

    Each prompt is repeated G times as one contiguous group; the model samples a completion for
    each row; a completion ends at its first end token, which is kept (it is how the model
    learns to stop) while whatever the sampler wrote after it is masked out; a program scores
    the text. Nothing here is differentiated: it is how GRPO makes its data."""
    G, L = args.num_samples_per_prompt, args.max_completion_length
    ids = batch["prompt_input_ids"].repeat_interleave(G, dim=0)  # rows gG..gG+G-1: prompt g
    mask = batch["prompt_attention_mask"].repeat_interleave(G, dim=0)
    if ids.shape[1] + L > model.config.block_size:
        raise ValueError(f"prompts of {ids.shape[1]} tokens + --max-completion-length {L} exceed "
                         f"the model's context of {model.config.block_size}; lower the length")
    model.eval()  # no dropout while sampling
    completions = model.generate(ids, mask, max_new_tokens=L, temperature=args.temperature,
                                 do_sample=True, eos_token_id=args.eos_id,
                                 pad_token_id=args.pad_id, generator=args.generator)
    model.train()
    # exercise 05: eos_mask
    is_eos = completions == args.eos_id
    ended = is_eos.any(dim=1)
    last = torch.where(ended, is_eos.int().argmax(dim=1), L)  # L: the row never ended
    keep = torch.arange(L, device=ids.device) <= last[:, None]
    # end exercise
    texts = [args.tok.decode(row) for row in completions.tolist()]
    problems = [problem for problem in batch["problems"] for _ in range(G)]
    rewards = torch.tensor(correctness_reward(texts, problems), device=ids.device)
    grouped, N = rewards.view(-1, G), len(rewards)
    metrics = {"reward": (rewards.sum(), N), "rewards/correctness_reward/mean": (rewards.sum(), N),
               "reward_std": (grouped.std(dim=1).sum(), len(grouped)),  # the groups' mean std
               # a group whose G rewards are all equal has zero advantages: it teaches nothing
               "frac_reward_zero_std": ((grouped == grouped[:, :1]).all(1).sum(), len(grouped)),
               "completions/mean_length": (keep.sum(), N),
               "completions/clipped_ratio": ((~ended).sum(), N)}  # cut off by the length limit
    # log-probs at position t predict token t+1: only the completion's kept tokens are trained
    trained = torch.cat([torch.zeros_like(mask[:, 1:], dtype=torch.bool), keep], dim=1)
    return {"input_ids": torch.cat([ids, completions], dim=1), "rewards": rewards,
            "attention_mask": torch.cat([mask, keep.long()], dim=1), "completion_mask": trained,
            "metrics": metrics}


def completion_logps(model, rollout, temperature):  # exercise 05
    """log p of every token given the ones before it, under the distribution that was sampled
    from (the logits divided by the temperature), in float32; and the entropy of that
    distribution at every position."""
    logits = model(rollout["input_ids"], rollout["attention_mask"])[:, :-1].float() / temperature
    logps = logits.log_softmax(dim=-1)
    entropy = -(logps.exp() * logps).sum(dim=-1)
    return logps.gather(2, rollout["input_ids"][:, 1:].unsqueeze(-1)).squeeze(-1), entropy


def group_advantages(rewards, G):  # exercise 05
    """A = (r - mean of its group) / (std of its group + 1e-4): each completion against the
    others sampled for the same prompt, so no value model is needed. A group whose rewards are
    all equal carries no signal and gets exactly 0."""
    grouped = rewards.view(-1, G)
    centered = grouped - grouped.mean(dim=1, keepdim=True)
    all_equal = (grouped == grouped[:, :1]).all(dim=1, keepdim=True)
    centered = torch.where(all_equal, 0.0, centered)  # a float mean can be off by an ulp
    return (centered / (grouped.std(dim=1, keepdim=True) + 1e-4)).view(-1)


@torch.no_grad()
def roll_out(model, ref_model, batches, args, state):
    """The step's micro-batches of prompts, rolled out, with what the loss needs that does not
    change while the policy trains on them: advantages, old_logps and ref_logps."""
    with autocast(args.device, args.amp_dtype):
        rollouts = [sample_and_score(model, batch, args) for batch in batches]
    # Groups never cross micro-batches or ranks: every rank computes its own advantages
    rewards = torch.cat([r["rewards"] for r in rollouts])
    advantages = group_advantages(rewards, args.num_samples_per_prompt)
    # TRL's batch-wide figures, over every rank: the rewards' std, and the tokens generated
    stats = torch.stack([rewards.sum(), rewards.square().sum(), torch.tensor(len(rewards)),
                         sum(r["attention_mask"].sum() for r in rollouts)]).double()
    if args.world_size > 1:
        dist.all_reduce(stats)
    total, squares, n, tokens = stats.tolist()
    state["num_tokens"] += int(tokens)
    std = math.sqrt(max(0.0, squares - total * total / n) / (n - 1))
    rollouts[0]["metrics"]["rewards/correctness_reward/std"] = (torch.tensor(std), 1)
    for rollout, A in zip(rollouts, advantages.split([len(r["rewards"]) for r in rollouts])):
        rollout["advantages"] = A
        with autocast(args.device, args.amp_dtype):
            # pi_old: the policy that sampled. Needed only when a rollout is reused: on its first
            # use the policy IS pi_old, and the loss uses logps.detach() (ratio exactly 1)
            rollout["old_logps"] = completion_logps(model, rollout, args.temperature)[0] \
                if args.num_iterations > 1 else None
            rollout["ref_logps"] = completion_logps(ref_model, rollout, args.temperature)[0] \
                if args.grpo_beta > 0 else None
    return rollouts


def grpo_loss(model, batch, args):  # exercise 05
    """The GRPO loss of one rolled-out micro-batch, summed over its completions, and TRL's
    metrics. Per token: -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A) + beta * k3 KL, with
    ratio = pi / pi_old; each completion's token losses are averaged (the paper's form)."""
    logps, entropy = completion_logps(model, batch, args.temperature)
    mask, A = batch["completion_mask"], batch["advantages"].unsqueeze(1)
    old = logps.detach() if batch["old_logps"] is None else batch["old_logps"]
    # replace, don't multiply: 0 * inf is NaN, and where() sends no gradient to what it drops
    logps, old = torch.where(mask, logps, 0.0), torch.where(mask, old, 0.0)
    ratio = torch.exp(logps - old)
    clipped = torch.clamp(ratio, 1 - args.clip_eps, 1 + args.clip_eps)
    per_token = -torch.min(ratio * A, clipped * A)  # the clip takes away the gain, never the loss
    tokens = mask.sum()
    low = ((ratio < 1 - args.clip_eps) & (A < 0) & mask).sum()  # clipped: no gradient
    high = ((ratio > 1 + args.clip_eps) & (A > 0) & mask).sum()
    metrics = {"clip_ratio/low_mean": (low, tokens), "clip_ratio/high_mean": (high, tokens),
               "clip_ratio/region_mean": (low + high, tokens),
               "entropy": (torch.where(mask, entropy, 0.0).sum(), tokens)}
    if args.grpo_beta > 0:
        d = torch.where(mask, batch["ref_logps"], 0.0) - logps
        kl = torch.expm1(d) - d  # k3 = exp(d) - d - 1 >= 0, without exp(d) - 1's cancellation
        per_token = per_token + args.grpo_beta * kl
        metrics["kl"] = (torch.where(mask, kl, 0.0).sum(), tokens)
    losses = torch.where(mask, per_token, 0.0).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
    return losses.sum(), {**metrics, **batch["metrics"]}


def count_completions(batch):  # exercise 05
    """GRPO averages its loss over completions; the tokens it trains are theirs."""
    return torch.tensor(len(batch["completion_mask"])), batch["completion_mask"].sum()


def forever(loader, position):  # exercise 03
    """Batches without end: a fresh shuffle at every pass over the data. `position` (epoch, and
    batches already taken in it) is kept up to date, so a resumed run skips exactly those."""
    while True:
        loader.sampler.set_epoch(position["epoch"])  # the shuffle is a function of (seed, epoch)
        for i, batch in enumerate(loader):
            if i >= position["batch_in_epoch"]:
                position["batch_in_epoch"] = i + 1
                yield batch
        position["epoch"], position["batch_in_epoch"] = position["epoch"] + 1, 0


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


def save_checkpoint(folder, step, state, keep_last):  # exercise 03
    """folder/step_XXXXXX/ with state.pt and its SHA-256. Both are written into a temporary
    folder, flushed to the disk, and only then is the folder renamed into place: a crash or a
    full disk mid-save leaves the previous checkpoint the newest complete one."""
    final = os.path.join(folder, f"step_{step:06d}")
    tmp = os.path.join(folder, f".tmp_step_{step:06d}")
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    try:
        os.makedirs(tmp, exist_ok=True)
        write_atomic(os.path.join(tmp, "state.pt"), lambda f: f.write(data))
        digest = hashlib.sha256(data).hexdigest().encode()
        write_atomic(os.path.join(tmp, "state.pt.sha256"), lambda f: f.write(digest))
    except OSError as err:  # most often a full disk
        shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(f"could not write a checkpoint in {folder} ({err}); "
                      "the previous checkpoint is intact") from None
    shutil.rmtree(final, ignore_errors=True)  # the same step saved again after a fallback
    os.replace(tmp, final)
    for name in sorted(n for n in os.listdir(folder) if n.startswith("step_"))[:-keep_last]:
        shutil.rmtree(os.path.join(folder, name))


def load_latest(folder, keys):  # exercise 03
    """(path, state) of the newest checkpoint in folder that verifies: its checksum matches, it
    loads with weights_only=True (tensors and plain containers, never pickled code), and it has
    every one of keys. A damaged one is skipped with a warning that says why. (None, None) when
    there is no checkpoint; an error when there are some and none verifies."""
    names = sorted(n for n in os.listdir(folder) if n.startswith("step_")) \
        if os.path.isdir(folder) else []
    for name in reversed(names):
        path = os.path.join(folder, name)
        try:
            with open(os.path.join(path, "state.pt"), "rb") as f:
                data = f.read()
            with open(os.path.join(path, "state.pt.sha256")) as f:
                if f.read().strip() != hashlib.sha256(data).hexdigest():
                    raise ValueError("its checksum does not match: the file is damaged")
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            missing = [key for key in keys if key not in state]
            if missing:
                raise ValueError(f"it has no {missing}")
            return path, state
        except Exception as err:  # noqa: BLE001 - anything unreadable means "try the one before"
            warnings.warn(f"skipping checkpoint {path}: {err}", stacklevel=2)
    if names:
        raise ValueError(f"no checkpoint in {folder} could be loaded (see the warnings above); "
                         "start fresh without --resume")
    return None, None


CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "scaler", "step", "epoch", "batch_in_epoch",
                   "skipped_steps", "stopped", "world_size", "rng")


def checkpoint_state(model, optimizer, scheduler, scaler, progress, args, rollouts=None):
    """Everything a bitwise resume needs. Every rank's RNG states go in: ranks draw differently."""
    mine = rng_state()
    if rollouts is not None:  # GRPO: this rank's sampling stream, and the tokens generated
        mine.update(sampler=args.generator.get_state(), num_tokens=rollouts["num_tokens"])
    rngs = [mine]
    if args.world_size > 1:
        rngs = [None] * args.world_size
        dist.all_gather_object(rngs, mine)
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), **progress,
            "world_size": args.world_size, "rng": rngs}


def resume(model, optimizer, scheduler, scaler, progress, args, rollouts=None):
    """Load the newest checkpoint that verifies (every rank reads it). Returns its step, or 0."""
    path, state = load_latest(os.path.join(args.out, "checkpoints"), CHECKPOINT_KEYS)
    if state is None:
        if args.rank == 0:
            print("--resume: no checkpoint yet, starting fresh")
        return 0
    if state["world_size"] != args.world_size:
        raise ValueError(f"{path} was written by {state['world_size']} process(es), this run has "
                         f"{args.world_size}: the data shards and RNG streams depend on it. Resume "
                         f"with --nproc_per_node={state['world_size']}, or start fresh")
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise ValueError(f"{path} does not fit this model (another --n-layer/--n-embd?): "
                         f"{err}") from None
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    for key in progress:
        progress[key] = state[key]
    set_rng_state(state["rng"][args.rank])
    if rollouts is not None:
        args.generator.set_state(state["rng"][args.rank]["sampler"])
        rollouts["num_tokens"] = state["rng"][args.rank]["num_tokens"]
    if args.rank == 0:
        print(f"resumed from {path}")
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


def train(model, optimizer, scheduler, train_loader, evaluate_fn, args,
          loss_fn=sft_loss, count_fn=count_targets, rollout_fn=None):
    """The loop: forward, loss, backward, step. One metrics record per optimizer step, and an
    evaluation every --eval-every steps. Returns the last train and eval records.

    loss_fn(model, batch) returns the loss summed over what count_fn(batch) counts, so the step's
    loss is a mean over target tokens however the batch is padded, and metrics as (sum, count).

    Each step accumulates gradients over K micro-batches. Every micro-batch's summed loss is
    divided by the target tokens of the whole step, so the step's gradient is that of one big
    batch, however unequal the micro-batches' lengths (a mean of per-micro-batch means is not).
    Under DDP the counts are summed over ranks too, and since DDP averages gradients over the
    world_size ranks, each rank's loss is multiplied by world_size to turn that mean into a sum.
    rollout_fn (GRPO) first turns the loader's prompts into scored completions; each batch of
    completions is trained on for --num-iterations steps before the next is sampled."""
    raw_model = model.module if isinstance(model, DDP) else model
    # fp16 has too little range for small gradients: scale the loss up, and the gradients back down
    scaler = torch.amp.GradScaler(args.device.type, enabled=args.amp_dtype == torch.float16)
    progress = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "skipped_steps": 0, "stopped": False}
    rollouts = None if rollout_fn is None else {"micro": None, "uses": 0, "num_tokens": 0}
    resumed_step = resume(raw_model, optimizer, scheduler, scaler, progress, args, rollouts) \
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
        if progress["stopped"]:  # a resumed phase that had stopped early: nothing left to do
            break
        if rollout_fn is None:
            micro = [to_device(next(batches), args.device) for _ in range(args.grad_accum_steps)]
        else:  # GRPO: sample afresh, or train again on the last samples
            if rollouts["micro"] is None or rollouts["uses"] == args.num_iterations:
                prompts = [to_device(next(batches), args.device)
                           for _ in range(args.grad_accum_steps)]
                rollouts["micro"], rollouts["uses"] = rollout_fn(prompts, rollouts), 0
            micro, rollouts["uses"] = rollouts["micro"], rollouts["uses"] + 1
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
                scaler.scale(part * (args.world_size / counts[0])).backward()  # exercise 03: factor
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
        if rollouts is not None:
            record["num_tokens"] = rollouts["num_tokens"]  # generated so far, prompts included
        log.write(record)
        bar.set_postfix(loss=f"{record['loss']:.4f}")
        if step % args.eval_every == 0 or step == args.max_steps:
            eval_record = {"step": step, "split": "eval", **evaluate_fn()}
            log.write(eval_record)
            if args.rank == 0:
                tqdm.write(f"step {step}: train loss {record['loss']:.4f}, " + ", ".join(
                    f"eval {k} {v:.4f}" for k, v in eval_record.items()
                    if k not in ("step", "split")))
            # the SFT phase ends early at a weak start: the first evaluation at the target
            progress["stopped"] = eval_record["accuracy"] >= args.stop_accuracy
        if step % args.save_every == 0 or step == args.max_steps or progress["stopped"]:
            state = checkpoint_state(raw_model, optimizer, scheduler, scaler, progress, args,
                                     rollouts)
            if args.rank == 0:
                save_checkpoint(os.path.join(args.out, "checkpoints"), step, state, args.keep_last)
            if args.world_size > 1:
                dist.barrier()  # nobody runs ahead while the checkpoint is being written
        if step == args.crash_at_step and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0" \
                and args.rank == args.world_size - 1:
            os.kill(os.getpid(), signal.SIGKILL)  # a hard crash: no cleanup, no goodbye
        if progress["stopped"]:
            break
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
    for phase in ("sft", ""):  # the SFT phase's folder, and DPO's
        start_fresh(os.path.join(args.out, phase), args)
    os.makedirs(os.path.join(args.out, "sft"), exist_ok=True)

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
        optimizer, lambda step: lr_multiplier(step, args.warmup_steps, args.sft_steps))
    if args.rank == 0:
        print(f"TinyGPT: {model.num_parameters():,} parameters on {args.device} x "
              f"{args.world_size} process(es); {len(train_problems)} train / "
              f"{len(eval_problems)} held-out problems")
    # DDP broadcasts rank 0's weights at construction and all-reduces gradients in backward
    train_model = DDP(model) if args.world_size > 1 else model  # exercise 03: ddp

    def evaluate_fn():
        return {"loss": evaluate(model, val_loader, args.device, args.amp_dtype),
                "accuracy": exact_match(model, eval_problems, tok, device=args.device)}

    # phase 1, SFT to a weak start, in DIR/sft (--crash-at-step counts DPO steps)
    sft_args = argparse.Namespace(**{**vars(args), "out": os.path.join(args.out, "sft"),
                                     "max_steps": args.sft_steps, "crash_at_step": None,
                                     "stop_accuracy": args.sft_target})
    start = time.perf_counter()
    sft_record, _ = train(train_model, optimizer, scheduler, train_loader, evaluate_fn, sft_args)
    sft_seconds = time.perf_counter() - start

    # phase 2, DPO, from the SFT model; evaluated for exact match as phase 1 was
    eval_accuracy_sft = exact_match(model, eval_problems, tok, device=args.device)  # the start
    args.stop_accuracy = math.inf
    start = time.perf_counter()
    phase = grpo_phase if args.method == "grpo" else dpo_phase
    record, eval_record, results = phase(args, model, train_model, tok, train_problems,
                                         eval_problems, evaluate_fn)
    phase_seconds = time.perf_counter() - start
    if args.rank != 0:  # only rank 0 writes files
        return None

    write_atomic(os.path.join(args.out, "model.pt"),
                 lambda f: torch.save({"model": model.state_dict(), "config": vars(cfg)}, f))
    summary = {"eval_accuracy": eval_record["accuracy"], "eval_loss": eval_record["loss"],
               "final_loss": record["loss"], "steps": record["step"],
               "train_seconds": sft_seconds + phase_seconds,
               "parameters": model.num_parameters(), "eval_accuracy_sft": eval_accuracy_sft,
               f"eval_accuracy_{args.method}": eval_record["accuracy"], **results,
               "sft_steps": sft_record["step"], "sft_seconds": sft_seconds,
               f"{args.method}_seconds": phase_seconds}
    write_atomic(os.path.join(args.out, "summary.json"),
                 lambda f: f.write(json.dumps(summary, indent=2).encode()))
    print(f"held-out exact match {eval_accuracy_sft:.3f} after SFT -> "
          f"{summary['eval_accuracy']:.3f} after {summary['steps']} {args.method} steps "
          f"({phase_seconds:.1f} s); wrote {args.out}")
    return summary


def dpo_phase(args, model, train_model, tok, train_problems, eval_problems, evaluate_fn):
    """DPO on pairs of one prompt with the right sum (chosen) and a plausible wrong one, against
    a frozen copy of the model. Returns the last train and eval records, and the held-out
    preference accuracy before and after."""
    args.pad_id = tok.pad_id
    pair_collate = PreferenceCollator(tok.pad_id)
    pair_loader = sharded_loader(PreferenceDataset(train_problems, tok, seed=args.seed),
                                 pair_collate, args)
    val_pairs = torch.utils.data.DataLoader(PreferenceDataset(eval_problems, tok, seed=args.seed),
                                            batch_size=256, collate_fn=pair_collate)
    # the reference: a frozen copy of the SFT model. eval() turns its dropout off; the policy's
    # is 0 too (GPTConfig.dropout), or noise would move even the first loss away from ln 2
    ref_model = copy.deepcopy(model).eval().requires_grad_(False)  # exercise 04: ref_model
    optimizer = configure_optimizer(model, lr=args.dpo_lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, args.dpo_warmup_steps, args.max_steps))

    def dpo_loss_fn(model, batch):
        return dpo_loss(model, ref_model, batch, args)

    def evaluate_pairs():
        return {"loss": evaluate(model, val_pairs, args.device, args.amp_dtype, dpo_loss_fn,
                                 count_pairs),
                "accuracy": exact_match(model, eval_problems, tok, device=args.device),
                "pref_accuracy": preference_accuracy(model, val_pairs, args)}

    pref_accuracy_sft = preference_accuracy(model, val_pairs, args)
    record, eval_record = train(train_model, optimizer, scheduler, pair_loader, evaluate_pairs,
                                args, loss_fn=dpo_loss_fn, count_fn=count_pairs)
    return record, eval_record, {"pref_accuracy_sft": pref_accuracy_sft,
                                 "pref_accuracy_dpo": eval_record["pref_accuracy"]}



def grpo_phase(args, model, train_model, tok, train_problems, eval_problems, evaluate_fn):
    """GRPO: the model samples G answers to each prompt, and learns from how they score.
    Returns the last train and eval records, and nothing more for the summary."""
    args.tok, args.eos_id, args.pad_id = tok, tok.eos_id, tok.pad_id
    if args.max_completion_length is None:
        args.max_completion_length = args.digits + 2  # the longest sum, and its end token
    # prompts only, left-padded for generation: a micro-batch of --batch-size prompts becomes
    # --batch-size * G completions, and each prompt's G samples are made (and stay) on one rank
    prompt_loader = sharded_loader(PromptDataset(train_problems, tok), PromptCollator(tok.pad_id),
                                   args)
    # sampling draws from its own stream, one per rank: otherwise every rank draws alike
    args.generator = torch.Generator(args.device).manual_seed(args.seed + args.rank)
    # the reference for the KL penalty: a frozen copy of the SFT model, only when beta > 0
    ref_model = copy.deepcopy(model).eval().requires_grad_(False) if args.grpo_beta > 0 else None
    optimizer = configure_optimizer(model, lr=args.grpo_lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, args.grpo_warmup_steps, args.max_steps))

    def rollout_fn(prompts, state):
        return roll_out(model, ref_model, prompts, args, state)  # sampling needs no DDP wrapper

    record, eval_record = train(train_model, optimizer, scheduler, prompt_loader, evaluate_fn,
                                args, loss_fn=lambda model, batch: grpo_loss(model, batch, args),
                                count_fn=count_completions, rollout_fn=rollout_fn)
    return record, eval_record, {}


if __name__ == "__main__":
    main()

"""GRPO: group-relative advantages, the clipped surrogate loss and the k3 KL penalty.

Each prompt is sampled `group_size` times (TRL: `num_generations`); a completion's advantage is
its reward relative to the other samples of the same prompt, so no value model is needed. The
loss is PPO's clipped surrogate on per-token probability ratios, optionally plus a KL penalty
towards a frozen reference model. Names follow TRL's `GRPOTrainer` and `GRPOConfig`.

Shapes: logps, old_logps, ref_logps and mask are `[B, L]` over completion tokens (mask 1 = a real
completion token, the end token included; 0 = after the end token, or padding); advantages and
rewards are one number per completion, `[B]`, grouped contiguously (rows g*G .. g*G+G-1 are the
samples of prompt g).
"""
import math
import time
import warnings

import torch

from .distributed import all_gather_object, all_reduce_sum
from .logprobs import forward_logits, per_token_logps
from .rollout import RolledOut, move, offline_rollout, online_rollout, reward_functions
from .runtime import autocast_context
from .trainer import Trainer

SCALES = ("group", "batch", "none")
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


def group_advantages(rewards, group_size, scale="group", eps=1e-4):
    """A = r - mean of its group, divided by a standard deviation chosen by `scale`.

    As TRL's `scale_rewards`: "group" divides by the group's std (the original GRPO), "batch" by
    the std of every reward in the batch (Lite PPO), "none" does not divide (Dr. GRPO: dividing
    by std over-weights prompts that are too easy or too hard). The std is torch's default, the
    unbiased (n - 1) one, and `eps` = 1e-4, as in TRL. A group whose rewards are all equal
    carries no signal and gets exactly 0."""
    rewards = torch.as_tensor(rewards, dtype=torch.float32)
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 (a lone sample has nothing to be compared "
                         f"with), got {group_size}")
    if rewards.dim() != 1 or rewards.numel() % group_size != 0:
        raise ValueError(f"rewards must be one number per completion, [N] with N divisible by "
                         f"group_size={group_size}; got shape {tuple(rewards.shape)}")
    grouped = rewards.view(-1, group_size)
    centered = grouped - grouped.mean(dim=1, keepdim=True)
    # the float mean of equal numbers can be off by an ulp: make "no signal" exactly zero
    all_equal = (grouped == grouped[:, :1]).all(dim=1, keepdim=True)
    centered = torch.where(all_equal, torch.zeros_like(centered), centered)
    if scale == "group":
        centered = centered / (grouped.std(dim=1, keepdim=True) + eps)
    elif scale == "batch":
        centered = centered / (rewards.std() + eps)
    return centered.view(-1)


def k3_kl(logps, ref_logps):
    """Schulman's k3 estimator of KL(policy || ref) per token: exp(d) - d - 1 with d = ref - logp.

    Unbiased for samples from the policy, never negative, and 0 with zero gradient where the two
    agree. Written as expm1(d) - d, which is the same number without the cancellation that can
    push exp(d) - d - 1 a rounding error below zero."""
    d = ref_logps - logps
    return torch.expm1(d) - d


def grpo_loss_count(mask, loss_type="grpo", max_completion_length=None):
    """What `grpo_loss`'s loss_sum is a sum over, for one batch: the divisor of its mean."""
    if loss_type == "dapo":
        return mask.sum()
    units = {"grpo": mask.shape[0], "bnpo": 1}
    if loss_type == "dr_grpo":
        units["dr_grpo"] = mask.shape[0] * max_completion_length
    return torch.tensor(units[loss_type], device=mask.device)


def grpo_loss(logps, old_logps, ref_logps, advantages, mask, clip_eps=0.2, clip_eps_high=None,
              beta=0.0, loss_type="grpo", max_completion_length=None, entropy=None):
    """The clipped GRPO objective, negated, as `(loss_sum, metrics)`: the loss summed over the
    units that `grpo_loss_count` counts, so that a trainer can divide by a whole step's count
    (the batch's own mean is loss_sum / grpo_loss_count(mask, loss_type, ...)).

    Per token: ratio = exp(logps - old_logps), objective = min(ratio * A, clip(ratio, 1 - clip_eps,
    1 + clip_eps_high) * A), loss = -objective + beta * k3_kl. old_logps and ref_logps are
    constants (detached). Tokens with mask 0 are replaced before any arithmetic, so whatever they
    hold never reaches the loss or its gradient.

    The units, as TRL's `loss_type`:
      "grpo"    completions: each one's mean token loss (the paper; a short completion's tokens
                weigh more, a length bias)
      "dr_grpo" completions * max_completion_length: token losses summed (Dr. GRPO's constant)
      "dapo"    tokens: token losses summed (TRL divides by the whole step's tokens)
      "bnpo"    the batch: its token losses over its own tokens (a trainer that splits a step
                averages micro-batch means, as TRL does)

    Metrics are (sum, count) over this batch's completion tokens, with TRL's names:
    `clip_ratio/low_mean` (ratio < 1 - clip_eps with A < 0: the low clip removed the gradient),
    `clip_ratio/high_mean` (ratio > 1 + clip_eps_high with A > 0), `clip_ratio/region_mean`
    (either), `kl` (k3) when beta > 0, and `entropy` when the per-token `entropy` is given."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if loss_type == "dr_grpo" and (max_completion_length is None or max_completion_length < 1):
        raise ValueError("loss_type='dr_grpo' divides by B * max_completion_length: pass "
                         f"max_completion_length >= 1 (got {max_completion_length})")
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if beta > 0 and ref_logps is None:
        raise ValueError(f"beta={beta} adds a KL penalty towards the reference model, which needs "
                         "ref_logps; pass the reference model's log-probs, or set beta=0")
    clip_eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    if clip_eps < 0 or clip_eps_high < 0:
        raise ValueError(f"clip_eps and clip_eps_high must be >= 0, got {clip_eps} and "
                         f"{clip_eps_high}")
    named = {"old_logps": old_logps, "mask": mask}
    if beta > 0:
        named["ref_logps"] = ref_logps
    if logps.dim() != 2:
        raise ValueError(f"logps must be [B, L] over completion tokens, got {tuple(logps.shape)}")
    for name, t in named.items():
        if t.shape != logps.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}; expected {tuple(logps.shape)} "
                             "like logps")
    if advantages.shape != logps.shape[:1]:
        raise ValueError(f"advantages must be one number per completion, [{logps.shape[0]}]; "
                         f"got {tuple(advantages.shape)}")

    mask = mask.bool()
    zero = torch.zeros((), dtype=logps.dtype, device=logps.device)
    # replace, don't multiply: 0 * inf is NaN, and where() sends zero gradient to what it drops
    logps = torch.where(mask, logps, zero)
    old_logps = torch.where(mask, old_logps.detach(), zero)
    A = advantages.detach().to(logps.dtype).unsqueeze(1)
    ratio = torch.exp(logps - old_logps)
    clipped_ratio = torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps_high)
    per_token_loss = -torch.min(ratio * A, clipped_ratio * A)
    if beta > 0:
        kl = k3_kl(logps, torch.where(mask, ref_logps.detach(), zero))
        per_token_loss = per_token_loss + beta * kl
    per_token_loss = torch.where(mask, per_token_loss, zero)

    if loss_type == "grpo":
        loss_sum = (per_token_loss.sum(-1) / mask.sum(-1).clamp(min=1)).sum()
    elif loss_type == "bnpo":
        loss_sum = per_token_loss.sum() / mask.sum().clamp(min=1)
    else:  # dr_grpo, dapo: the token losses summed; the divisor is grpo_loss_count's
        loss_sum = per_token_loss.sum()

    with torch.no_grad():
        tokens = mask.sum()
        low = ((ratio < 1 - clip_eps) & (A < 0) & mask).sum()
        high = ((ratio > 1 + clip_eps_high) & (A > 0) & mask).sum()
        metrics = {"clip_ratio/low_mean": (low, tokens), "clip_ratio/high_mean": (high, tokens),
                   "clip_ratio/region_mean": (low + high, tokens)}  # the two never overlap
        if beta > 0:
            metrics["kl"] = (torch.where(mask, kl, zero).sum(), tokens)
        if entropy is not None:
            metrics["entropy"] = (torch.where(mask, entropy, zero).sum(), tokens)
    return loss_sum, metrics


def reward_metrics(rewards, group_size, batch_std=None):
    """reward, reward_std and frac_reward_zero_std as (sum, n), TRL's way: reward_std is the
    mean of the groups' stds, or the std of the whole batch when `batch_std` (scale_rewards=
    "batch") is given."""
    grouped = rewards.view(-1, group_size)
    groups, N = grouped.shape[0], rewards.numel()
    all_equal = (grouped == grouped[:, :1]).all(dim=1)
    std = (grouped.std(dim=1).sum(), groups) if batch_std is None else (batch_std * N, N)
    return {"reward": (rewards.sum(), N), "reward_std": std,
            "frac_reward_zero_std": (all_equal.sum(), groups)}


def global_std(column):
    """The unbiased std of a 1-D tensor spread over every rank: from one all-reduce of its sum,
    sum of squares and count, in float64."""
    stats = all_reduce_sum(torch.stack([column.sum(), column.square().sum(),
                                        torch.tensor(len(column))]).double())
    total, squares, n = stats.tolist()
    return math.sqrt(max(0.0, squares - total * total / n) / (n - 1))


# --- GRPOTrainer ------------------------------------------------------------------------------

class GRPOTrainer(Trainer):
    """GRPO: sample a group of completions per prompt, score them, make the better-than-average ones
    more likely. Batches are online (`prompt_input_ids`, `prompt_attention_mask`, left-padded, plus
    what `reward_fn(prompts, completions, **batch)` reads) or offline (`input_ids`, `response_mask`,
    `rewards`, num_samples_per_prompt rows per prompt); see rollout.py. A step's grad_accum_steps
    loader batches are rolled out together, each a micro-batch of whole groups, and trained on for
    num_iterations steps: the ratio pi / pi_old is exactly 1 on the first use (old_logps =
    logps.detach()); the clip matters from the second on.

    The step's loss is normalized over every micro-batch and rank; `count` and `compute_loss` give:
      grpo     count = completions, loss_sum = sum of each completion's mean token loss
      dr_grpo  count = completions * max_completion_length, loss_sum = sum of token losses
      dapo     count = completion tokens, loss_sum = sum of token losses (TRL: the global count)
      bnpo     count = 1, loss_sum = this micro-batch's mean token loss: the step averages
               micro-batch means, as TRL does; unlike dapo it depends on the split"""

    def __init__(self, model, optimizer, train_loader, num_samples_per_prompt=4, clip_eps=0.2,
                 device="auto", max_epochs=1, reward_fn=None, reward_weights=None, tokenizer=None,
                 ref_model=None, beta=0.0, num_iterations=1, clip_eps_high=None, loss_type="grpo",
                 scale_rewards="group", temperature=1.0, top_k=None, max_completion_length=8,
                 generation_seed=None, **trainer_kwargs):
        if num_samples_per_prompt is None or num_samples_per_prompt < 2:
            raise ValueError(f"num_samples_per_prompt must be >= 2: a completion's advantage is "
                             f"its reward relative to the others of its group; "
                             f"got {num_samples_per_prompt}")
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
        if scale_rewards not in SCALES:
            raise ValueError(f"scale_rewards must be one of {SCALES}, got {scale_rewards!r}")
        if (min(num_iterations, max_completion_length, 1 if top_k is None else top_k) < 1
                or temperature <= 0):
            raise ValueError("need num_iterations, max_completion_length, top_k (or None) >= 1 and "
                             "temperature > 0; "
                             f"got {num_iterations}, {max_completion_length}, "
                             f"{top_k}, {temperature}")
        if beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        if beta > 0 and ref_model is None:
            raise ValueError(f"beta={beta} adds a KL penalty towards a frozen reference model: "
                             "pass ref_model=copy.deepcopy(model) made before training, "
                             "or set beta=0")
        if beta > 0 and ref_model is model:
            raise ValueError("ref_model is the policy itself; pass a frozen copy, "
                             "copy.deepcopy(model)")
        fns, weights, names = reward_functions(reward_fn, reward_weights)
        super().__init__(model, optimizer, train_loader, device=device, max_epochs=max_epochs,
                         **trainer_kwargs)
        if trainer_kwargs.get("max_steps") is None:
            self.max_steps *= num_iterations  # every generation is trained on num_iterations times
        self.num_samples_per_prompt, self.clip_eps, self.clip_eps_high, self.beta = (
            num_samples_per_prompt, clip_eps, clip_eps_high, beta)
        self.reward_fns, self.reward_weights, self.reward_names = fns, weights, names
        self.tokenizer, self.num_iterations, self.loss_type = tokenizer, num_iterations, loss_type
        self.scale_rewards, self.temperature, self.top_k = scale_rewards, temperature, top_k
        self.max_completion_length = max_completion_length
        self.ref_model = None
        if beta > 0:
            self.ref_model = ref_model.to(self.device).eval().requires_grad_(False)
        elif ref_model is not None:
            warnings.warn("beta=0: ref_model is not used (there is no KL penalty)", stacklevel=2)
        # None: sample from torch's global RNG, which checkpoints already hold
        self.generator = None
        if generation_seed is not None:
            # one stream per rank, or every rank samples the same tokens
            self.generator = torch.Generator(self.device).manual_seed(generation_seed
                                                                      + self.dist.rank)
        self.rollouts, self.rollout_uses, self.generation_seconds = None, 0, 0.0
        self.num_tokens = 0  # prompt + completion tokens generated, every rank's
        self._rank_states = None  # every rank's sampling state, gathered at each checkpoint
        if self.val_loader is not None:
            self.val_loader = RolledOut(self.val_loader, self)

    # --- rollouts -----------------------------------------------------------------------------
    def step_batches(self, batches):
        """The step's micro-batches: freshly rolled out every num_iterations steps, else reused.
        The time spent sampling adds up in generation_seconds (the benchmark reads it)."""
        if self.rollouts is None or self.rollout_uses == self.num_iterations:
            start = time.perf_counter()
            micro = [next(batches) for _ in range(self.grad_accum_steps)]
            self.rollouts, self.rollout_uses = self.roll_out(micro), 0
            self.generation_seconds += time.perf_counter() - start
        self.rollout_uses += 1
        return self.rollouts

    def roll_out(self, batches):
        with torch.no_grad(), autocast_context(self.device, self.amp_dtype):
            rollouts = [self.roll_out_one(b) for b in batches]
        local = torch.cat([r["rewards"] for r in rollouts])
        G = self.num_samples_per_prompt
        if self.scale_rewards == "batch":  # the std of every rank's rewards, as TRL: gather them
            everyone = [r.to(local.device) for r in all_gather_object(local.cpu())]
            start = sum(len(r) for r in everyone[:self.dist.rank])
            everyone = torch.cat(everyone)
            advantages = group_advantages(everyone, G, self.scale_rewards)[start:start + len(local)]
            std = everyone.std()
        else:  # a group never spans ranks, so each rank's advantages are its own
            advantages, std = group_advantages(local, G, self.scale_rewards), None
        # TRL's figures over the whole batch, every rank's: each reward function's std, and the
        # tokens generated so far; the same on every rank, logged once per step as (value, 1)
        first = rollouts[0]["metrics"]
        for i, name in enumerate(self.reward_names if "per_fn" in rollouts[0] else []):
            column = torch.cat([r["per_fn"][:, i] for r in rollouts])
            first[f"rewards/{name}/std"] = (torch.tensor(global_std(column)), 1)
        tokens = sum(r["input_ids"].numel() if r["attention_mask"] is None
                     else r["attention_mask"].sum() for r in rollouts)
        self.num_tokens += int(all_reduce_sum(torch.as_tensor(tokens).double()))
        for r, A in zip(rollouts, advantages.split([len(r["rewards"]) for r in rollouts])):
            r["advantages"] = A
            r["metrics"].update(reward_metrics(r["rewards"], G, std))
            with torch.no_grad(), autocast_context(self.device, self.amp_dtype):
                # pi_old is needed only when a rollout is reused; on its first use ratio = 1
                r["old_logps"] = self.logps(self.raw_model, r) if self.num_iterations > 1 else None
                r["ref_logps"] = self.logps(self.ref_model, r) if self.beta > 0 else None
        return rollouts

    def roll_out_one(self, batch):
        if "prompt_input_ids" in batch:
            if not self.reward_fns or self.tokenizer is None:
                raise ValueError("the batch holds prompt_input_ids (online GRPO), which needs "
                                 "reward_fn= (a function scoring completions) and tokenizer= "
                                 "(to decode them); pass both, or give offline batches with "
                                 "input_ids, response_mask and rewards")
            return online_rollout(self.raw_model, batch, self.tokenizer, self.reward_fns,
                                  self.reward_names, self.reward_weights,
                                  self.num_samples_per_prompt, self.max_completion_length,
                                  self.temperature, self.top_k, self.generator)
        if "input_ids" in batch:
            if self.reward_fns:
                raise ValueError("the batch holds input_ids (offline GRPO), whose rewards come "
                                 "with it, but reward_fn was given; drop reward_fn, or give "
                                 "prompt batches (prompt_input_ids)")
            return offline_rollout(batch, self.num_samples_per_prompt,
                                   self.max_completion_length if self.loss_type == "dr_grpo"
                                   else None)
        raise ValueError(f"GRPO batch has neither 'prompt_input_ids' (online) nor 'input_ids' "
                         f"(offline); it has {sorted(batch)}")

    def logps(self, model, rollout, with_entropy=False):
        logits = forward_logits(model, rollout["input_ids"], rollout["attention_mask"])
        return per_token_logps(logits, rollout["input_ids"], self.temperature, with_entropy)

    # --- the loss -----------------------------------------------------------------------------
    def count(self, batch):
        return grpo_loss_count(batch["completion_mask"], self.loss_type,
                               self.max_completion_length)

    def count_tokens(self, batch):
        return batch["completion_mask"].sum()

    def compute_loss(self, model, batch):
        logps, entropy = self.logps(model, batch, with_entropy=True)
        old = batch["old_logps"]
        loss_sum, metrics = grpo_loss(
            logps, logps.detach() if old is None else old, batch["ref_logps"], batch["advantages"],
            batch["completion_mask"], clip_eps=self.clip_eps, clip_eps_high=self.clip_eps_high,
            beta=self.beta, loss_type=self.loss_type,
            max_completion_length=self.max_completion_length, entropy=entropy)
        return loss_sum, {**metrics, **batch["metrics"]}

    def training_step(self, micro):
        record = super().training_step(micro)
        record["num_tokens"] = self.num_tokens  # prompt + completion tokens generated so far
        return record

    # --- checkpoints: the cached rollouts and the sampling stream, for an exact resume ---------
    def save_checkpoint(self):
        mine = {"generator": None if self.generator is None else self.generator.get_state(),
                "rollouts": move(self.rollouts, "cpu"), "rollout_uses": self.rollout_uses}
        self._rank_states = all_gather_object(mine)  # every rank's, before rank 0 writes
        super().save_checkpoint()

    def state_dict(self):
        state = super().state_dict()
        state["grpo"] = self._rank_states
        state["num_tokens"] = self.num_tokens
        return state

    def load_state_dict(self, state, source="checkpoint"):
        super().load_state_dict(state, source)
        if state.get("grpo") is not None:
            mine = state["grpo"][self.dist.rank]
            if self.generator is not None and mine["generator"] is not None:
                self.generator.set_state(mine["generator"])
            self.rollouts = move(mine["rollouts"], self.device)
            self.rollout_uses = mine["rollout_uses"]
        self.num_tokens = state.get("num_tokens", 0)

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
import torch
import torch.nn.functional as F

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
        raise ValueError(f"group_size must be >= 2 (a lone sample has nothing to be compared with), "
                         f"got {group_size}")
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


def per_token_logps(logits, input_ids, temperature=1.0):
    """log p(token t+1 | tokens <= t) for every position, in float32: `[B, T-1]`.

    The logits are divided by the sampling temperature first, so these are the log-probs of the
    distribution the completions were actually sampled from (TRL does the same)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if logits.dim() != 3 or input_ids.shape != logits.shape[:2]:
        raise ValueError(f"logits must be [B, T, V] and input_ids [B, T]; got {tuple(logits.shape)} "
                         f"and {tuple(input_ids.shape)}")
    logps = F.log_softmax(logits[:, :-1].float() / temperature, dim=-1)
    return logps.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)


def k3_kl(logps, ref_logps):
    """Schulman's k3 estimator of KL(policy || ref) per token: exp(d) - d - 1 with d = ref - logp.

    Unbiased for samples from the policy, never negative, and 0 with zero gradient where the two
    agree. Written as expm1(d) - d, which is the same number without the cancellation that can
    push exp(d) - d - 1 a rounding error below zero."""
    d = ref_logps - logps
    return torch.expm1(d) - d


def grpo_loss(logps, old_logps, ref_logps, advantages, mask, clip_eps=0.2, clip_eps_high=None,
              beta=0.0, loss_type="grpo", max_completion_length=None, num_items=None):
    """The clipped GRPO objective, negated, and its metrics: `(loss, metrics)`.

    Per token: ratio = exp(logps - old_logps), objective = min(ratio * A, clip(ratio, 1 - clip_eps,
    1 + clip_eps_high) * A), loss = -objective + beta * k3_kl. old_logps and ref_logps are
    constants (detached). Tokens with mask 0 are replaced before any arithmetic, so whatever they
    hold never reaches the loss or its gradient.

    How the token losses are averaged, as TRL's `loss_type`:
      "grpo"    mean over each sequence's tokens, then mean over sequences (the paper; short
                completions weigh more per token, a length bias)
      "bnpo"    sum / number of tokens in this batch
      "dr_grpo" sum / (B * max_completion_length), a constant (Dr. GRPO)
      "dapo"    sum / number of tokens (TRL counts the whole accumulated, all-process batch)
    `num_items`, if given, replaces the token count of "bnpo" and "dapo". A trainer that splits
    a step into micro-batches passes the step's total token count, so the summed micro-batch
    losses equal the full-batch loss; under DDP, whose all-reduce averages gradients over ranks,
    pass total / world_size, as TRL does.

    Metrics (detached 0-d tensors, fractions of this batch's completion tokens, TRL's names):
    `clip_ratio/low_mean` (ratio < 1 - clip_eps with A < 0: the low clip removed the gradient),
    `clip_ratio/high_mean` (ratio > 1 + clip_eps_high with A > 0), `clip_ratio/region_mean`
    (either), and `kl` (mean k3) when beta > 0."""
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
        raise ValueError(f"clip_eps and clip_eps_high must be >= 0, got {clip_eps} and {clip_eps_high}")
    if num_items is not None and num_items <= 0:
        raise ValueError(f"num_items must be > 0 (the token count to divide by), got {num_items}")
    named = {"old_logps": old_logps, "mask": mask}
    if beta > 0:
        named["ref_logps"] = ref_logps
    if logps.dim() != 2:
        raise ValueError(f"logps must be [B, L] over completion tokens, got {tuple(logps.shape)}")
    for name, t in named.items():
        if t.shape != logps.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}; expected {tuple(logps.shape)} like logps")
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

    tokens = mask.sum().clamp(min=1).to(logps.dtype)
    if loss_type == "grpo":
        loss = (per_token_loss.sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    elif loss_type == "dr_grpo":
        loss = per_token_loss.sum() / (logps.shape[0] * max_completion_length)
    else:  # bnpo, dapo
        loss = per_token_loss.sum() / (tokens if num_items is None else num_items)

    with torch.no_grad():
        low = (ratio < 1 - clip_eps) & (A < 0) & mask
        high = (ratio > 1 + clip_eps_high) & (A > 0) & mask
        metrics = {"clip_ratio/low_mean": low.sum() / tokens,
                   "clip_ratio/high_mean": high.sum() / tokens,
                   "clip_ratio/region_mean": (low | high).sum() / tokens}
        if beta > 0:
            metrics["kl"] = torch.where(mask, kl, zero).sum() / tokens
    return loss, metrics


# --- GRPOTrainer ------------------------------------------------------------------------------
# The trainer (sampling, rewards, advantages, the loss above) is added below this line.

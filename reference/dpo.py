"""DPO: train the policy to prefer the chosen completion over the rejected one, measured
against a frozen reference model (Rafailov et al., 2023, "Direct Preference Optimization").

Batch: `chosen_input_ids`, `chosen_labels`, `rejected_input_ids`, `rejected_labels` `[B, T]`
(labels at the same positions as input_ids, -100 = not part of the completion), optional
`chosen_attention_mask`, `rejected_attention_mask`, and optional precomputed
`ref_chosen_logps`, `ref_rejected_logps` `[B]`. Chosen and rejected may have different widths.

The math is plain functions, so tests and notebooks can call them directly.
"""
import warnings

import torch
import torch.nn.functional as F

from .sft import check_batch

LOSS_TYPES = ("sigmoid", "ipo", "hinge")


def sequence_logps(logits, labels):
    """log p(completion | prompt): the summed log-probs of the completion tokens, one per row [B].

    As in `sft_loss_sum`, the logits at position t predict the token at t+1. Prompt and padding
    positions (label -100) add nothing, so neither the prompt nor extra padding changes it.
    log_softmax runs in float32: in bf16, sums over many tokens lose the small differences
    between chosen and rejected that DPO is made of."""
    logits, targets = logits[:, :-1, :].float(), labels[:, 1:]
    mask = targets != -100
    per_token = logits.log_softmax(dim=-1).gather(2, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    # where(), not a multiply: a -inf log-prob at a masked position times 0 would be NaN
    return torch.where(mask, per_token, torch.zeros_like(per_token)).sum(dim=-1)


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
             beta=0.1, loss_type="sigmoid", label_smoothing=0.0):
    """Per-pair losses [B] and the implicit rewards beta * log(pi / pi_ref) of each side [B].

    logits = (log pi(chosen) - log pi(rejected)) - (log ref(chosen) - log ref(rejected)): how
    much more the policy prefers chosen than the reference did. The loss types follow TRL:
      sigmoid: -log sigmoid(beta * logits), the DPO paper's loss; with label_smoothing = e it
               is conservative DPO (cDPO), which assumes each label is flipped with probability e
      ipo:     (logits - 1 / (2 * beta))**2, regresses the margin to a target instead of pushing
               it to infinity
      hinge:   relu(1 - beta * logits), the SLiC margin loss
    The rewards are detached: they are for logging, not for the gradient."""
    if not beta > 0:
        raise ValueError(f"beta must be > 0 (it scales the KL penalty to the reference; 0.1 is "
                         f"usual), got beta={beta}")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose one of {', '.join(LOSS_TYPES)}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5) (the probability that a preference "
                         f"label is wrong), got {label_smoothing}")
    logits = (policy_chosen_logps - policy_rejected_logps) - (ref_chosen_logps - ref_rejected_logps)
    if loss_type == "sigmoid":
        # logsigmoid, not log(sigmoid()): stays finite when beta * logits is +-1e4
        losses = (-F.logsigmoid(beta * logits) * (1 - label_smoothing)
                  - F.logsigmoid(-beta * logits) * label_smoothing)
    elif loss_type == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    else:
        losses = torch.relu(1 - beta * logits)
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


def dpo_metrics(chosen_rewards, rejected_rewards, policy_chosen_logps, policy_rejected_logps):
    """TRL's DPO metrics as `name: (sum over pairs, number of pairs)`.

    Sums, not means: the trainer adds them over micro-batches and ranks and divides once, so
    the logged mean does not depend on how the step's pairs were split."""
    n = chosen_rewards.numel()
    chosen_rewards, rejected_rewards = chosen_rewards.detach().float(), rejected_rewards.detach().float()
    return {
        "rewards/chosen": (chosen_rewards.sum(), n),
        "rewards/rejected": (rejected_rewards.sum(), n),
        "rewards/accuracies": ((chosen_rewards > rejected_rewards).float().sum(), n),
        "rewards/margins": ((chosen_rewards - rejected_rewards).sum(), n),
        "logps/chosen": (policy_chosen_logps.detach().float().sum(), n),
        "logps/rejected": (policy_rejected_logps.detach().float().sum(), n),
    }


def _pad_right(x, T, value):
    return F.pad(x, (0, T - x.shape[1]), value=value)


def concat_pairs(batch, pad_id):
    """Chosen rows then rejected rows as one `[2B, T]` batch: (input_ids, labels, attention_mask).

    One forward pass over both halves instead of two: the weights are read once, and under DDP
    or FSDP there is one forward per backward. The narrower half is right-padded (ids with
    pad_id, labels with -100, mask with 0). A missing mask means every position is a token."""
    T = max(batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1])
    ids, labels, masks = [], [], []
    for side in ("chosen", "rejected"):
        side_ids = batch[f"{side}_input_ids"]
        mask = batch.get(f"{side}_attention_mask")
        if mask is None:
            mask = torch.ones_like(side_ids)
        ids.append(_pad_right(side_ids, T, pad_id))
        labels.append(_pad_right(batch[f"{side}_labels"], T, -100))
        masks.append(_pad_right(mask, T, 0))
    return torch.cat(ids), torch.cat(labels), torch.cat(masks)


def check_dpo_batch(batch):
    """ValueError for a missing or misshapen key or a row with nothing to score; a warning for
    pairs whose chosen and rejected are the same (their logits are 0: no gradient, loss ln 2).
    Returns the number of pairs."""
    for side in ("chosen", "rejected"):
        keys = (f"{side}_input_ids", f"{side}_labels")
        if f"{side}_attention_mask" in batch:
            keys += (f"{side}_attention_mask",)
        check_batch(batch, keys, "DPO")
    B = batch["chosen_input_ids"].shape[0]
    if batch["rejected_input_ids"].shape[0] != B:
        raise ValueError(f"DPO batch has {B} chosen rows but {batch['rejected_input_ids'].shape[0]} "
                         "rejected rows; each pair needs one of each")
    for key in ("ref_chosen_logps", "ref_rejected_logps"):
        if key in batch and tuple(batch[key].shape) != (B,):
            raise ValueError(f"DPO batch key {key!r} has shape {tuple(batch[key].shape)}; "
                             f"expected [B] = ({B},), one log-prob per pair")
    for side in ("chosen", "rejected"):
        # label 0 is never predicted (nothing comes before it), hence the shift
        empty = ((batch[f"{side}_labels"][:, 1:] != -100).sum(dim=1) == 0).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"DPO batch row {empty[0]} of {side + '_labels'!r} is a completion with "
                             "no tokens (every label is -100), so it has no log-prob to compare; "
                             "label the completion tokens, or drop the pair")
    ids, labels, mask = concat_pairs(batch, pad_id=0)
    ids = ids * mask  # padding may differ in value; only real tokens decide whether two rows match
    same = (ids[:B] == ids[B:]).all(1) & (labels[:B] == labels[B:]).all(1) & (mask[:B] == mask[B:]).all(1)
    if same.any():
        warnings.warn(f"{int(same.sum())} of {B} DPO pairs have identical chosen and rejected "
                      "sequences: they add no gradient but still count in the mean; check the "
                      "preference data", stacklevel=2)
    return B


# --- DPOTrainer ---------------------------------------------------------------------------
# The trainer (a `Trainer` subclass: `count` = pairs, `compute_loss` = the functions above)
# goes below this line.

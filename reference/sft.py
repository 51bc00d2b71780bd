"""SFT: next-token cross-entropy on the target tokens only.

Batch: `input_ids [B, T]`, `labels [B, T]` (same positions as input_ids, -100 = not trained;
the loss shifts them), optional `attention_mask [B, T]`.
"""
import math

import torch
import torch.nn.functional as F

from .logprobs import check_batch, forward_logits
from .runtime import autocast_context
from .trainer import Trainer


def sft_loss_sum(logits, labels):
    """Summed next-token cross-entropy over target tokens, and how many there are.

    The logits at position t predict the token at t+1, so labels shift left by one; -100 labels
    (prompt, padding) are ignored. The trainer divides by the global count."""
    logits, targets = logits[:, :-1, :], labels[:, 1:]
    loss_sum = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1),
                               ignore_index=-100, reduction="sum")
    return loss_sum, (targets != -100).sum()


@torch.no_grad()
def heldout_loss(model, loader, device, amp_dtype=None):
    """The mean SFT loss over every target token of a held-out loader (model in eval mode)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in loader:
        ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
        mask = batch.get("attention_mask")
        with autocast_context(device, amp_dtype):
            loss_sum, n = sft_loss_sum(forward_logits(model, ids, None if mask is None
                                                      else mask.to(device)), labels)
        total, count = total + loss_sum.item(), count + n.item()
    model.train(was_training)
    if count == 0:
        raise ValueError("the held-out loader has no target tokens (every label is -100)")
    if not math.isfinite(total / count):
        raise FloatingPointError(f"the held-out loss is {total / count}; lower the learning rate")
    return total / count


class SFTTrainer(Trainer):
    """Supervised fine-tuning: the mean loss over every target token of the step."""

    def count(self, batch):
        check_batch(batch, ("input_ids", "labels"), "SFT")
        return (batch["labels"][:, 1:] != -100).sum()

    def compute_loss(self, model, batch):
        logits = forward_logits(model, batch["input_ids"], batch.get("attention_mask"))
        loss_sum, n = sft_loss_sum(logits, batch["labels"])
        # TRL's mean_token_accuracy: the target tokens whose argmax is right (-100 never is)
        right = (logits[:, :-1].argmax(dim=-1) == batch["labels"][:, 1:]).sum()
        return loss_sum, {"mean_token_accuracy": (right, n)}

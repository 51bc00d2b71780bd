"""SFT: next-token cross-entropy on the target tokens only.

Batch: `input_ids [B, T]`, `labels [B, T]` (same positions as input_ids, -100 = not trained;
the loss shifts them), optional `attention_mask [B, T]`.
"""
import torch.nn.functional as F

from .logprobs import check_batch, forward_logits
from .trainer import Trainer


def sft_loss_sum(logits, labels):
    """Summed next-token cross-entropy over target tokens, and how many there are.

    The logits at position t predict the token at t+1, so labels shift left by one; -100 labels
    (prompt, padding) are ignored. The trainer divides by the global count."""
    logits, targets = logits[:, :-1, :], labels[:, 1:]
    loss_sum = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1),
                               ignore_index=-100, reduction="sum")
    return loss_sum, (targets != -100).sum()


class SFTTrainer(Trainer):
    """Supervised fine-tuning: the mean loss over every target token of the step."""

    def count(self, batch):
        check_batch(batch, ("input_ids", "labels"), "SFT")
        return (batch["labels"][:, 1:] != -100).sum()

    def compute_loss(self, model, batch):
        logits = forward_logits(model, batch["input_ids"], batch.get("attention_mask"))
        loss_sum, _ = sft_loss_sum(logits, batch["labels"])
        return loss_sum, {}

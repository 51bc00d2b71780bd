"""SFT: next-token cross-entropy on the target tokens only.

Batch: `input_ids [B, T]`, `labels [B, T]` (same positions as input_ids, -100 = not trained;
the loss shifts them), optional `attention_mask [B, T]`.
"""
import torch
import torch.nn.functional as F

from .trainer import Trainer


def logits_of(output):
    """TinyGPT returns logits; Hugging Face causal LMs return an object with `.logits`."""
    return output if torch.is_tensor(output) else output.logits


def sft_loss_sum(logits, labels):
    """Summed next-token cross-entropy over target tokens, and how many there are.

    The logits at position t predict the token at t+1, so labels shift left by one; -100 labels
    (prompt, padding) are ignored. The trainer divides by the global count."""
    logits, targets = logits[:, :-1, :], labels[:, 1:]
    loss_sum = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1),
                               ignore_index=-100, reduction="sum")
    return loss_sum, (targets != -100).sum()


def per_token_logps(logits, input_ids, temperature=1.0):
    """log p(token t+1 | tokens <= t) for every position, in float32: `[B, T-1]`. DPO sums them
    over the completion; GRPO trains on them token by token.

    The logits are divided by the sampling temperature first, so these are the log-probs of the
    distribution the completions were actually sampled from (TRL does the same)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if logits.dim() != 3 or input_ids.shape != logits.shape[:2]:
        raise ValueError(f"logits must be [B, T, V] and input_ids [B, T]; got {tuple(logits.shape)} "
                         f"and {tuple(input_ids.shape)}")
    logps = F.log_softmax(logits[:, :-1].float() / temperature, dim=-1)
    return logps.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)


def check_batch(batch, keys, method):
    """ValueError naming the first missing or misshapen key of a batch."""
    for key in keys:
        if key not in batch:
            raise ValueError(f"{method} batch is missing {key!r} (it has {sorted(batch)}); "
                             f"the collator must return {list(keys)}")
    shape = batch[keys[0]].shape
    for key in keys:
        if batch[key].dim() != 2 or batch[key].shape != shape:
            raise ValueError(f"{method} batch key {key!r} has shape {tuple(batch[key].shape)}; "
                             f"expected [B, T] matching {keys[0]!r} {tuple(shape)}")


class SFTTrainer(Trainer):
    """Supervised fine-tuning: the mean loss over every target token of the step."""

    def count(self, batch):
        check_batch(batch, ("input_ids", "labels"), "SFT")
        return (batch["labels"][:, 1:] != -100).sum()

    def compute_loss(self, model, batch):
        logits = logits_of(model(batch["input_ids"], attention_mask=batch.get("attention_mask")))
        loss_sum, _ = sft_loss_sum(logits, batch["labels"])
        return loss_sum, {}

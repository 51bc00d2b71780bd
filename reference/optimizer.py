"""configure_optimizer and the learning-rate schedule.

Weight decay pulls weights towards zero. It is meant for the matrices that mix features
(linear layers); decaying biases, LayerNorm gains or embedding rows only hurts, so those go in a
second group with weight_decay=0.
"""
import math

import torch

OPTIMIZERS = ("adamw", "adam", "sgd")


def param_groups(model, weight_decay):
    """Two groups: 2-D weights of linear layers decay; biases, norms and embeddings do not."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def configure_optimizer(model, optimizer_type="adamw", lr=1e-3, weight_decay=0.1,
                        betas=(0.9, 0.95), eps=1e-8, momentum=0.9):
    """The optimizer for `model`, with weight decay on matrices only.

    optimizer_type: "adamw" (default), "adam" (L2 added to the gradient, as torch.optim.Adam
    does) or "sgd" (with momentum)."""
    kind = str(optimizer_type).lower()
    if kind not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer_type {optimizer_type!r}; choose one of {OPTIMIZERS}")
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    groups = param_groups(model, weight_decay)
    if kind == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)
    if kind == "adam":
        return torch.optim.Adam(groups, lr=lr, betas=betas, eps=eps)
    return torch.optim.SGD(groups, lr=lr, momentum=momentum)


def warmup_cosine(step, warmup_steps, total_steps, min_ratio=0.1):
    """The LR multiplier at `step`: linear warmup from 0, then cosine decay to `min_ratio`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine_scheduler(optimizer, warmup_steps, total_steps, min_ratio=0.1):
    """A LambdaLR that applies `warmup_cosine`; its state_dict goes into checkpoints."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, warmup_steps, total_steps, min_ratio))

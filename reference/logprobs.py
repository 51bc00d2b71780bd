"""Log-probabilities from a causal LM's logits, and the batch checks: the bottom floor that SFT,
DPO, GRPO, rollouts and evaluation all stand on. Nothing here imports a trainer.

`forward_logits(model, input_ids, attention_mask)` is the one way every trainer runs a model:
TinyGPT returns logits, a Hugging Face causal LM returns an object with `.logits`. Positions
come from the attention mask (`positions_from_mask`), so a left-padded row starts at position 0
and its numbers do not depend on how much its batch-mates padded it.
"""
import inspect

import torch
import torch.nn.functional as F


def logits_of(output):
    """TinyGPT returns logits; Hugging Face causal LMs return an object with `.logits`."""
    return output if torch.is_tensor(output) else output.logits


def positions_from_mask(attention_mask):
    """The position of every token, counted over real tokens only [B, T]: a left-padded row
    starts at 0, as it would alone. Padding gets position 0 (left) or repeats the last real
    position (right); nothing attends to it, so its value only has to be a valid position.

    The one rule for every forward: TinyGPT uses it, and `forward_logits` and
    `reference.rollout.sample` pass it to every model whose forward takes `position_ids`.
    Many Hugging Face models otherwise number tokens from the start of the padded row, so a
    prompt would be shifted by its batch-mates' lengths (harmless with rotary embeddings up to
    rounding, wrong with learned absolute ones such as GPT-2's)."""
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)


_PARAMETERS = {}  # model class -> the names its forward takes, read once


def takes(model, name):
    """True when `model`'s forward names the keyword `name` (`position_ids`, `cache`, ...).

    Read from the forward's signature once per class. A wrapper (DDP's `.module`,
    torch.compile's `._orig_mod`) is looked through: its own forward takes `*args, **kwargs`
    and passes them on."""
    for wrapper in ("module", "_orig_mod"):
        if isinstance(getattr(model, wrapper, None), torch.nn.Module):
            model = getattr(model, wrapper)
    cls = type(model)
    if cls not in _PARAMETERS:
        _PARAMETERS[cls] = frozenset(inspect.signature(cls.forward).parameters)
    return name in _PARAMETERS[cls]


def position_kwargs(model, attention_mask):
    """`{"position_ids": ...}` from the mask when the model's forward takes them, else `{}`
    (TinyGPT places tokens from the mask itself)."""
    if attention_mask is None or not takes(model, "position_ids"):
        return {}
    return {"position_ids": positions_from_mask(attention_mask)}


def forward_logits(model, input_ids, attention_mask=None):
    """Logits [B, T, V] of `model` on a batch; every trainer forward goes through here, with
    positions from the mask (`positions_from_mask`) for a model that takes `position_ids`."""
    out = model(input_ids, attention_mask=attention_mask, **position_kwargs(model, attention_mask))
    return logits_of(out)


def per_token_logps(logits, input_ids, temperature=1.0, with_entropy=False):
    """log p(token t+1 | tokens <= t) for every position, in float32: `[B, T-1]`. DPO sums them
    over the completion; GRPO trains on them token by token.

    The logits are divided by the sampling temperature first, so these are the log-probs of the
    distribution the completions were actually sampled from (TRL does the same). With
    `with_entropy`, also the entropy of that distribution at every position, `[B, T-1]`."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if logits.dim() != 3 or input_ids.shape != logits.shape[:2]:
        raise ValueError(f"logits must be [B, T, V] and input_ids [B, T]; got "
                         f"{tuple(logits.shape)} and {tuple(input_ids.shape)}")
    logps = F.log_softmax(logits[:, :-1].float() / temperature, dim=-1)
    token_logps = logps.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    if not with_entropy:
        return token_logps
    # and the entropy of each position's whole distribution (TRL logs its mean as `entropy`)
    return token_logps, -(logps.exp() * logps).sum(dim=-1)


def sequence_logps(logits, labels):
    """log p(completion | prompt): the summed log-probs of the completion tokens, one per row [B].

    As in `sft_loss_sum`, the logits at position t predict the token at t+1. Prompt and padding
    positions (label -100) add nothing, so neither the prompt nor extra padding changes it.
    log_softmax runs in float32: in bf16, sums over many tokens lose the small differences
    between chosen and rejected that DPO is made of."""
    mask = labels[:, 1:] != -100
    per_token = per_token_logps(logits, labels.clamp(min=0))  # -100 -> any real id; masked below
    # where(), not a multiply: a -inf log-prob at a masked position times 0 would be NaN
    return torch.where(mask, per_token, torch.zeros_like(per_token)).sum(dim=-1)


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

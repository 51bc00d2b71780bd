"""Rollouts for GRPO: prompts in, scored completions out, and the prompt data that feeds them.

Online GRPO does this before any loss: repeat each prompt `group_size` times (one contiguous
group per prompt), sample completions (`sampler_for(model)`: TinyGPT's own KV-cache `generate()`,
or `sample()` for any other causal LM, a Hugging Face one included), keep each one up to and
including its first end token, decode it, and score it with the reward functions. Offline GRPO
skips all of that: its batches arrive with the completions and rewards already in them.

A rollout is a dict of tensors that `GRPOTrainer.compute_loss` trains on:
  input_ids [N, T], attention_mask [N, T] or None   prompt + completion, one row per sample
  completion_mask [N, T-1]                          1 where per_token_logps' position predicts a
                                                    completion token that is trained
  rewards [N], completion_ids [N, L] (online), metrics {name: (sum, n)}
The trainer adds advantages, old_logps and ref_logps.
"""
import functools
import inspect

import torch

from .logprobs import check_batch, forward_logits, logits_of, positions_from_mask, takes
from .model import end_rows, new_tokens, next_token
from .rewards import check_rewards


def special_ids(tokenizer):
    """(eos_id, pad_id) of our CharTokenizer or of a Hugging Face tokenizer."""
    eos = getattr(tokenizer, "eos_id", getattr(tokenizer, "eos_token_id", None))
    pad = getattr(tokenizer, "pad_id", getattr(tokenizer, "pad_token_id", None))
    if eos is None:
        raise ValueError("the tokenizer has no end token (eos_id / eos_token_id); GRPO needs one "
                         "to know where a completion ends")
    return eos, eos if pad is None else pad


def context_length(model):
    """The longest sequence the model accepts, or None if its config does not say."""
    cfg = getattr(model, "config", None)
    for name in ("block_size", "max_position_embeddings", "n_positions"):
        if getattr(cfg, name, None):
            return getattr(cfg, name)
    return None


def cache_argument(model):
    """The keyword under which `model`'s forward takes its KV cache back (`cache` in
    transformers 5, `past_key_values` before), or None when it takes none."""
    return next((name for name in ("cache", "past_key_values") if takes(model, name)), None)


@torch.no_grad()
def sample(model, input_ids, attention_mask=None, max_new_tokens=8, temperature=1.0, top_k=None,
           do_sample=True, eos_token_id=None, pad_token_id=0, generator=None, use_cache=True):
    """`TinyGPT.generate`'s contract for any causal LM whose forward takes `(input_ids,
    attention_mask=)` and returns logits or an object with `.logits`, such as a Hugging Face
    model: the new tokens [B, max_new_tokens], `pad_token_id` after a row's first end token
    (`end_rows`, TinyGPT's rule), each drawn by `next_token` from `generator`.

    Left-padded prompts are placed by `positions_from_mask`, so a prompt's completion does not
    depend on its batch-mates. With `use_cache` and a model whose forward takes `position_ids`
    and a cache (`cache` or `past_key_values`, as Hugging Face models do), the prompt runs once
    and each step feeds only the newest token; the cache is the model's own object, so each
    architecture keeps its own layout. Otherwise the whole sequence runs again for every token.

    Why not Hugging Face's `generate()`: it draws from torch's global RNG (no `generator=`, so
    no per-rank stream to checkpoint), and it fills every option a call leaves unset from the
    checkpoint's generation_config.json (top_p, repetition_penalty, a top_k of 50 by default):
    the completions would come from another distribution than the softmax(logits /
    temperature) whose log-probs GRPO trains on."""
    B = input_ids.shape[0]
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
    cache_name = cache_argument(model) if use_cache and takes(model, "position_ids") else None
    # only the last position's logits are needed: skip the prompt's [B, P, vocab] projection
    keep_last = {"logits_to_keep": 1} if cache_name and takes(model, "logits_to_keep") else {}
    seq, cache, tok = input_ids, None, None
    finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    out = []
    for _ in range(max_new_tokens):
        if cache_name is None:  # the whole sequence again
            logits = forward_logits(model, seq, mask)[:, -1, :]
        else:  # the prompt once, then only the newest token, placed after its row's real tokens
            new = seq if cache is None else tok[:, None]
            positions = positions_from_mask(mask)[:, -new.shape[1]:]
            past = {} if cache is None else {cache_name: cache}
            output = model(new, attention_mask=mask, position_ids=positions, use_cache=True,
                           **past, **keep_last)
            cache = getattr(output, cache_name)  # the output names it as the forward does
            logits = logits_of(output)[:, -1, :]
        tok, finished = end_rows(next_token(logits, do_sample, temperature, top_k, generator),
                                 finished, eos_token_id, pad_token_id)
        out.append(tok)
        seq = torch.cat([seq, tok[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        if eos_token_id is not None and bool(finished.all()):
            break
    return new_tokens(out, max_new_tokens, pad_token_id)


def sampler_for(model):
    """How to sample from `model`, chosen by what it offers: its own `generate()` when that
    follows TinyGPT's contract (left-padded `input_ids, attention_mask` in, the new tokens
    [B, max_new_tokens] out, drawn from `generator=`), else `sample()`. A Hugging Face
    model's generate() has another contract (`inputs, generation_config, **kwargs`, tokens
    from the global RNG, prompt included): its models sample through `sample()`."""
    generate = getattr(model, "generate", None)
    if callable(generate) and {"attention_mask", "max_new_tokens"} <= set(
            inspect.signature(generate).parameters):
        return generate
    return functools.partial(sample, model)


def completion_mask(completion_ids, eos_id):
    """(mask [N, L], ended [N]): mask is 1 up to and including the first end token, so the end
    token is trained and whatever follows it is not; rows that never ended are all 1."""
    is_eos = completion_ids == eos_id
    ended = is_eos.any(dim=1)
    L = completion_ids.shape[1]
    first = torch.where(ended, is_eos.int().argmax(dim=1),
                        torch.full_like(ended, L, dtype=torch.long))
    mask = torch.arange(L, device=completion_ids.device)[None, :] <= first[:, None]
    return mask, ended


def repeat_per_sample(value, batch_size, group_size):
    """A batch field repeated once per sample: lists and tensors of length B, element by element."""
    if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == batch_size:
        return value.repeat_interleave(group_size, dim=0)
    if isinstance(value, (list, tuple)) and len(value) == batch_size:
        return [v for v in value for _ in range(group_size)]
    return value


def reward_functions(reward_fn, reward_weights=None):
    """(functions, weights, names) from one reward function or a list; weights default to 1."""
    fns = ([] if reward_fn is None else list(reward_fn) if isinstance(reward_fn, (list, tuple))
           else [reward_fn])
    if not all(callable(fn) for fn in fns):
        raise ValueError("reward_fn must be a callable reward_fn(prompts, completions, **batch) -> "
                         "list[float], or a list of them")
    weights = [1.0] * len(fns) if reward_weights is None else [float(w) for w in reward_weights]
    if len(weights) != len(fns):
        raise ValueError(f"reward_weights has {len(weights)} weights for {len(fns)} reward "
                         "functions; give one weight per function")
    return fns, weights, reward_names(fns)


def reward_names(reward_fns):
    """`rewards/<name>` for each reward function: its __name__ (a partial's function, an object's
    class), made unique with a suffix."""
    names = []
    for i, fn in enumerate(reward_fns):
        base = fn.func if isinstance(fn, functools.partial) else fn
        name = getattr(base, "__name__", type(base).__name__)
        names.append(f"{name}_{i}" if name in names else name)
    return names


def score(reward_fns, names, weights, prompts, completions, **batch):
    """(weighted total reward [N], each function's rewards [N, F]), each function checked."""
    columns = [check_rewards(fn(prompts=prompts, completions=completions, **batch),
                             len(completions), name)
               for fn, name in zip(reward_fns, names)]
    per_fn = torch.tensor(columns, dtype=torch.float32).T.reshape(len(completions), len(reward_fns))
    return (per_fn * torch.tensor(weights, dtype=torch.float32)).sum(dim=1), per_fn


@torch.no_grad()
def online_rollout(model, batch, tokenizer, reward_fns, names, weights, group_size,
                   max_completion_length, temperature=1.0, top_k=None, generator=None):
    """Sample `group_size` completions per prompt, mask, decode and score them."""
    has_mask = "prompt_attention_mask" in batch
    keys = ["prompt_input_ids"] + (["prompt_attention_mask"] if has_mask else [])
    check_batch(batch, keys, "GRPO online")
    prompt_ids = batch["prompt_input_ids"]
    prompt_mask = batch.get("prompt_attention_mask", torch.ones_like(prompt_ids))
    if bool((prompt_mask[:, 1:] < prompt_mask[:, :-1]).any()):
        raise ValueError("prompt_attention_mask has padding after a prompt's tokens; sampling "
                         "continues from each row's last position, so prompts must be "
                         "left-padded: set tokenizer.padding_side = 'left' (Hugging Face), or "
                         "use reference.data.left_pad")
    B, P = prompt_ids.shape
    limit = context_length(model)
    if limit is not None and P + max_completion_length > limit:
        raise ValueError(f"prompt_input_ids has length {P}, and {P} + max_completion_length "
                         f"{max_completion_length} exceeds the model's context of {limit} tokens; "
                         "use shorter prompts, a smaller max_completion_length, or a model with a "
                         "longer context (block_size, max_position_embeddings)")
    eos_id, pad_id = special_ids(tokenizer)
    ids = prompt_ids.repeat_interleave(group_size, dim=0)  # rows g*G .. g*G+G-1: prompt g's group
    mask = prompt_mask.repeat_interleave(group_size, dim=0)
    was_training = model.training
    model.eval()  # no dropout while sampling
    try:
        completion_ids = sampler_for(model)(
            ids, mask, max_new_tokens=max_completion_length, temperature=temperature, top_k=top_k,
            do_sample=True, eos_token_id=eos_id, pad_token_id=pad_id, generator=generator)
    finally:
        model.train(was_training)
    keep, ended = completion_mask(completion_ids, eos_id)
    lengths = keep.sum(dim=1)
    text_lengths = lengths - ended.long()  # the text stops before the end token
    completions = [tokenizer.decode(row[:n].tolist())
                   for row, n in zip(completion_ids, text_lengths.tolist())]
    prompts = batch.get("prompts") or [tokenizer.decode(row[m.bool()].tolist())
                                       for row, m in zip(prompt_ids, prompt_mask)]
    extras = {k: repeat_per_sample(v, B, group_size) for k, v in batch.items()
              if k not in ("prompts", "prompt_input_ids", "prompt_attention_mask")}
    rewards, per_fn = score(reward_fns, names, weights,
                            repeat_per_sample(list(prompts), B, group_size), completions,
                            ended=ended.tolist(), **extras)
    N = B * group_size
    metrics = {f"rewards/{name}/mean": (per_fn[:, i].sum(), N) for i, name in enumerate(names)}
    metrics["completions/mean_length"] = (lengths.sum().float(), N)
    metrics["completions/clipped_ratio"] = ((~ended).sum().float(), N)
    # logits at P-1+j predict completion token j; prompt positions are never trained
    trained = torch.cat([torch.zeros_like(mask[:, 1:], dtype=torch.bool), keep], dim=1)
    return {"input_ids": torch.cat([ids, completion_ids], dim=1),
            "attention_mask": torch.cat([mask, keep.long()], dim=1), "completion_mask": trained,
            "completion_ids": completion_ids, "rewards": rewards.to(ids.device),
            "per_fn": per_fn.to(ids.device), "metrics": metrics}


def offline_rollout(batch, group_size, max_completion_length=None):
    """Check an offline batch and put it in rollout form; nothing is generated or scored."""
    keys = ["input_ids", "response_mask"] + (["attention_mask"] if "attention_mask" in batch
                                             else [])
    check_batch(batch, keys, "GRPO offline")
    if "rewards" not in batch:
        raise ValueError(f"GRPO offline batch is missing 'rewards' (it has {sorted(batch)}); "
                         "give one reward per row, [B]")
    ids, response = batch["input_ids"], batch["response_mask"].bool()
    B = ids.shape[0]
    rewards = torch.as_tensor(batch["rewards"], dtype=torch.float32, device=ids.device)
    if tuple(rewards.shape) != (B,):
        raise ValueError(f"GRPO offline batch key 'rewards' has shape {tuple(rewards.shape)}; "
                         f"expected [B] = ({B},), one reward per row")
    if B % group_size:
        raise ValueError(f"GRPO offline batch has {B} rows, not divisible by "
                         f"num_samples_per_prompt={group_size}: each prompt's {group_size} "
                         "samples must sit in one batch. Make "
                         "the batch size a multiple of it, and keep each group's rows together")
    if not torch.isfinite(rewards).all():
        raise ValueError("GRPO offline batch key 'rewards' holds NaN or inf; "
                         "give a finite reward per row")
    trained = response[:, 1:]  # position 0 has no context to be predicted from
    lengths = trained.sum(dim=1)
    if (lengths == 0).any():
        row = int((lengths == 0).nonzero()[0])
        raise ValueError(f"GRPO offline batch row {row} has no response tokens to train "
                         "(response_mask is 0 after position 0); mark its response with 1s, "
                         "or drop the row")
    if max_completion_length is not None and int(lengths.max()) > max_completion_length:
        raise ValueError(f"a response has {int(lengths.max())} tokens, more than "
                         f"max_completion_length={max_completion_length}, the constant "
                         "loss_type='dr_grpo' divides by; raise it")
    return {"input_ids": ids, "attention_mask": batch.get("attention_mask"),
            "completion_mask": trained, "rewards": rewards,
            "metrics": {"completions/mean_length": (lengths.sum().float(), B)}}


class RolledOut:
    """A val_loader whose batches are rolled out (generated, scored) before evaluate() sees them.
    Its loss is the surrogate at ratio 1, a check that the pipeline runs, not a quality measure:
    use eval_fn (e.g. exact match) for that."""

    def __init__(self, loader, trainer):
        self.loader, self.trainer = loader, trainer

    def __iter__(self):
        for batch in self.loader:
            yield self.trainer.roll_out([self.trainer.to_device(batch)])[0]


def move(obj, device):
    """The tensors in nested dicts, lists and tuples, moved to `device` (for checkpoints)."""
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: move(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(move(v, device) for v in obj)
    return obj

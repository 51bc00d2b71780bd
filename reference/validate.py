"""The Trainer's input checks: its options, and the batches and model it is given. Each names
the field and the fix, so that a mistake fails at once, not deep inside a run or never."""
import os

import torch

from . import checkpoint as ckpt


def check_reliability_options(val_loader, out_dir, checkpoint_dir, save_every, keep_last,
                              resume_from):
    """The options whose mistakes would otherwise surface deep inside a run, or never."""
    ckpt.check_keep_last(keep_last)
    if save_every and not (out_dir or checkpoint_dir):
        raise ValueError(f"save_every={save_every} needs a folder to write checkpoints to: pass "
                         "out_dir (they go to out_dir/checkpoints) or checkpoint_dir, or "
                         "save_every=None")
    if resume_from == "latest" and not (out_dir or checkpoint_dir):
        raise ValueError("resume_from='latest' needs the folder to look in: pass the earlier run's "
                         "out_dir (or checkpoint_dir), or resume_from=<path of a checkpoint>")
    if val_loader is not None and hasattr(val_loader, "__len__") and len(val_loader) == 0:
        raise ValueError("val_loader yields no batches (an empty evaluation set?): pass a "
                         "non-empty one, or val_loader=None to skip the eval loss")


def vocab_size_of(model):
    """How many token ids the model embeds (its input embedding's rows, else config.vocab_size),
    or None when it does not say."""
    try:
        embedding = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        embedding = getattr(model, "wte", None)
    if isinstance(embedding, torch.nn.Embedding):
        return embedding.num_embeddings
    return getattr(getattr(model, "config", None), "vocab_size", None)


def check_token_ids(batch, vocab_size):
    """Token ids and labels outside the vocabulary fail with an IndexError deep inside torch (a
    device-side assert on CUDA); name the key and the fix instead."""
    if vocab_size is None or not isinstance(batch, dict):
        return
    for key, t in batch.items():
        is_ids = key == "input_ids" or key.endswith("_input_ids")
        is_labels = key == "labels" or key.endswith("_labels")
        if not (is_ids or is_labels) or not torch.is_tensor(t) or t.is_floating_point() \
                or t.numel() == 0:
            continue
        valid = t < vocab_size
        valid &= ((t >= 0) | (t == -100)) if is_labels else (t >= 0)
        if not bool(valid.all()):
            bad = t[~valid][0].item()
            ignored = "; -100 marks a position that is not trained" if is_labels else ""
            raise ValueError(
                f"batch {key!r} holds the token id {bad}, outside the model's vocabulary of "
                f"{vocab_size} ids (0 to {vocab_size - 1}){ignored}. The tokenizer and the model "
                "disagree: build the model with the tokenizer's vocab_size, or fix the "
                "collator's ids")


def is_inside(path, folder):
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([path, folder]) == folder

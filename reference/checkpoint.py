"""Checkpoints: atomic saves, weights_only loads, the newest good one, keep-last-k, RNG states.

A save is a directory `step_XXXXXX/` holding `state.pt`. It is written under a temporary name
and renamed into place, so a crash mid-save never leaves a half-written `step_*` directory: the
previous checkpoint stays the newest complete one. Loads use `torch.load(weights_only=True)`,
which refuses arbitrary pickled code, so every value stored is a tensor or a plain container.
"""
import os
import random
import re
import shutil
import warnings

import numpy as np
import torch

STEP_DIR = re.compile(r"^step_(\d{6,})$")
STATE_FILE = "state.pt"


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def save_checkpoint(checkpoint_dir, step, state, keep_last=None):
    """Write `state` as `checkpoint_dir/step_XXXXXX/state.pt` atomically; prune to `keep_last`."""
    os.makedirs(checkpoint_dir, exist_ok=True)
    final = os.path.join(checkpoint_dir, step_dir_name(step))
    tmp = os.path.join(checkpoint_dir, f".tmp_{step_dir_name(step)}_{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    with open(os.path.join(tmp, STATE_FILE), "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    if os.path.exists(final):  # a re-save of the same step after a restart: replace it whole
        shutil.rmtree(final)
    os.replace(tmp, final)
    if keep_last is not None:
        for old in list_checkpoints(checkpoint_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(checkpoint_dir):
    """Complete checkpoint directories, oldest first (temporary ones are never listed)."""
    if not checkpoint_dir or not os.path.isdir(checkpoint_dir):
        return []
    found = []
    for name in os.listdir(checkpoint_dir):
        m = STEP_DIR.match(name)
        if m and os.path.isfile(os.path.join(checkpoint_dir, name, STATE_FILE)):
            found.append((int(m.group(1)), os.path.join(checkpoint_dir, name)))
    return [path for _, path in sorted(found)]


def load_state(path, map_location="cpu"):
    """Load one checkpoint directory (or its state.pt) with weights_only=True."""
    file = os.path.join(path, STATE_FILE) if os.path.isdir(path) else path
    return torch.load(file, map_location=map_location, weights_only=True)


def load_latest(checkpoint_dir, map_location="cpu"):
    """(path, state) of the newest checkpoint that loads, or (None, None) if there is none.

    A checkpoint that fails to load (truncated, corrupt) gets a warning, and the previous one is
    tried instead."""
    for path in reversed(list_checkpoints(checkpoint_dir)):
        try:
            return path, load_state(path, map_location)
        except Exception as err:  # noqa: BLE001 - any unreadable file means "try the one before"
            reason = (str(err).strip().splitlines() or [""])[0][:160]
            warnings.warn(f"checkpoint {path} could not be loaded ({type(err).__name__}: {reason}); "
                          "falling back to the previous checkpoint", stacklevel=2)
    return None, None


def rng_state():
    """Every RNG a training step can draw from, as weights_only-safe values."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(_as_tuple(state["python"]))
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x):
    """random.setstate wants tuples all the way down; a load may hand back lists."""
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x

"""Checkpoints: atomic, verified saves; weights_only loads; the newest good one; keep-last-k.

A save is a directory `step_XXXXXX/` holding `state.pt` and `state.pt.sha256`, the file's
SHA-256 in `sha256sum` format. Both are written and fsynced under a temporary name
(`.tmp_step_...`) and the directory is renamed into place, so a crash or a full disk mid-save
never leaves a half-written `step_*` directory: the previous checkpoint stays the newest
complete one, and the next run removes the temporary folder. A load checks the checksum (bytes
flipped on disk or in a copy are caught before they reach the optimizer), uses
`torch.load(weights_only=True)`, which refuses arbitrary pickled code, and checks the keys the
caller needs; `load_latest` falls back to the previous checkpoint, with a warning, when the
newest one fails any of these.
"""
import hashlib
import os
import random
import re
import shutil
import warnings

import numpy as np
import torch

from .rundir import TMP_PREFIX, fault_point, fsync_dir

STEP_DIR = re.compile(r"^step_(\d{6,})$")
STATE_FILE = "state.pt"
CHECKSUM_FILE = STATE_FILE + ".sha256"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written, or read back; `reason` says why."""

    def __init__(self, message, reason=None):
        super().__init__(message)
        self.reason = reason or message


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def check_keep_last(keep_last):
    if keep_last is not None and (isinstance(keep_last, bool) or not isinstance(keep_last, int)
                                  or keep_last < 1):
        raise ValueError(f"keep_last must be an int >= 1 (how many of the newest checkpoints to "
                         f"keep), or None to keep every one; got {keep_last!r}")


def save_checkpoint(checkpoint_dir, step, state, keep_last=None):
    """Write `state` as `checkpoint_dir/step_XXXXXX/` atomically, with its checksum; then prune to
    the newest `keep_last`. A failed write (a full disk) removes its temporary folder and raises
    a CheckpointError that names the folder; the previous checkpoint is untouched."""
    check_keep_last(keep_last)
    os.makedirs(checkpoint_dir, exist_ok=True)
    name = step_dir_name(step)
    final = os.path.join(checkpoint_dir, name)
    tmp = os.path.join(checkpoint_dir, f"{TMP_PREFIX}{name}_{os.getpid()}")
    replaced = os.path.join(checkpoint_dir, f"{TMP_PREFIX}replaced_{name}_{os.getpid()}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        file = os.path.join(tmp, STATE_FILE)
        with open(file, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        fault_point("save")  # crash tests: killed inside a save, state.pt written
        with open(os.path.join(tmp, CHECKSUM_FILE), "w") as f:
            f.write(f"{sha256_of(file)}  {STATE_FILE}\n")
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(tmp)
        fault_point("checksum")  # crash tests: complete, not yet renamed into place
        if os.path.exists(final):  # a re-save of the same step: move the old one aside whole
            shutil.rmtree(replaced, ignore_errors=True)
            os.replace(final, replaced)
        os.replace(tmp, final)
        fsync_dir(checkpoint_dir)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if os.path.exists(replaced) and not os.path.exists(final):
            os.replace(replaced, final)
        if not isinstance(err, (OSError, RuntimeError)):
            raise
        previous = [p for p in list_checkpoints(checkpoint_dir) if p != final]
        intact = (f"The previous checkpoint, {previous[-1]}, is intact" if previous else
                  "No earlier checkpoint exists")
        raise CheckpointError(
            f"could not write the step {step} checkpoint in {checkpoint_dir} "
            f"({type(err).__name__}: {first_line(err)}). Is the disk full, or the folder not "
            f"writable? {intact}: free some space (or point out_dir/--out elsewhere) and resume "
            "with --resume (resume_from='latest').") from err
    shutil.rmtree(replaced, ignore_errors=True)
    fault_point("renamed")  # crash tests: renamed into place, older ones not yet pruned
    if keep_last is not None:
        for old in list_checkpoints(checkpoint_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def sha256_of(file):
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def first_line(err):
    return (str(err).strip().splitlines() or [""])[0][:200]


def list_checkpoints(checkpoint_dir):
    """Checkpoint directories, oldest first (temporary ones are never listed; a damaged one is,
    and loading it says what is wrong)."""
    if not checkpoint_dir or not os.path.isdir(checkpoint_dir):
        return []
    found = []
    for name in os.listdir(checkpoint_dir):
        m = STEP_DIR.match(name)
        if m and os.path.isdir(os.path.join(checkpoint_dir, name)):
            found.append((int(m.group(1)), os.path.join(checkpoint_dir, name)))
    return [path for _, path in sorted(found)]


def checkpoint_step(path):
    m = STEP_DIR.match(os.path.basename(os.path.normpath(path)))
    return int(m.group(1)) if m else None


def remove_checkpoints_after(checkpoint_dir, step):
    """Delete the checkpoints newer than `step`: after a resume from `step` (a fallback past a
    damaged one, or an older one chosen by path) they belong to a run that is being redone, and
    a later resume must not pick them up. Returns the paths removed."""
    newer = [p for p in list_checkpoints(checkpoint_dir) if checkpoint_step(p) > step]
    for path in newer:
        shutil.rmtree(path, ignore_errors=True)
    return newer


def verify_checksum(file):
    """True when `file` hashes to what its .sha256 file recorded, False when there is no .sha256
    file (a checkpoint written before checksums were stored); a mismatch raises."""
    sums = file + ".sha256"
    if not os.path.exists(sums):
        return False
    with open(sums) as f:
        expected = (f.read().split() or ["(empty)"])[0]
    actual = sha256_of(file)
    if actual != expected:
        reason = (f"checksum mismatch: {CHECKSUM_FILE} records {expected[:16]}..., {STATE_FILE} "
                  f"hashes to {actual[:16]}...: the file changed after it was written (disk "
                  "damage, or a bad copy)")
        raise CheckpointError(f"checkpoint {file} fails its checksum", reason=reason)
    return True


def load_state(path, map_location="cpu", required_keys=()):
    """Load one checkpoint directory (or its state.pt): checksum verified, weights_only=True, and
    every key in `required_keys` present. Raises CheckpointError naming the file and what is
    wrong."""
    file = os.path.join(path, STATE_FILE) if os.path.isdir(path) else path

    def fail(reason):
        return CheckpointError(f"checkpoint {file} cannot be used: {reason}", reason=reason)

    if not os.path.isfile(file):
        raise fail(f"{STATE_FILE} is missing")
    if not verify_checksum(file):
        warnings.warn(f"checkpoint {file} has no {CHECKSUM_FILE} beside it (written by an older "
                      "version?), so it is loaded unverified", stacklevel=3)
    try:
        state = torch.load(file, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - truncated, not a zip, refused pickle: all "unreadable"
        raise fail(f"unreadable ({type(err).__name__}: {first_line(err)})") from err
    if not isinstance(state, dict):
        raise fail(f"it holds a {type(state).__name__}, not a dict of states")
    missing = [k for k in required_keys if k not in state]
    if missing:
        raise fail(f"it lacks the key(s) {', '.join(map(repr, missing))} that resuming needs")
    return state


def load_latest(checkpoint_dir, map_location="cpu", required_keys=()):
    """(path, state) of the newest usable checkpoint, or (None, None) when there is none.

    A checkpoint that fails its checksum, cannot be read or lacks one of `required_keys` gets a
    warning naming what is wrong, and the previous one is tried. When there are checkpoints but
    none is usable, that is a CheckpointError: starting over silently would lose the run."""
    paths = list_checkpoints(checkpoint_dir)
    problems = []
    for i, path in enumerate(reversed(paths)):
        try:
            return path, load_state(path, map_location, required_keys)
        except CheckpointError as err:
            problems.append(f"{os.path.basename(path)}: {err.reason}")
            then = ("falling back to the previous checkpoint" if i + 1 < len(paths) else
                    "and there is no earlier one")
            warnings.warn(f"checkpoint {path} could not be loaded ({err.reason}); {then}",
                          stacklevel=2)
    if problems:
        raise CheckpointError(
            f"none of the {len(paths)} checkpoints in {checkpoint_dir} can be used "
            f"({'; '.join(problems)}). Restore a good copy, or start over without --resume "
            "(resume_from=None), which replaces them.")
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

"""Nothing lost, ever (issue 17, the chapter side): tutorial/03_ddp/train.py against the failures
that tests/reference/test_reliability.py puts to the reference trainers. A torn or damaged
metrics.jsonl, a log rewrite that fails half-way, a second run on a held folder, damaged
checkpoints, a finished run resumed, a gradient-only NaN, an fp16 run whose every step is
skipped, and the tests that would have caught bugs the suite once missed (set_epoch, unscale_
before clipping, the temporary checkpoint folder, eval mode, the RNG state on resume). Tiny
runs, in-process, and one small lock-holding process. (tests/reference/test_reliability.py's
SIGKILL harness kills chapter 03 runs as well; test_03_ddp.py checks the world-size factor.)"""
import builtins
import errno
import functools
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time

import pytest
import torch
from torch.utils.data import DistributedSampler

from conftest import ROOT, load_chapter, read_jsonl
from reference.data import CharTokenizer, SFTDataset, make_addition_splits
from reference.rundir import OutDirInUse

SCRIPT = os.path.join(ROOT, "tutorial", "03_ddp", "train.py")
# 10 steps of 8 sequences on a tiny model, a save and an eval every 5 steps
BASE = ["--max-steps", "10", "--save-every", "5", "--eval-every", "5", "--batch-size", "8",
        "--n-embd", "32", "--n-layer", "1", "--eval-size", "50", "--amp", "off",
        "--device", "cpu", "--seed", "0"]


def main(out, *extra):
    return load_chapter("03").main(BASE + ["--out", str(out), *extra])


def data(path):
    with open(path, "rb") as f:
        return f.read()


def tmp_leftovers(folder):
    return [os.path.join(p, n) for p, dirs, files in os.walk(folder) for n in dirs + files
            if n.startswith(".tmp") or n.endswith(".tmp")]


def snapshot(folder):
    """Every file under folder, by its path relative to folder, with its bytes."""
    return {os.path.relpath(os.path.join(p, n), folder): data(os.path.join(p, n))
            for p, _, files in os.walk(folder) for n in files}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One finished 10-step run (checkpoints at steps 5 and 10); each test works on a copy."""
    out = tmp_path_factory.mktemp("finished") / "run"
    main(out)
    return out


@pytest.fixture
def run_dir(finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


# --- the metrics log --------------------------------------------------------------------------

def test_a_torn_last_line_is_dropped_with_a_warning_on_resume(run_dir):
    whole = data(run_dir / "metrics.jsonl")
    with open(run_dir / "metrics.jsonl", "ab") as f:
        f.write(b'{"step": 11, "loss": 2.3')  # a kill in the middle of a write
    with pytest.warns(UserWarning, match="dropped an unfinished last line"):
        main(run_dir, "--resume", "--max-steps", "12")
    assert data(run_dir / "metrics.jsonl").startswith(whole)
    assert [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")] == list(range(1, 13))
    assert [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl", "eval")] == [5, 10, 12]


def test_a_malformed_line_inside_the_log_is_a_clear_error(run_dir):
    records = data(run_dir / "metrics.jsonl").splitlines(keepends=True)
    records[2] = b'{"step": 3, "lo\n'
    damaged = b"".join(records)
    (run_dir / "metrics.jsonl").write_bytes(damaged)
    with pytest.raises(ValueError, match=r"metrics.jsonl line 3 is not a metrics record.*repair"):
        main(run_dir, "--resume", "--max-steps", "12")
    assert data(run_dir / "metrics.jsonl") == damaged  # left for the learner to repair


def test_a_rewrite_of_the_log_that_fails_leaves_it_whole(run_dir, monkeypatch):
    """A resume keeps the records up to its checkpoint: rewritten whole into a temporary file and
    renamed into place. Here the disk is full as soon as any file named metrics* is opened for
    writing (after the open has truncated it): the old log must still be there, whole, with no
    temporary left behind, and the next --resume must work (the lock went with the failure)."""
    before = data(run_dir / "metrics.jsonl")
    real_open = builtins.open

    def full_disk(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        if "metrics" in os.path.basename(str(file)) and any(c in mode for c in "wx+"):
            f.close()
            raise OSError(errno.ENOSPC, "No space left on device", str(file))
        return f

    with monkeypatch.context() as m:
        m.setattr(builtins, "open", full_disk)
        with pytest.raises(OSError, match="No space left on device"):
            main(run_dir, "--resume")
    assert data(run_dir / "metrics.jsonl") == before
    assert not tmp_leftovers(run_dir)
    assert main(run_dir, "--resume")["steps"] == 10
    assert data(run_dir / "metrics.jsonl") == before


# --- one run per output folder ----------------------------------------------------------------

HOLD = ("import sys; sys.path.insert(0, sys.argv[1]); import rundir; "
        "rundir.lock_out_dir(sys.argv[2]); print('held', flush=True); sys.stdin.read()")


def test_a_second_run_on_a_held_folder_fails_fast_and_touches_nothing(run_dir):
    """Another process holds the folder (reference.rundir.lock_out_dir, as a live run's rank 0
    does): a fresh run and a --resume both fail at once, naming the folder and the holder's PID,
    and every file in the folder, the holder's lock included, is left as it was."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD, os.path.join(ROOT, "reference"),
                               str(run_dir)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = snapshot(run_dir)
        assert before[".lock"] == f"{holder.pid}\n".encode()
        for extra in ([], ["--resume"]):
            start = time.perf_counter()
            with pytest.raises(OutDirInUse, match=f"{re.escape(str(run_dir))} is in use by "
                                                  rf"another run \(PID {holder.pid}\b"):
                main(run_dir, *extra)
            assert time.perf_counter() - start < 3  # before any data, model or training
            assert snapshot(run_dir) == before
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert main(run_dir, "--resume")["steps"] == 10  # the holder gone, the folder is free


# --- verified checkpoints ---------------------------------------------------------------------

def flip_bytes(path, where=0.6, n=8):
    """Flip n bytes inside the file, well into its tensor data."""
    raw = bytearray(data(path))
    at = int(len(raw) * where)
    raw[at:at + n] = bytes(b ^ 0xFF for b in raw[at:at + n])
    path.write_bytes(bytes(raw))


def drop_key(path, key):
    """Rewrite a checkpoint without `key`, with a checksum that matches."""
    state = torch.load(path, weights_only=True)
    del state[key]
    torch.save(state, path)
    digest = hashlib.sha256(data(path)).hexdigest()
    path.with_name(path.name + ".sha256").write_text(digest)


@pytest.mark.parametrize("damage, why", [
    ("flipped bytes", "its checksum does not match"),
    ("missing key", r"it has no \['rng'\]"),
])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(run_dir, damage, why):
    whole = data(run_dir / "metrics.jsonl")
    newest = run_dir / "checkpoints" / "step_000010" / "state.pt"
    if damage == "flipped bytes":
        flip_bytes(newest)
    else:
        drop_key(newest, "rng")
    os.remove(run_dir / "summary.json")
    with pytest.warns(UserWarning, match=f"skipping checkpoint .*step_000010: {why}"):
        summary = main(run_dir, "--resume")
    assert summary["steps"] == 10
    assert data(run_dir / "metrics.jsonl") == whole  # resumed at step 5, redid 6-10 exactly
    # and step 10 was saved again, whole this time
    assert (run_dir / "checkpoints" / "step_000010" / "state.pt.sha256").read_text().strip() == \
        hashlib.sha256(data(newest)).hexdigest()
    assert "rng" in torch.load(newest, weights_only=True)


def test_no_usable_checkpoint_is_a_clear_error(run_dir):
    for step in (5, 10):
        flip_bytes(run_dir / "checkpoints" / f"step_{step:06d}" / "state.pt")
    log = data(run_dir / "metrics.jsonl")
    with pytest.warns(UserWarning, match="checksum"), \
            pytest.raises(ValueError, match="no checkpoint in .*checkpoints could be loaded.*"
                                            "start fresh without --resume"):
        main(run_dir, "--resume")
    assert data(run_dir / "metrics.jsonl") == log


# --- finished runs resume ---------------------------------------------------------------------

def test_resuming_a_finished_run_ends_cleanly_and_rewrites_its_summary(run_dir):
    log = data(run_dir / "metrics.jsonl")
    first = json.loads((run_dir / "summary.json").read_text())
    os.remove(run_dir / "summary.json")  # killed between the final checkpoint and these files
    os.remove(run_dir / "model.pt")
    again = main(run_dir, "--resume")
    drop = ("train_seconds",)
    assert {k: v for k, v in again.items() if k not in drop} == \
           {k: v for k, v in first.items() if k not in drop}
    assert json.loads((run_dir / "summary.json").read_text()) == again
    final = torch.load(run_dir / "checkpoints" / "step_000010" / "state.pt",
                       weights_only=True)["model"]
    model = torch.load(run_dir / "model.pt", weights_only=True)["model"]
    assert model.keys() == final.keys() and all(torch.equal(model[k], final[k]) for k in final)
    assert data(run_dir / "metrics.jsonl") == log  # no step redone


# --- the finiteness guards --------------------------------------------------------------------

def spy_on_models(chapter, monkeypatch):
    """Every TinyGPT the chapter builds, in a list."""
    models = []

    class Spied(chapter.TinyGPT):
        def __init__(self, cfg):
            super().__init__(cfg)
            models.append(self)

    monkeypatch.setattr(chapter, "TinyGPT", Spied)
    return models


def flock_from_another_process(folder):
    """Whether a separate process can take folder's lock right now."""
    code = ("import fcntl, sys\nf = open(sys.argv[1], 'a')\ntry:\n"
            "    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)\nexcept OSError:\n    sys.exit(1)")
    return subprocess.run([sys.executable, "-c", code, os.path.join(folder, ".lock")]
                          ).returncode == 0


def test_a_gradient_only_nan_stops_the_run_before_the_optimizer_step(tmp_path, monkeypatch):
    """From step 3 on one gradient is NaN while the loss stays finite: the run must stop with
    FloatingPointError before that step updates the weights, and the newest checkpoint (step 2)
    holds the finite weights the model still has."""
    chapter = load_chapter("03")
    models, backwards = spy_on_models(chapter, monkeypatch), []

    def nan_from_the_third_backward(grad):
        backwards.append(grad)
        return grad * float("nan") if len(backwards) >= 3 else grad

    build = chapter.TinyGPT

    def build_and_hook(cfg):
        model = build(cfg)
        model.lm_head.weight.register_hook(nan_from_the_third_backward)
        return model

    monkeypatch.setattr(chapter, "TinyGPT", build_and_hook)
    with pytest.raises(FloatingPointError, match="step 3: the gradient norm is nan"):
        chapter.main(BASE + ["--max-steps", "6", "--save-every", "1", "--eval-every", "50",
                             "--out", str(tmp_path)])
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2] and all(map(finite, records))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step_000001", "step_000002"]
    saved = torch.load(tmp_path / "checkpoints" / "step_000002" / "state.pt",
                       weights_only=True)["model"]
    weights = models[0].state_dict()
    for name, t in saved.items():  # finite, and what the model holds: step 3 changed nothing
        assert torch.isfinite(t).all() and torch.equal(t, weights[name]), name
    assert flock_from_another_process(tmp_path)  # and the error let go of the folder


def finite(record):
    return all(math.isfinite(record[k]) for k in ("loss", "grad_norm"))


def test_an_fp16_run_whose_steps_are_all_skipped_stops(tmp_path):
    """--amp fp16 --lr 1e30: every step from the second on has inf/NaN gradients and the
    GradScaler skips it. Ten in a row is a run that is not recovering: an error (the script
    exits non-zero), and no summary.json that reports a NaN loss as a result."""
    with pytest.raises(FloatingPointError, match="step 11: the last 10 steps had inf/NaN"):
        main(tmp_path, "--max-steps", "30", "--eval-every", "50", "--save-every", "50",
             "--amp", "fp16", "--lr", "1e30")
    assert not (tmp_path / "summary.json").exists()
    # step 1 was taken, 2-11 skipped: the run stops at the tenth skip, before logging it
    assert [r["skipped_steps"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == \
        list(range(10))


# --- tests that would have caught bugs the suite once missed ---------------------------------

def record_training_batches(chapter, monkeypatch):
    """The rows (without padding) of every training forward, one list per step."""
    seen = []

    class Recording(chapter.TinyGPT):
        def forward(self, input_ids, attention_mask=None):
            if self.training and torch.is_grad_enabled():
                seen.append([tuple(row[mask.bool()].tolist())
                             for row, mask in zip(input_ids, attention_mask)])
            return super().forward(input_ids, attention_mask)

    monkeypatch.setattr(chapter, "TinyGPT", Recording)
    return seen


def test_every_epoch_has_its_own_order(tmp_path, monkeypatch):
    """DistributedSampler.set_epoch at every epoch: without it every epoch repeats epoch 0's
    order. --digits 1 --eval-size 50 leaves 50 problems: 6 steps of 8 per epoch."""
    chapter = load_chapter("03")
    seen = record_training_batches(chapter, monkeypatch)
    chapter.main(BASE + ["--digits", "1", "--max-steps", "12", "--eval-every", "50",
                         "--save-every", "50", "--out", str(tmp_path)])
    assert len(seen) == 12
    epoch0, epoch1 = sum(seen[:6], []), sum(seen[6:], [])
    assert len(set(epoch0)) == len(set(epoch1)) == 48 and epoch0 != epoch1
    train, _ = make_addition_splits(1, 50, seed=0)
    dataset = SFTDataset(train, CharTokenizer())
    sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=0,
                                 drop_last=True)
    for epoch, rows in ((0, epoch0), (1, epoch1)):
        sampler.set_epoch(epoch)
        assert rows == [tuple(dataset[i]["input_ids"].tolist()) for i in list(sampler)[:48]]


def test_fp16_clips_the_unscaled_gradients_and_logs_their_norm(tmp_path, monkeypatch):
    """GradScaler.unscale_ before clipping: else the logged norm is the loss-scaled one (65536x
    too large) and the threshold meets scaled gradients (the optimizer sees far less than
    --max-grad-norm)."""
    main(tmp_path / "fp32", "--max-steps", "1")
    fp32 = read_jsonl(tmp_path / "fp32" / "metrics.jsonl")[0]["grad_norm"]
    chapter, seen = load_chapter("03"), []
    configure = chapter.configure_optimizer

    def spied(model, lr, weight_decay):
        optimizer = configure(model, lr, weight_decay)
        optimizer.register_step_pre_hook(lambda *_: seen.append(  # the gradients of the update
            torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]).item()))
        return optimizer

    monkeypatch.setattr(chapter, "configure_optimizer", spied)
    chapter.main(BASE + ["--max-steps", "1", "--amp", "fp16", "--max-grad-norm", "1e-2",
                         "--out", str(tmp_path / "fp16")])
    record = read_jsonl(tmp_path / "fp16" / "metrics.jsonl")[0]
    assert record["skipped_steps"] == 0
    assert fp32 > 1e-2 and record["grad_norm"] == pytest.approx(fp32, rel=0.05)
    assert seen == [pytest.approx(1e-2, rel=1e-3)]  # clipped to the threshold, not far below


def test_a_checkpoint_is_written_in_a_temporary_folder_and_renamed_into_place(tmp_path,
                                                                              monkeypatch):
    """A kill mid-save must not leave a step_* folder that looks complete: every byte of a
    checkpoint is written under a .tmp_ folder, and step_XXXXXX appears only by the rename."""
    folder = str(tmp_path / "checkpoints")
    writes, renames, real_open, real_replace = [], [], builtins.open, os.replace

    def opening(file, mode="r", *args, **kwargs):
        if str(file).startswith(folder) and any(c in mode for c in "wax+"):
            writes.append(os.path.relpath(str(file), folder))
        return real_open(file, mode, *args, **kwargs)

    def replacing(src, dst, **kwargs):
        if str(dst).startswith(folder):
            renames.append((os.path.relpath(str(src), folder), os.path.relpath(str(dst), folder),
                            os.path.exists(os.path.join(folder, "step_000001"))))
        return real_replace(src, dst, **kwargs)

    monkeypatch.setattr(builtins, "open", opening)
    monkeypatch.setattr(os, "replace", replacing)
    main(tmp_path, "--max-steps", "1", "--eval-every", "50")
    monkeypatch.undo()
    assert writes and all(w.split(os.sep)[0].startswith(".tmp_") for w in writes), writes
    src, dst, existed = renames[-1]
    assert src.startswith(".tmp_") and os.sep not in src and dst == "step_000001" \
        and not existed, renames
    assert all(d.split(os.sep)[0].startswith(".tmp_") for _, d, _ in renames[:-1]), renames
    assert os.listdir(folder) == ["step_000001"]
    assert sorted(os.listdir(os.path.join(folder, "step_000001"))) == \
        ["state.pt", "state.pt.sha256"]


def test_evaluate_runs_the_model_in_eval_mode(tmp_path, monkeypatch):
    """Every forward of evaluate() sees model.training False (dropout off), and the training
    steps after an evaluation are back in train mode."""
    chapter = load_chapter("03")
    modes, where = {"eval": [], "train": []}, []

    class Recording(chapter.TinyGPT):
        def forward(self, *args, **kwargs):
            if where:
                modes["eval"].append(self.training)
            elif torch.is_grad_enabled():
                modes["train"].append(self.training)
            return super().forward(*args, **kwargs)

    evaluate = chapter.evaluate

    def evaluating(*args, **kwargs):
        where.append(1)
        try:
            return evaluate(*args, **kwargs)
        finally:
            where.pop()

    monkeypatch.setattr(chapter, "TinyGPT", Recording)
    monkeypatch.setattr(chapter, "evaluate", evaluating)
    chapter.main(BASE + ["--max-steps", "4", "--eval-every", "2", "--save-every", "50",
                         "--out", str(tmp_path)])
    assert len(modes["eval"]) == 2 and not any(modes["eval"])  # one batch, two evaluations
    assert modes["train"] == [True] * 4


def test_resume_restores_the_rng_state_the_next_step_draws_from(tmp_path, monkeypatch):
    """With dropout on, the global RNG state at the first step after a resume is what it was at
    that step of an uninterrupted run, and so are the losses. (Both runs evaluate at step 5: an
    evaluation draws from the global RNG too, the seed of its DataLoader's iterator.)"""
    def rng_at_each_step(out, *extra):
        chapter, states = load_chapter("03"), []

        class Recording(chapter.TinyGPT):
            def forward(self, input_ids, attention_mask=None):
                if self.training and torch.is_grad_enabled():
                    states.append(torch.get_rng_state())
                return super().forward(input_ids, attention_mask)

        monkeypatch.setattr(chapter, "TinyGPT", Recording)
        monkeypatch.setattr(chapter, "GPTConfig", functools.partial(chapter.GPTConfig,
                                                                    dropout=0.1))
        chapter.main(BASE + ["--out", str(out), *extra])
        return states

    want = rng_at_each_step(tmp_path / "straight", "--max-steps", "8")
    rng_at_each_step(tmp_path / "resumed", "--max-steps", "5")
    got = rng_at_each_step(tmp_path / "resumed", "--max-steps", "8", "--resume")
    assert len(want) == 8 and len(got) == 3
    assert not torch.equal(want[5], want[0])  # dropout did draw in between
    assert all(torch.equal(g, w) for g, w in zip(got, want[5:]))
    assert [r["loss"] for r in read_jsonl(tmp_path / "resumed" / "metrics.jsonl")][5:] == \
           [r["loss"] for r in read_jsonl(tmp_path / "straight" / "metrics.jsonl")][5:]

"""Nothing lost, ever (issue 17, the reference side): SIGKILLs at random moments, an atomic
metrics log, the finiteness guard, one run per output folder, verified checkpoints, finished
runs that resume, clear errors for bad input, and the tests that would have caught bugs the
suite once missed. Tiny models, a few dozen steps: each test is a second or two, the kill
test about half a minute."""
import copy
import gc
import json
import math
import os
import re
import subprocess
import sys
import time

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from conftest import ROOT, read_jsonl
from reference import DPOTrainer, SFTTrainer, chapters, configure_optimizer
from reference import checkpoint as ckpt
from reference import rundir
from reference.trainer import Trainer
from reference.data import (CharTokenizer, PreferenceCollator, PreferenceDataset, Problem,
                            SFTCollator, SFTDataset, make_addition_splits)
from reference.distributed import DistInfo
from reference.logprobs import sequence_logps
from reference.chapters import common
from reference.metrics import MetricsLog
from reference.model import GPTConfig, TinyGPT

TOK = CharTokenizer()
# `python -m reference 03` in miniature: 10 steps, a save and an eval every 5
TINY03 = ["--max-steps", "10", "--save-every", "5", "--batch-size", "8", "--n-embd", "32",
          "--n-layer", "1", "--eval-every", "5", "--eval-size", "30", "--amp", "off",
          "--device", "cpu", "--seed", "0"]


def env(**extra):
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, **extra)


def tiny_sft(out=None, max_steps=10, dropout=0.0, lr=3e-3, val=False, **kw):
    """An SFTTrainer on 48 addition problems, 8 per step, sharded by a DistributedSampler."""
    torch.manual_seed(0)
    train, evals = make_addition_splits(2, 16, n_train=48, seed=0)
    collate = SFTCollator(TOK.pad_id)
    ds = SFTDataset(train, TOK)
    sampler = DistributedSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=0, drop_last=True)
    model = TinyGPT(GPTConfig(vocab_size=TOK.vocab_size, block_size=12, n_layer=1, n_embd=32,
                              dropout=dropout))
    args = dict(model=model, train_loader=DataLoader(ds, batch_size=8, sampler=sampler,
                                                     drop_last=True, collate_fn=collate),
                optimizer=configure_optimizer(model=model, optimizer_type="adamw", lr=lr,
                                              weight_decay=0.1),
                val_loader=DataLoader(SFTDataset(evals, TOK), batch_size=16, collate_fn=collate)
                if val else None,
                device="cpu", max_epochs=None, max_steps=max_steps, progress=False,
                out_dir=None if out is None else str(out), save_every=5 if out else None)
    args.update(kw)
    return SFTTrainer(**args)


def lines(path):
    with open(path, "rb") as f:
        return f.read()


def tmp_leftovers(folder):
    return [os.path.join(p, n) for p, dirs, files in os.walk(folder) for n in dirs + files
            if n.startswith(".tmp")]


# --- SIGKILL at random moments ----------------------------------------------------------------

# target -> how many of the suite's kills it gets
KILLS = {"reference": 8, "chapter03": 6}


@pytest.mark.parametrize("target", sorted(KILLS))
def test_sigkill_at_random_moments_loses_nothing(target, tmp_path):
    """tests/scripts/kill_and_resume.py kills runs at seeded random moments, inside saves and
    right after resumes start, resumes them until they finish, and compares each folder with an
    uninterrupted run's: metrics.jsonl bitwise, every step, the final weights, summary.json, and
    no .tmp* leftovers. Checked again here from the files it leaves."""
    work = tmp_path / "work"
    script = os.path.join(ROOT, "tests", "scripts", "kill_and_resume.py")
    r = subprocess.run([sys.executable, script, "--target", target, "--kills", str(KILLS[target]),
                        "--seed", "0", "--work", str(work)], env=env(), capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert report["kills"] >= KILLS[target] and not report["failures"]
    if target == "reference":  # every named point fired, inside a save and after a resume too
        assert set(report["fired"]) >= {"save", "checksum", "renamed", "resume", "metrics_rewrite",
                                        "summary"}
    baseline = lines(work / "baseline" / "metrics.jsonl")
    steps = [r["step"] for r in read_jsonl(work / "baseline" / "metrics.jsonl")]
    assert steps == list(range(1, 31))
    for scenario in report["scenarios"]:
        assert lines(os.path.join(scenario["folder"], "metrics.jsonl")) == baseline
        assert not tmp_leftovers(scenario["folder"])


# --- the metrics log ------------------------------------------------------------------------

def test_a_torn_last_line_is_dropped_with_a_warning_on_resume(tmp_path):
    tiny_sft(tmp_path, max_steps=10).train()
    whole = lines(tmp_path / "metrics.jsonl")
    with open(tmp_path / "metrics.jsonl", "ab") as f:
        f.write(b'{"step": 11, "loss": 2.3')  # a kill in the middle of a write
    with pytest.warns(UserWarning, match="dropped an unfinished last line"):
        tiny_sft(tmp_path, max_steps=12, resume_from="latest").train()
    log = lines(tmp_path / "metrics.jsonl")
    assert log.startswith(whole)
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == list(range(1, 13))


def test_a_malformed_line_inside_the_log_is_a_clear_error(tmp_path):
    tiny_sft(tmp_path, max_steps=5).train()
    records = lines(tmp_path / "metrics.jsonl").splitlines(keepends=True)
    records[2] = b'{"step": 3, "lo\n'
    (tmp_path / "metrics.jsonl").write_bytes(b"".join(records))
    with pytest.raises(ValueError, match=r"metrics.jsonl line 3 is not a metrics record.*repair"):
        tiny_sft(tmp_path, max_steps=8, resume_from="latest").train()


def test_a_failed_rewrite_leaves_the_log_whole(tmp_path, monkeypatch):
    """The resume's rewrite goes to a temporary file renamed into place: a failure (or a kill)
    before the rename leaves the old log untouched, and no temporary file behind."""
    tiny_sft(tmp_path, max_steps=10).train()
    before = lines(tmp_path / "metrics.jsonl")

    def fail(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(rundir.os, "replace", fail)
    with pytest.raises(OSError, match="No space left"):
        MetricsLog(str(tmp_path), truncate_after=5)
    assert lines(tmp_path / "metrics.jsonl") == before
    assert not tmp_leftovers(tmp_path)


def test_every_record_is_on_disk_as_soon_as_it_is_logged(tmp_path):
    seen = []
    trainer = tiny_sft(tmp_path, max_steps=4, save_every=None)
    step = trainer.training_step

    def training_step(micro):  # before each step, the log holds every earlier step
        seen.append(len(read_jsonl(tmp_path / "metrics.jsonl")))
        return step(micro)

    trainer.training_step = training_step
    trainer.train()
    assert seen == [0, 1, 2, 3]


# --- the finiteness guard ---------------------------------------------------------------------

def nan_gradients_from(trainer, step):
    """A NaN in one gradient from `step` on, while the loss stays finite."""
    weight = trainer.raw_model.lm_head.weight
    weight.register_hook(lambda g: g * float("nan") if trainer.step + 1 >= step else g)


def test_a_gradient_only_nan_stops_the_run_before_the_step(tmp_path):
    trainer = tiny_sft(tmp_path, max_steps=10, save_every=1)
    nan_gradients_from(trainer, 3)
    with pytest.raises(FloatingPointError, match="gradient norm is nan at step 3.*loss.*finite.*"
                                                 "learning rate.*clipping"):
        trainer.train()
    assert trainer.step == 2
    path, state = ckpt.load_latest(tmp_path / "checkpoints")
    assert path.endswith("step_000002")
    weights = trainer.raw_model.state_dict()
    for name, t in state["model"].items():  # the newest checkpoint: finite, and the last step's
        assert torch.isfinite(t).all() and torch.equal(t, weights[name]), name


def test_weights_that_overflow_are_never_written_into_a_checkpoint(tmp_path):
    """Whatever makes the weights non-finite after a step (here: an optimizer that overflows at
    step 3), the checkpoint of that step is not written."""
    trainer = tiny_sft(tmp_path, max_steps=5, save_every=1)
    step = trainer.optimizer.step

    def overflowing_step(*a, **k):
        out = step(*a, **k)
        if trainer.step + 1 == 3:
            with torch.no_grad():
                trainer.raw_model.lm_head.weight[0, 0] = float("inf")
        return out

    trainer.optimizer.step = overflowing_step
    with pytest.raises(FloatingPointError, match="after step 3, model weight 'lm_head.weight' "
                                                 "hold inf/NaN values, so the checkpoint was not "
                                                 "written"):
        trainer.train()
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step_000001", "step_000002"]
    for path in ckpt.list_checkpoints(tmp_path / "checkpoints"):
        assert all(torch.isfinite(t).all() for t in ckpt.load_state(path)["model"].values())


def test_fp16_steps_skipped_k_times_in_a_row_stop_the_run():
    """With a GradScaler a skipped step is routine; ten in a row is a run that is not
    recovering."""
    trainer = tiny_sft(max_steps=30, amp_dtype="fp16")
    nan_gradients_from(trainer, 1)
    with pytest.raises(FloatingPointError, match="last 10 steps.*GradScaler skipped.*--amp bf16"):
        trainer.train()
    assert trainer.step == 9 and trainer.skipped_steps == 9


def test_an_fp16_run_whose_steps_are_all_skipped_is_an_error(tmp_path):
    """The issue's case: --amp fp16 --lr 1e30 used to skip 19 of 20 steps, log NaN losses,
    write "final_loss": NaN and exit 0. Now `python -m reference 03` raises (so it exits 1 with
    the traceback) and writes no summary."""
    with pytest.raises(FloatingPointError, match="the last 10 steps"):
        chapters.run("03", TINY03 + ["--max-steps", "30", "--eval-every", "50", "--amp", "fp16",
                                     "--lr", "1e30", "--out", str(tmp_path)])
    assert not (tmp_path / "summary.json").exists()


def test_a_non_finite_eval_loss_is_an_error():
    trainer = tiny_sft(val=True)
    with torch.no_grad():
        trainer.raw_model.lm_head.weight.fill_(float("inf"))
    with pytest.raises(FloatingPointError, match="eval loss is nan at step 0"):
        trainer.evaluate()


# --- one run per output folder ----------------------------------------------------------------

def test_a_second_run_on_a_folder_fails_fast_and_the_first_finishes_untouched(tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "reference", "03", *TINY03, "--max-steps",
                              "150", "--out", str(out)], env=env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not ((out / ".lock").exists() and (out / ".lock").read_text().strip() == str(first.pid)):
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()
        time.sleep(0.01)
    start = time.perf_counter()
    with pytest.raises(rundir.OutDirInUse, match=f"{re.escape(str(out))} is in use by another run "
                                                 rf"\(PID {first.pid}.*another --out"):
        chapters.run("03", TINY03 + ["--max-steps", "150", "--out", str(out)])
    assert time.perf_counter() - start < 2
    assert first.poll() is None, "the first run must still be running when the second starts"
    stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-3000:]
    assert "removing the previous run's checkpoints" not in stdout
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == list(range(1, 151))
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl", "eval")] == list(range(5, 151, 5))
    assert json.loads((out / "summary.json").read_text())["steps"] == 150
    assert sorted(os.listdir(out / "checkpoints")) == ["step_000145", "step_000150"]


def flock_from_another_process(folder):
    """Whether a separate process can take `folder`'s lock right now."""
    code = ("import fcntl, sys\nf = open(sys.argv[1], 'a')\ntry:\n"
            "    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)\nexcept OSError:\n    sys.exit(1)")
    lock = os.path.join(folder, rundir.LOCK_FILE)
    return subprocess.run([sys.executable, "-c", code, lock]).returncode == 0


def test_the_trainer_holds_its_folder_while_it_runs_and_lets_go_after_an_error(tmp_path):
    held = []
    trainer = tiny_sft(tmp_path, max_steps=5, eval_every=2,
                       eval_fn=lambda m: held.append(flock_from_another_process(tmp_path)) or {})
    nan_gradients_from(trainer, 4)
    with pytest.raises(FloatingPointError):
        trainer.train()
    assert held == [False]  # held during the run: another process could not take it
    assert flock_from_another_process(tmp_path)  # and released by the error


def test_stale_temporaries_of_dead_runs_are_removed_at_start(tmp_path, capsys):
    tiny_sft(tmp_path, max_steps=5).train()
    (tmp_path / "checkpoints" / ".tmp_step_000010_99999").mkdir()
    (tmp_path / "checkpoints" / ".tmp_step_000010_99999" / "state.pt").write_bytes(b"half")
    (tmp_path / ".tmp_metrics.jsonl").write_text('{"step": 1}\n')
    tiny_sft(tmp_path, max_steps=10, resume_from="latest").train()
    assert "interrupted run left half-written" in capsys.readouterr().out
    assert not tmp_leftovers(tmp_path)


# --- verified checkpoints ---------------------------------------------------------------------

def flip_bytes(path, where=0.6, n=8):
    """Flip `n` bytes inside the file, well into its tensor data."""
    data = bytearray(path.read_bytes())
    at = int(len(data) * where)
    data[at:at + n] = bytes(b ^ 0xFF for b in data[at:at + n])
    path.write_bytes(bytes(data))


def test_flipped_bytes_make_resume_fall_back_to_the_previous_checkpoint(tmp_path):
    chapters.run("03", TINY03 + ["--out", str(tmp_path)])
    whole = lines(tmp_path / "metrics.jsonl")
    with open(tmp_path / "checkpoints" / "step_000010" / ckpt.CHECKSUM_FILE) as f:
        assert len(f.read().split()[0]) == 64  # a SHA-256, in sha256sum's format
    flip_bytes(tmp_path / "checkpoints" / "step_000010" / "state.pt")
    os.remove(tmp_path / "summary.json")
    with pytest.warns(UserWarning, match="step_000010 could not be loaded \\(checksum mismatch.*"
                                         "falling back to the previous checkpoint"):
        summary = chapters.run("03", TINY03 + ["--out", str(tmp_path), "--resume"])
    assert summary["steps"] == 10 and "rebuilt_from_metrics" not in summary  # redid 6-10
    assert lines(tmp_path / "metrics.jsonl") == whole
    assert ckpt.verify_checksum(str(tmp_path / "checkpoints" / "step_000010" / "state.pt"))


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize("damage", ["missing key", "pickled code", "no state.pt"])
def test_a_checkpoint_that_cannot_be_used_falls_back_with_a_warning_naming_why(tmp_path, damage):
    keys = SFTTrainer.checkpoint_keys
    good = {k: torch.zeros(1) for k in keys}
    ckpt.save_checkpoint(tmp_path, 1, good)
    if damage == "missing key":
        ckpt.save_checkpoint(tmp_path, 2, {k: v for k, v in good.items() if k != "rng"})
        why = "it lacks the key\\(s\\) 'rng'"
    elif damage == "pickled code":  # its checksum is right: what is wrong is inside
        ckpt.save_checkpoint(tmp_path, 2, dict(good, rng=Payload()))
        why = "unreadable \\(UnpicklingError"
    else:
        ckpt.save_checkpoint(tmp_path, 2, good)
        os.remove(tmp_path / "step_000002" / "state.pt")
        why = "state.pt is missing"
    with pytest.warns(UserWarning, match=f"step_000002 could not be loaded \\({why}.*previous"):
        path, _ = ckpt.load_latest(tmp_path, required_keys=keys)
    assert path.endswith("step_000001")


def test_no_usable_checkpoint_is_a_clear_error(tmp_path):
    for step in (1, 2):
        ckpt.save_checkpoint(tmp_path, step, {"step": step})
        flip_bytes(tmp_path / ckpt.step_dir_name(step) / "state.pt")
    with pytest.warns(UserWarning), pytest.raises(ckpt.CheckpointError,
                                                  match="none of the 2 checkpoints.*checksum"):
        ckpt.load_latest(tmp_path)


def test_a_full_disk_during_a_save_names_the_folder_and_keeps_the_previous_one(tmp_path,
                                                                                  monkeypatch):
    trainer = tiny_sft(tmp_path, max_steps=10)
    save = torch.save

    def full_disk(state, f):  # what torch says when the disk fills half-way through a write
        if state["step"] == 10:
            f.write(b"PK\x03\x04 half a zip")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64")
        return save(state, f)

    monkeypatch.setattr(torch, "save", full_disk)
    folder = tmp_path / "checkpoints"
    with pytest.raises(ckpt.CheckpointError, match=f"step 10 checkpoint in {re.escape(str(folder))}"
                                                   ".*disk full.*"
                                                   f"{re.escape(str(folder / 'step_000005'))}, is "
                                                   "intact"):
        trainer.train()
    assert sorted(os.listdir(folder)) == ["step_000005"]  # no .tmp_ folder left to fill the disk
    assert ckpt.load_state(folder / "step_000005")["step"] == 5


# --- finished runs resume ---------------------------------------------------------------------

def test_resuming_a_finished_run_rebuilds_a_lost_summary(tmp_path, capsys):
    first = chapters.run("03", TINY03 + ["--out", str(tmp_path)])
    log = lines(tmp_path / "metrics.jsonl")
    os.remove(tmp_path / "summary.json")  # killed between the final checkpoint and this file
    again = chapters.run("03", TINY03 + ["--out", str(tmp_path), "--resume"])
    assert "already finished" in capsys.readouterr().out
    assert again.pop("rebuilt_from_metrics") is True
    assert {k: v for k, v in again.items() if k != "train_seconds"} == \
           {k: v for k, v in first.items() if k != "train_seconds"}
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 10
    assert lines(tmp_path / "metrics.jsonl") == log  # untouched
    assert chapters.run("03", TINY03 + ["--out", str(tmp_path), "--resume"])["final_loss"] == \
           first["final_loss"]  # and a third time, from the summary that is there now


def test_a_finished_trainer_resumes_at_once_with_its_final_weights(tmp_path):
    done = tiny_sft(tmp_path, max_steps=10)
    done.train()
    again = tiny_sft(tmp_path, max_steps=10, resume_from="latest")
    assert again.train() == [] and again.step == 10
    final = done.raw_model.state_dict()
    assert all(torch.equal(final[k], v) for k, v in again.raw_model.state_dict().items())


def test_a_fresh_run_never_reports_the_replaced_runs_summary(tmp_path, monkeypatch):
    chapters.run("03", TINY03 + ["--out", str(tmp_path)])

    def killed(*args, **kwargs):  # a kill between the final checkpoint and summary.json
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(common, "write_summary", killed)
        with pytest.raises(KeyboardInterrupt):
            chapters.run("03", TINY03 + ["--out", str(tmp_path), "--seed", "1"])
    rundir.unlock_under(str(tmp_path))  # what the end of the killed process would have done
    assert not (tmp_path / "summary.json").exists()  # the seed-0 run's went when seed 1 began
    resumed = chapters.run("03", TINY03 + ["--out", str(tmp_path), "--seed", "1", "--resume"])
    assert resumed["rebuilt_from_metrics"]
    assert resumed["final_loss"] == read_jsonl(tmp_path / "metrics.jsonl")[-1]["loss"]


# --- clear errors for the last bad inputs -----------------------------------------------------

def test_an_eval_set_with_no_target_tokens_is_a_clear_error():
    ids = torch.randint(2, TOK.vocab_size, (2, 6))
    trainer = tiny_sft(val_loader=[{"input_ids": ids, "labels": torch.full_like(ids, -100)}])
    with pytest.raises(ValueError, match="nothing to average.*every label is -100.*val_loader="):
        trainer.evaluate()


def test_an_empty_val_loader_is_a_clear_error():
    with pytest.raises(ValueError, match="val_loader yields no batches.*val_loader=None"):
        tiny_sft(val_loader=[])
    trainer = tiny_sft(val_loader=iter([]))  # no len(): found when evaluating
    with pytest.raises(ValueError, match="nothing to average.*no batches"):
        trainer.evaluate()


@pytest.mark.parametrize("resume_from, message", [
    ("lastest", "resume_from='lastest' is not a checkpoint.*Did you mean resume_from='latest'"),
    ("runs/x/checkpoints/step_000010", "no such file or folder.*Pass 'latest'.*step_XXXXXX"),
])
def test_resume_from_a_path_that_does_not_exist_is_a_clear_error(tmp_path, resume_from, message):
    with pytest.raises(ValueError, match=message):
        tiny_sft(tmp_path, resume_from=resume_from).train()


def test_save_every_without_a_folder_is_a_clear_error():
    with pytest.raises(ValueError, match="save_every=5 needs a folder.*out_dir.*checkpoint_dir"):
        tiny_sft(save_every=5)
    with pytest.raises(ValueError, match="resume_from='latest' needs the folder"):
        tiny_sft(resume_from="latest")


@pytest.mark.parametrize("key, bad", [("labels", 99), ("labels", -5), ("input_ids", 14)])
def test_a_token_id_outside_the_vocabulary_is_a_clear_error(key, bad):
    ids = torch.randint(2, TOK.vocab_size, (2, 6))
    batch = {"input_ids": ids.clone(), "labels": ids.clone()}
    batch[key][0, 3] = bad
    trainer = tiny_sft(train_loader=[batch], max_steps=1)
    with pytest.raises(ValueError, match=f"batch '{key}' holds the token id {bad}, outside the "
                                         "model's vocabulary of 14 ids.*vocab_size"):
        trainer.train()


@pytest.mark.parametrize("keep_last", [-1, 0, 1.5])
def test_keep_last_below_one_is_a_clear_error(tmp_path, keep_last):
    with pytest.raises(ValueError, match="keep_last must be an int >= 1.*or None"):
        tiny_sft(tmp_path, keep_last=keep_last)
    with pytest.raises(ValueError, match="keep_last must be an int >= 1"):
        ckpt.save_checkpoint(tmp_path, 1, {"step": 1}, keep_last=keep_last)
    assert not os.path.exists(tmp_path / "step_000001")


# --- tests that would have caught bugs the suite once missed ---------------------------------

def test_every_epoch_has_its_own_order():
    """DistributedSampler.set_epoch: without it every epoch repeats epoch 0's order."""
    trainer = tiny_sft(max_steps=12)  # 48 problems, 8 per step: two epochs of 6 steps
    seen = []
    compute_loss = trainer.compute_loss

    def recording(model, batch):  # each row without its padding
        seen.append([tuple(row[mask.bool()].tolist())
                     for row, mask in zip(batch["input_ids"], batch["attention_mask"])])
        return compute_loss(model, batch)

    trainer.compute_loss = recording
    trainer.train()
    epoch0, epoch1 = sum(seen[:6], []), sum(seen[6:], [])
    assert sorted(epoch0) == sorted(epoch1) and epoch0 != epoch1
    sampler, dataset = trainer.train_loader.sampler, trainer.train_loader.dataset
    sampler.set_epoch(1)
    expected = [tuple(dataset[i]["input_ids"].tolist()) for i in sampler]
    assert epoch1 == expected


def test_fp16_clips_the_unscaled_gradients_and_logs_their_norm():
    """GradScaler.unscale_ before clipping: else the threshold meets gradients 65536x too large
    (so the optimizer sees far less than max_grad_norm) and the logged norm is 65536x too."""
    fp32 = tiny_sft(max_steps=1).train()[0]["grad_norm"]
    trainer = tiny_sft(max_steps=1, amp_dtype="fp16", max_grad_norm=1e-2)
    seen, step = [], trainer.optimizer.step

    def checked_step(*a, **k):
        seen.append(torch.nn.utils.get_total_norm(
            [p.grad for p in trainer.raw_model.parameters()]).item())
        return step(*a, **k)

    trainer.optimizer.step = checked_step
    record = trainer.train()[0]
    assert record["skipped_steps"] == 0
    assert record["grad_norm"] == pytest.approx(fp32, rel=0.05)  # unscaled, like fp32's
    assert seen[0] == pytest.approx(1e-2, rel=1e-3)  # clipped to the threshold, not far below


def test_a_save_writes_a_temporary_folder_and_renames_it(tmp_path, monkeypatch):
    """A checkpoint is never written at its final path: a kill mid-write must not leave a
    step_* folder that looks complete."""
    written, save = [], torch.save

    def watching(state, f):
        name = f.name
        written.append((os.path.basename(os.path.dirname(name)),
                        os.path.exists(tmp_path / "step_000003")))
        return save(state, f)

    monkeypatch.setattr(torch, "save", watching)
    final = ckpt.save_checkpoint(tmp_path, 3, {"step": 3})
    assert written == [(f".tmp_step_000003_{os.getpid()}", False)]
    assert sorted(os.listdir(final)) == ["state.pt", "state.pt.sha256"]
    assert sorted(os.listdir(tmp_path)) == ["step_000003"]


def test_evaluate_runs_the_model_in_eval_mode():
    """With dropout on during evaluation the eval loss would be noisy and too high."""
    trainer = tiny_sft(dropout=0.5, val=True)
    model = trainer.raw_model
    assert model.training
    a, b = trainer.evaluate()["loss"], trainer.evaluate()["loss"]
    model.eval()
    by_hand = [trainer.compute_loss(model, batch) for batch in trainer.val_loader]
    expected = sum(s.item() for s, _ in by_hand) / sum(
        trainer.count(batch).item() for batch in trainer.val_loader)
    model.train()
    assert a == b == pytest.approx(expected, rel=1e-6)
    assert model.training  # and back to training after


def test_the_dpo_reference_is_frozen_from_the_start():
    """A second angle on the frozen reference: frozen at construction (no gradient, eval mode,
    no dropout) even when handed over trainable and in train mode, and still equal, log-prob for
    log-prob, to the starting policy after training has moved the policy."""
    torch.manual_seed(0)
    model = TinyGPT(GPTConfig(vocab_size=TOK.vocab_size, block_size=12, n_layer=1, n_embd=32,
                              dropout=0.3))
    start = copy.deepcopy(model).eval()
    problems = [Problem(a, b, 2) for a, b in [(12, 34), (56, 7), (89, 10), (3, 3)]]
    pairs = DataLoader(PreferenceDataset(problems, TOK), batch_size=4,
                       collate_fn=PreferenceCollator(TOK.pad_id))
    ref = copy.deepcopy(model).train().requires_grad_(True)
    trainer = DPOTrainer(model=model, ref_model=ref, train_loader=pairs, device="cpu", max_steps=3,
                         optimizer=configure_optimizer(model=model, optimizer_type="adamw", lr=0.1,
                                                       weight_decay=0.0), progress=False)
    assert not ref.training and not any(p.requires_grad for p in ref.parameters())
    history = trainer.train()
    assert history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    batch = next(iter(pairs))
    chosen, _ = trainer.reference_logps(batch)
    with torch.no_grad():
        expected = sequence_logps(start(batch["chosen_input_ids"], batch["chosen_attention_mask"]),
                                  batch["chosen_labels"])
        moved = sequence_logps(model(batch["chosen_input_ids"], batch["chosen_attention_mask"]),
                               batch["chosen_labels"])
    torch.testing.assert_close(chosen, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(moved, expected, rtol=1e-3, atol=1e-3)


def test_resume_restores_the_rng_state_the_next_step_draws_from(tmp_path):
    """A second angle on the RNG state: the global RNG that dropout draws from is, at the first
    step after a resume, what it was at that step in an uninterrupted run."""
    def rng_at_each_step(trainer):
        states, compute_loss = {}, trainer.compute_loss

        def recording(model, batch):
            states.setdefault(trainer.step + 1, torch.get_rng_state())
            return compute_loss(model, batch)

        trainer.compute_loss = recording
        return states

    straight = tiny_sft(tmp_path / "a", max_steps=8, dropout=0.1)
    want = rng_at_each_step(straight)
    straight.train()
    tiny_sft(tmp_path / "b", max_steps=5, dropout=0.1).train()
    resumed = tiny_sft(tmp_path / "b", max_steps=8, dropout=0.1, resume_from="latest")
    got = rng_at_each_step(resumed)
    resumed.train()
    assert sorted(got) == [6, 7, 8]
    assert all(torch.equal(got[s], want[s]) for s in got)
    assert not torch.equal(want[6], want[1])  # dropout did draw in between


def test_the_loss_scale_carries_the_world_size():
    """A second angle on the world-size factor: DDP averages gradients over ranks, so each
    rank's backward carries world_size / (global count). Faked here in one process with a
    world size of 2 (no process group: DDP's mean is not applied), the gradient the optimizer
    sees is exactly twice the single process's."""
    grads = {}
    for world_size in (1, 2):
        trainer = tiny_sft(max_steps=1, max_grad_norm=None)
        trainer.dist = DistInfo(rank=0, world_size=world_size)
        step = trainer.optimizer.step

        def capture(*a, trainer=trainer, world_size=world_size, step=step, **k):
            grads[world_size] = [p.grad.clone() for p in trainer.raw_model.parameters()]
            return step(*a, **k)

        trainer.optimizer.step = capture
        trainer.train()
    assert all(torch.equal(g2, 2 * g1) for g1, g2 in zip(grads[1], grads[2]))


@pytest.mark.parametrize("chapter, flags", [
    ("03", []), ("05", ["--sft-steps", "4", "--sft-target", "0.0", "--max-steps", "2"])])
def test_a_finished_run_leaves_no_trainer_for_the_garbage_collector(chapter, flags, tmp_path):
    """A trainer that outlives its run in a reference cycle (an eval_fn lambda that named
    `trainer`) keeps its DDP model, and so the process group's C++ state, until a collection
    or interpreter shutdown; after a torchrun that had succeeded, one rank once aborted there."""
    def trainers():
        return sum(issubclass(type(o), Trainer) for o in gc.get_objects())

    argv = TINY03 + ["--out", str(tmp_path)] + flags
    chapters.run(chapter, argv)  # first: whatever it imports on first use (import frames linger)
    gc.collect()
    before = trainers()
    gc.disable()  # only reference counting frees what the run leaves behind
    try:
        chapters.run(chapter, argv)
        left = trainers() - before
    finally:
        gc.enable()
    assert left == 0

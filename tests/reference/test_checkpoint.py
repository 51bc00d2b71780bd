"""reference.checkpoint and Trainer resume: atomic, checksummed saves, fallbacks, keep-last,
bitwise resume. (Damage, full disks and kills: test_reliability.py.)"""
import json
import os
import random

import numpy as np
import pytest
import torch

from reference import SFTTrainer, configure_optimizer
from reference import checkpoint as ckpt
from reference.data import CharTokenizer, SFTCollator, SFTDataset, make_addition_splits
from reference.model import GPTConfig, TinyGPT
from reference.optimizer import warmup_cosine_scheduler


def test_save_is_atomic_and_listing_ignores_partial_writes(tmp_path):
    ckpt.save_checkpoint(tmp_path, 10, {"x": torch.ones(2)})
    # what a kill during the next save leaves behind: a temporary directory with a partial file
    partial = tmp_path / ".tmp_step_000020_999"
    partial.mkdir()
    (partial / "state.pt").write_bytes(b"\x80\x02half a pickle")
    assert [os.path.basename(p) for p in ckpt.list_checkpoints(tmp_path)] == ["step_000010"]
    path, state = ckpt.load_latest(tmp_path)
    assert path.endswith("step_000010") and torch.equal(state["x"], torch.ones(2))


def test_corrupt_newest_checkpoint_falls_back_with_a_warning(tmp_path):
    ckpt.save_checkpoint(tmp_path, 1, {"step": 1})
    ckpt.save_checkpoint(tmp_path, 2, {"step": 2})
    (tmp_path / "step_000002" / "state.pt").write_bytes(b"not a checkpoint")
    with pytest.warns(UserWarning, match="step_000002 could not be loaded \\(checksum mismatch.*"
                                         "previous"):
        path, state = ckpt.load_latest(tmp_path)
    assert state["step"] == 1


def test_keep_last_prunes_the_oldest(tmp_path):
    for step in (1, 2, 3, 4):
        ckpt.save_checkpoint(tmp_path, step, {"step": step}, keep_last=2)
    kept = [os.path.basename(p) for p in ckpt.list_checkpoints(tmp_path)]
    assert kept == ["step_000003", "step_000004"]


def test_a_re_save_of_a_step_replaces_it_whole(tmp_path):
    ckpt.save_checkpoint(tmp_path, 5, {"step": torch.tensor(1)})
    ckpt.save_checkpoint(tmp_path, 5, {"step": torch.tensor(2)})
    assert sorted(os.listdir(tmp_path)) == ["step_000005"]
    assert ckpt.load_state(tmp_path / "step_000005")["step"].item() == 2


def test_no_checkpoint_gives_none(tmp_path):
    assert ckpt.load_latest(tmp_path / "missing") == (None, None)


def test_rng_states_round_trip_through_a_weights_only_load(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    ckpt.save_checkpoint(tmp_path, 1, {"rng": ckpt.rng_state()})
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    _, state = ckpt.load_latest(tmp_path)  # weights_only=True inside
    ckpt.set_rng_state(state["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def make_trainer(out, max_steps, resume=None, grad_accum_steps=2):
    torch.manual_seed(0)
    tok = CharTokenizer()
    train, _ = make_addition_splits(2, 10, n_train=60, seed=0)
    ds = SFTDataset(train, tok)
    sampler = torch.utils.data.DistributedSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=0,
                                                  drop_last=True)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, sampler=sampler, drop_last=True,
                                         collate_fn=SFTCollator(tok.pad_id))
    model = TinyGPT(GPTConfig(vocab_size=tok.vocab_size, block_size=12, n_layer=1, n_embd=32,
                              dropout=0.1))
    opt = configure_optimizer(model=model, optimizer_type="adamw", lr=3e-3, weight_decay=0.1)
    return SFTTrainer(model=model, optimizer=opt, train_loader=loader, val_loader=None,
                      device="cpu", max_epochs=None, max_steps=max_steps,
                      grad_accum_steps=grad_accum_steps, use_amp=False,
                      scheduler=warmup_cosine_scheduler(opt, 3, 40), out_dir=str(out),
                      save_every=5, resume_from=resume, progress=False)


def test_trainer_resume_is_bitwise(tmp_path):
    """40 steps straight == 22 steps, a fresh process state, resume from step 22, 18 more.
    The data crosses epoch boundaries (60 rows, 8 per step) and dropout draws random numbers."""
    straight = make_trainer(tmp_path / "a", 40)
    straight.train()
    first = make_trainer(tmp_path / "b", 22)
    first.train()
    torch.manual_seed(12345)  # whatever the process did in between must not matter
    resumed = make_trainer(tmp_path / "b", 40, resume="latest")
    history = resumed.train()
    assert history[0]["step"] == 23  # the final save of the first run (save_every=5, max_steps=22)
    assert [r["loss"] for r in straight.history][22:] == [r["loss"] for r in resumed.history]
    a, b = straight.raw_model.state_dict(), resumed.raw_model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with open(tmp_path / "b" / "metrics.jsonl") as f:  # the log holds each step once
        assert len(f.readlines()) == 40


def test_trainer_resume_with_a_different_model_is_a_clear_error(tmp_path):
    make_trainer(tmp_path, 5).train()
    torch.manual_seed(0)
    other = make_trainer(tmp_path, 10, resume="latest")
    other.raw_model.lm_head = torch.nn.Linear(32, 7, bias=False)
    other.optimizer = configure_optimizer(model=other.raw_model, optimizer_type="adamw", lr=1e-3,
                                          weight_decay=0.0)
    with pytest.raises(ValueError, match="does not fit this model"):
        other.train()


def test_trainer_save_every_zero_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="save_every must be >= 1"):
        t = make_trainer(tmp_path, 5)
        SFTTrainer(model=t.raw_model, optimizer=t.optimizer, train_loader=t.train_loader,
                   val_loader=None, device="cpu", max_epochs=1, grad_accum_steps=1,
                   use_amp=False, save_every=0)


def test_trainer_refuses_to_mix_with_an_earlier_runs_checkpoints(tmp_path):
    make_trainer(tmp_path, 5).train()
    with pytest.raises(ValueError, match="already holds checkpoints of an earlier run.*"
                                         "resume_from='latest'"):
        make_trainer(tmp_path, 10).train()


def test_a_resume_from_an_older_checkpoint_drops_the_newer_ones(tmp_path):
    """They belong to the run being redone: a later resume must not pick them up, and the log
    must hold each step once."""
    straight = make_trainer(tmp_path / "a", 15)
    straight.train()
    make_trainer(tmp_path / "b", 15).train()
    older = str(tmp_path / "b" / "checkpoints" / "step_000005")
    trainer = make_trainer(tmp_path / "b", 12, resume=older)
    trainer.train()
    assert [os.path.basename(p) for p in ckpt.list_checkpoints(tmp_path / "b" / "checkpoints")] == \
           ["step_000005", "step_000010", "step_000012"]
    with open(tmp_path / "b" / "metrics.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == list(range(1, 13))
    assert [r["loss"] for r in trainer.history] == [r["loss"] for r in straight.history][5:12]

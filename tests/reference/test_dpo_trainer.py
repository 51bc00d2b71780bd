"""DPOTrainer: the concatenated forward, the frozen reference, precomputed reference log-probs,
accumulation, resume and bad input. Tiny models and a handful of pairs: each test is seconds."""
import copy
import json
import math
import os
import random

import pytest
import torch

from reference import DPOTrainer, configure_optimizer
from reference.data import CharTokenizer, PreferenceCollator, PreferenceDataset, Problem
from reference.dpo import dpo_loss
from reference.logprobs import sequence_logps
from reference.model import GPTConfig, TinyGPT
from reference.optimizer import warmup_cosine_scheduler

TOK = CharTokenizer()
COLLATE = PreferenceCollator(TOK.pad_id)
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
           "logps/chosen", "logps/rejected")


def tiny_model(seed=0, dropout=0.0):
    torch.manual_seed(seed)
    return TinyGPT(GPTConfig(vocab_size=TOK.vocab_size, block_size=12, n_layer=1, n_embd=32,
                             dropout=dropout))


def pairs(n=20, seed=0):
    rng = random.Random(seed)
    return PreferenceDataset([Problem(rng.randrange(100), rng.randrange(100), 2) for _ in range(n)],
                             TOK, seed=seed)


def loader(dataset, batch_size=8, shuffle=False):
    """With shuffle: drop_last, so each epoch leaves out different pairs (the precomputed table
    must hold them anyway)."""
    if not shuffle:
        return torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=COLLATE)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                                       collate_fn=COLLATE,
                                       generator=torch.Generator().manual_seed(0))


def make_trainer(model=None, ref_model="copy", train_loader=None, lr=1e-2, **kw):
    model = model if model is not None else tiny_model()
    ref_model = copy.deepcopy(model) if ref_model == "copy" else ref_model
    args = dict(model=model, ref_model=ref_model,
                optimizer=configure_optimizer(model=model, optimizer_type="adamw", lr=lr,
                                              weight_decay=0.0),
                train_loader=train_loader if train_loader is not None else loader(pairs()),
                beta=0.1, device="cpu", max_epochs=1, progress=False)
    args.update(kw)
    return DPOTrainer(**args)


def hand_batch(problems, rejected):
    ds = PreferenceDataset(problems, TOK)
    ds.rejected = list(rejected)
    return COLLATE([ds[i] for i in range(len(ds))])


def train_losses(history):
    return [r["loss"] for r in history if "split" not in r]


# --- the trainer's forward path --------------------------------------------------------------

def test_concatenated_forward_equals_two_separate_forwards():
    """compute_loss runs the policy once over [chosen; rejected]; loss, metrics and gradients equal
    those of a separate forward per half."""
    # a reference unlike the policy: the loss is not just ln 2
    policy, ref = tiny_model(0), tiny_model(1)
    trainer = make_trainer(model=policy, ref_model=ref)
    batch = hand_batch([Problem(55, 55, 2), Problem(3, 4, 2), Problem(70, 8, 2)], ["1", "12", "88"])
    # the halves need padding
    assert batch["chosen_input_ids"].shape[1] != batch["rejected_input_ids"].shape[1]

    shapes = []
    hook = policy.register_forward_hook(
        lambda module, inputs, output: shapes.append(tuple(inputs[0].shape)))
    loss_sum, metrics = trainer.compute_loss(trainer.model, batch)
    hook.remove()
    assert shapes == [(6, 10)]  # one forward: 3 chosen rows then 3 rejected rows
    loss_sum.backward()
    joint_grads = {name: p.grad.clone() for name, p in policy.named_parameters()}

    policy.zero_grad()
    sides = {}
    for model in (policy, ref):
        with torch.set_grad_enabled(model is policy):
            sides[model] = [sequence_logps(model(batch[f"{s}_input_ids"],
                                                 attention_mask=batch[f"{s}_attention_mask"]),
                                           batch[f"{s}_labels"]) for s in ("chosen", "rejected")]
    losses, chosen_rewards, rejected_rewards = dpo_loss(*sides[policy], *sides[ref], beta=0.1)
    losses.sum().backward()
    assert loss_sum.item() == pytest.approx(losses.sum().item(), rel=1e-6)
    assert loss_sum.item() != pytest.approx(3 * math.log(2), rel=1e-3)
    assert metrics["logps/chosen"][0].item() == \
           pytest.approx(sides[policy][0].sum().item(), rel=1e-6)
    assert metrics["rewards/margins"][0].item() == \
           pytest.approx((chosen_rewards - rejected_rewards).sum().item(), rel=1e-5)
    for name, p in policy.named_parameters():
        torch.testing.assert_close(joint_grads[name], p.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_reference_model_gets_no_gradient_and_does_not_change():
    ref = tiny_model(1)
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    trainer = make_trainer(ref_model=ref, max_steps=3)
    policy_before = copy.deepcopy(trainer.raw_model.state_dict())
    trainer.train()
    assert not ref.training
    assert all(p.grad is None and not p.requires_grad for p in ref.parameters())
    assert all(torch.equal(before[k], v) for k, v in ref.state_dict().items())
    assert not all(torch.equal(policy_before[k], v)
                   for k, v in trainer.raw_model.state_dict().items())
    chosen, rejected = trainer.reference_logps(next(iter(trainer.train_loader)))
    # no autograd graph behind them
    assert chosen.grad_fn is None and rejected.grad_fn is None


def test_dropout_is_off_in_both_models():
    model = tiny_model(dropout=0.5)
    ref = copy.deepcopy(model).train()
    trainer = make_trainer(model=model, ref_model=ref, max_steps=1)
    ids = next(iter(trainer.train_loader))["chosen_input_ids"]
    model.train()
    assert torch.equal(model(ids), model(ids)) and torch.equal(ref(ids), ref(ids))
    # the policy starts as the reference, so with no noise every pair's logits are 0: loss ln 2
    assert trainer.train()[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_rpo_alpha_adds_the_chosen_nll_per_token():
    batch = hand_batch([Problem(55, 55, 2), Problem(3, 4, 2)], ["1", "12"])
    plain = make_trainer(model=tiny_model(0), ref_model=tiny_model(1))
    rpo = make_trainer(model=tiny_model(0), ref_model=tiny_model(1), rpo_alpha=0.5)
    with torch.no_grad():
        dpo_sum, plain_metrics = plain.compute_loss(plain.model, batch)
        rpo_sum, metrics = rpo.compute_loss(rpo.model, batch)
        chosen = sequence_logps(rpo.model(batch["chosen_input_ids"]), batch["chosen_labels"])
    nll = -chosen / torch.tensor([4.0, 2.0])  # "110"+eos and "7"+eos
    assert rpo_sum.item() == pytest.approx(dpo_sum.item() + 0.5 * nll.sum().item(), rel=1e-6)
    assert metrics["nll_loss"][0].item() == pytest.approx(nll.sum().item(), rel=1e-6) and \
           metrics["nll_loss"][1] == 2
    assert "nll_loss" not in plain_metrics
    with pytest.raises(ValueError, match="rpo_alpha must be >= 0"):
        make_trainer(rpo_alpha=-1.0)


# --- precomputed reference log-probs -----------------------------------------------------------

def test_precomputed_ref_logps_give_the_same_losses_as_the_online_reference():
    """Three epochs of a shuffling loader with drop_last: pairs left out of epoch 0 come back
    later."""
    runs = {}
    for precompute in (False, True):
        trainer = make_trainer(model=tiny_model(0), ref_model=tiny_model(1),
                               train_loader=loader(pairs(), shuffle=True),
                               val_loader=loader(pairs(12, seed=1)), max_steps=6, eval_every=3,
                               precompute_ref_logps=precompute)
        runs[precompute] = trainer.train()
        assert (trainer.ref_model is None) == precompute  # freed once its log-probs are computed
    online, precomputed = runs[False], runs[True]
    assert len(online) == len(precomputed) == 8  # 6 steps and 2 evals
    for a, b in zip(online, precomputed):
        for key in ("loss",) + (METRICS if "split" not in a else ()):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key)
    assert train_losses(online)[-1] < train_losses(online)[0]


def test_precomputed_table_misses_a_pair_it_never_saw():
    trainer = make_trainer(max_steps=1, precompute_ref_logps=True)
    trainer.train()
    other = next(iter(loader(pairs(4, seed=7))))
    with pytest.raises(ValueError, match="not among the reference log-probs precomputed"):
        trainer.compute_loss(trainer.model, other)


def test_batches_may_carry_their_own_reference_logps():
    batches = [dict(b, ref_chosen_logps=torch.full((len(b["chosen_labels"]),), -3.0),
                    ref_rejected_logps=torch.full((len(b["chosen_labels"]),), -3.0))
               for b in loader(pairs(16))]
    history = make_trainer(ref_model=None, train_loader=batches).train()
    assert len(history) == 2 and all(math.isfinite(r["loss"]) for r in history)


# --- the public signature, accumulation and resume ----------------------------------------------

def test_public_signature_trains_and_logs_trl_metrics():
    model = tiny_model()
    optimizer = configure_optimizer(model=model, optimizer_type="adamw", lr=1e-2, weight_decay=0.0)
    # one batch, three times: its margins must grow
    trainer = DPOTrainer(model=model, ref_model=copy.deepcopy(model), optimizer=optimizer,
                         train_loader=loader(pairs(8)), val_loader=loader(pairs(8)), beta=0.1,
                         device="cpu", max_epochs=3)
    history = trainer.train()
    assert [r["step"] for r in history] == [1, 2, 3]
    # loss_count counts pairs (the divisor), tokens both completions' tokens
    assert all(set(METRICS) <= set(r) and r["loss_count"] == 8 < r["tokens"] for r in history)
    assert history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)        # policy == reference
    assert history[0]["rewards/margins"] == 0.0 and \
           history[0]["rewards/accuracies"] == 0.0  # ties don't win
    assert history[-1]["rewards/margins"] > 0 and history[-1]["loss"] < math.log(2)
    assert 0.0 < trainer.evaluate()["loss"] < math.log(2)


def test_accumulation_matches_full_batch():
    """2 micro-batches of 4 pairs == 1 batch of 8, in fp32: the loss is a mean over the step's
    pairs."""
    runs = []
    for batch_size, accum in ((8, 1), (4, 2)):
        trainer = make_trainer(model=tiny_model(0), ref_model=tiny_model(1),
                               train_loader=loader(pairs(24), batch_size),
                               grad_accum_steps=accum, max_steps=3)
        runs.append((trainer.train(), trainer.raw_model.state_dict()))
    (full, full_params), (accumulated, accumulated_params) = runs
    for a, b in zip(full, accumulated):
        assert a["loss_count"] == b["loss_count"] == 8 and a["tokens"] == b["tokens"]
        for key in ("loss", "grad_norm") + METRICS:
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-6), (a["step"], key)
    for name, p in full_params.items():
        assert (p - accumulated_params[name]).norm() <= 1e-6 * p.norm(), name


@pytest.mark.parametrize("precompute", [False, True])
def test_resume_is_bitwise(tmp_path, precompute):
    """6 straight steps == 3 steps, a checkpoint (mid-epoch), a fresh trainer resuming for 3
    more."""
    def run(out, max_steps, resume=False):
        model = tiny_model(0)
        optimizer = configure_optimizer(model=model, optimizer_type="adamw", lr=1e-2,
                                        weight_decay=0.0)
        trainer = make_trainer(model=model, ref_model=tiny_model(1), optimizer=optimizer,
                               train_loader=loader(pairs(), shuffle=True),
                               val_loader=loader(pairs(8, seed=1)),
                               scheduler=warmup_cosine_scheduler(optimizer, 2, 6),
                               max_steps=max_steps, eval_every=3, out_dir=str(out), save_every=3,
                               precompute_ref_logps=precompute,
                               resume_from="latest" if resume else None)
        trainer.train()
        return trainer

    straight = run(tmp_path / "straight", 6)
    run(tmp_path / "resumed", 3)
    resumed = run(tmp_path / "resumed", 6, resume=True)
    assert len(resumed.history) == 4  # steps 4-6 and the eval at 6

    def records(trainer):
        with open(os.path.join(trainer.out_dir, "metrics.jsonl")) as f:
            return [json.loads(line) for line in f]
    assert len(records(straight)) == 8
    assert records(straight) == records(resumed)  # every logged number, bit for bit
    a, b = straight.raw_model.state_dict(), resumed.raw_model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


# --- bad input -------------------------------------------------------------------------------

def test_missing_ref_model_without_precomputed_logps_is_a_clear_error():
    with pytest.raises(ValueError,
                       match="no 'ref_chosen_logps'.*no ref_model.*ref_model=copy.deepcopy"):
        make_trainer(ref_model=None).train()
    with pytest.raises(ValueError, match="precompute_ref_logps=True needs ref_model"):
        make_trainer(ref_model=None, precompute_ref_logps=True)
    model = tiny_model()
    with pytest.raises(ValueError, match="ref_model is the policy itself"):
        make_trainer(model=model, ref_model=model)


@pytest.mark.parametrize("beta", [0.0, -0.1])
def test_nonpositive_beta_is_a_clear_error(beta):
    with pytest.raises(ValueError, match=f"beta must be > 0.*beta={beta}"):
        make_trainer(beta=beta)


def test_empty_completion_is_a_clear_error():
    batch = hand_batch([Problem(12, 34, 2), Problem(5, 6, 2)], ["47", "12"])
    batch["rejected_labels"][1] = -100
    with pytest.raises(ValueError,
                       match="row 1 of 'rejected_labels' is a completion with no tokens"):
        make_trainer(train_loader=[batch]).train()


def test_identical_pairs_warn_with_their_count_and_still_train():
    batch = hand_batch([Problem(12, 34, 2), Problem(5, 6, 2), Problem(9, 9, 2), Problem(1, 2, 2)],
                       ["46", "12", "18", "4"])
    with pytest.warns(UserWarning, match="2 of 4 DPO pairs have identical chosen and rejected"):
        history = make_trainer(train_loader=[batch]).train()
    assert len(history) == 1 and math.isfinite(history[0]["loss"])

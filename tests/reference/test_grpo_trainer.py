"""GRPOTrainer on a tiny TinyGPT: rollouts, masking, reuse, normalization, errors, DDP, resume."""
import copy
import math
import os
import subprocess
import sys

import pytest
import torch
from torch.utils.data import DataLoader

from conftest import ROOT, read_jsonl
from reference import GRPOTrainer
from reference.data import CharTokenizer, Problem
from reference.grpo import group_advantages, grpo_loss, grpo_loss_count
from reference.logprobs import per_token_logps
from reference.model import GPTConfig, TinyGPT
from reference.rewards import correctness_reward, format_reward
from reference.data import PromptCollator, PromptDataset

TOK = CharTokenizer()
G = 4
PROBLEMS = [Problem(3, 4, 1), Problem(12, 34, 2), Problem(5, 5, 1), Problem(0, 7, 1),
            Problem(8, 1, 1), Problem(2, 2, 1), Problem(6, 3, 1), Problem(9, 9, 1)]
CLIP_KEYS = ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean")


def tiny_model(block_size=10, seed=0):
    torch.manual_seed(seed)
    return TinyGPT(GPTConfig(vocab_size=TOK.vocab_size, block_size=block_size, n_layer=1, n_head=2,
                             n_embd=16))


def prompt_loader(problems=PROBLEMS, batch_size=2):
    return DataLoader(PromptDataset(problems, TOK), batch_size=batch_size,
                      collate_fn=PromptCollator(TOK.pad_id))


def length_reward(prompts, completions, **batch):
    return [float(len(c)) for c in completions]


def varied_reward(prompts, completions, **batch):
    """Any completions that differ almost surely score differently: groups rarely tie."""
    return [float(sum(map(ord, c)) % 7) for c in completions]


def online_trainer(model=None, lr=1e-2, **kw):
    model = model if model is not None else tiny_model()
    args = dict(model=model,
                optimizer=torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0),
                train_loader=prompt_loader(), num_samples_per_prompt=G, device="cpu",
                reward_fn=varied_reward, tokenizer=TOK, max_completion_length=4, generation_seed=0,
                progress=False)
    args.update(kw)
    return GRPOTrainer(**args)


def capture(trainer):
    """Record the micro-batches each step trains on."""
    seen, original = [], trainer.step_batches
    trainer.step_batches = lambda batches: seen.append(original(batches)) or seen[-1]
    return seen


def offline_batches(n_batches=2, groups=2, T=8, seed=0):
    """Right-padded prompt (3 tokens) + response (1-5 tokens) rows, G per group, 0/1/2 rewards."""
    g = torch.Generator().manual_seed(seed)
    batches, pos = [], torch.arange(T)
    for _ in range(n_batches):
        B = groups * G
        ends = 3 + torch.randint(1, T - 2, (B, 1), generator=g)
        ids = torch.where(pos < ends, torch.randint(2, TOK.vocab_size, (B, T), generator=g), 0)
        batches.append({"input_ids": ids, "response_mask": ((pos >= 3) & (pos < ends)).long(),
                        "rewards": torch.randint(0, 3, (B,), generator=g).float()})
    return batches


def offline_trainer(batches, model=None, **kw):
    model = model if model is not None else tiny_model()
    args = dict(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
                train_loader=batches, num_samples_per_prompt=G, device="cpu",
                max_completion_length=8, max_grad_norm=None, max_steps=1, progress=False)
    args.update(kw)
    return GRPOTrainer(**args)


# --- prompts ------------------------------------------------------------------------------------
def test_prompt_collator_left_pads_and_keeps_text():
    batch = PromptCollator(TOK.pad_id)([PromptDataset(PROBLEMS[:2], TOK)[i] for i in range(2)])
    assert batch["prompts"] == ["3+4=", "12+34="] and batch["problems"] == PROBLEMS[:2]
    assert batch["prompt_attention_mask"].tolist() == [[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]
    assert batch["prompt_input_ids"][0].tolist() == [TOK.pad_id] * 2 + TOK.encode("3+4=")


# --- online training ----------------------------------------------------------------------------
def test_online_training_logs_every_metric(tmp_path):
    model = tiny_model()
    trainer = online_trainer(model, reward_fn=[correctness_reward, format_reward, length_reward],
                             reward_weights=[1.0, 0.5, 0.1], ref_model=copy.deepcopy(model),
                             beta=0.05, num_iterations=2, grad_accum_steps=2, max_steps=4,
                             out_dir=str(tmp_path), val_loader=prompt_loader(PROBLEMS[:2]),
                             eval_every=4)
    trainer.train()
    records = read_jsonl(os.path.join(tmp_path, "metrics.jsonl"))
    names = ("correctness_reward", "format_reward", "length_reward")
    keys = ["loss", "grad_norm", "lr", "reward", "reward_std", "frac_reward_zero_std", "kl",
            *CLIP_KEYS, "entropy", "num_tokens", "completions/mean_length",
            "completions/clipped_ratio",
            *(f"rewards/{n}/{s}" for n in names for s in ("mean", "std"))]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for r in records:
        assert all(math.isfinite(r[k]) for k in keys), r
        assert 1 <= r["completions/mean_length"] <= 4 and 0 <= r["completions/clipped_ratio"] <= 1
        assert 0 <= r["frac_reward_zero_std"] <= 1 and r["entropy"] > 0
        weighted = sum(w * r[f"rewards/{n}/mean"] for n, w in zip(names, (1.0, 0.5, 0.1)))
        assert r["reward"] == pytest.approx(weighted, rel=1e-5)
    # num_tokens counts what was generated, prompts included: only steps that sampled add to it
    assert records[0]["num_tokens"] == records[1]["num_tokens"] < records[2]["num_tokens"]
    assert trainer.generation_seconds > 0
    assert records[1]["kl"] > 0  # the policy has moved away from its copy
    assert math.isfinite(read_jsonl(os.path.join(tmp_path, "metrics.jsonl"),
                                    split="eval")[0]["loss"])
    assert model.training  # generation switched to eval mode and back


def test_groups_are_contiguous_and_never_split():
    calls = []

    def recording_reward(prompts, completions, **batch):
        calls.append((prompts, [p.prompt for p in batch["problems"]]))
        return varied_reward(prompts, completions)

    trainer = online_trainer(reward_fn=recording_reward, grad_accum_steps=2, max_steps=1)
    seen = capture(trainer)
    trainer.train()
    micro = seen[0]
    assert len(micro) == 2  # one micro-batch per loader batch of 2 prompts
    for i, rollout in enumerate(micro):
        prompts = [p.prompt for p in PROBLEMS[2 * i:2 * i + 2]]
        # prompt g's G samples in rows g*G .. g*G+G-1
        expected = [p for p in prompts for _ in range(G)]
        assert calls[i] == (expected, expected)
        P = rollout["input_ids"].shape[1] - 4
        assert [TOK.decode(row[:P].tolist()) for row in rollout["input_ids"]] == expected
        assert not rollout["completion_mask"][:, :P - 1].any()  # prompt tokens are never trained
        assert rollout["advantages"].view(-1, G).sum(dim=1).abs().max() < 1e-5  # whole groups


def test_one_iteration_never_clips():
    trainer = online_trainer(lr=0.05, max_steps=3)
    for r in trainer.train():
        assert all(r[k] == 0.0 for k in CLIP_KEYS), r  # pi_old = pi exactly: ratio 1


def test_two_iterations_reuse_the_same_completions():
    trainer = online_trainer(lr=0.05, num_iterations=2)
    assert trainer.max_steps == 8  # 4 loader batches, each trained on twice
    trainer.max_steps = 3
    seen = capture(trainer)
    history = trainer.train()
    assert seen[1] is seen[0] and seen[2] is not seen[0]
    assert not torch.equal(seen[2][0]["input_ids"], seen[0][0]["input_ids"])
    assert all(history[0][k] == 0.0 for k in CLIP_KEYS)
    assert history[1]["clip_ratio/region_mean"] > 0  # the policy moved: the ratio is no longer 1
    assert history[1]["num_tokens"] == history[0]["num_tokens"] < history[2]["num_tokens"]


class ScriptedGPT(TinyGPT):
    """A TinyGPT whose generate() returns fixed completions, so a test chooses where each ends."""

    def __init__(self, script):
        torch.manual_seed(0)
        super().__init__(GPTConfig(vocab_size=TOK.vocab_size, block_size=10, n_layer=1, n_head=2,
                                   n_embd=16))
        self.script = script

    def generate(self, input_ids, attention_mask=None, max_new_tokens=8, **kw):
        return self.script[:input_ids.shape[0], :max_new_tokens].clone()


def script(*rows):
    return torch.tensor([[TOK.eos_id if c == "$" else TOK.pad_id if c == "_" else TOK.stoi[c]
                          for c in row]
                         for row in rows])


def test_tokens_after_the_end_token_are_masked():
    seen_completions = []

    def reward(prompts, completions, **batch):
        seen_completions.append(completions)
        return length_reward(prompts, completions)

    runs = []
    for tails in (("777", "5555"), ("9$9", "1234")):  # different tokens after the end token
        model = ScriptedGPT(script("4$" + tails[0], "46899", "$" + tails[1], "12$__"))
        trainer = online_trainer(model, reward_fn=reward,
                                 train_loader=prompt_loader(PROBLEMS[:1], 1),
                                 max_completion_length=5,
                                 optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                 max_steps=1, loss_type="dapo")
        seen = capture(trainer)
        runs.append((trainer.train()[0], seen[0][0], model.state_dict()))
    assert seen_completions == [["4", "46899", "", "12"]] * 2
    record, rollout, params = runs[0]
    assert rollout["completion_mask"][:, -5:].int().tolist() == [[1, 1, 0, 0, 0], [1, 1, 1, 1, 1],
                                                                  [1, 0, 0, 0, 0], [1, 1, 1, 0, 0]]
    assert record["completions/mean_length"] == 11 / 4  # the end token counts, as in TRL
    assert record["completions/clipped_ratio"] == 1 / 4
    assert record["tokens"] == 11
    assert runs[1][0]["loss"] == record["loss"]
    assert all(torch.equal(params[k], runs[1][2][k]) for k in params)


# --- errors -------------------------------------------------------------------------------------
def short_reward(prompts, completions, **batch):
    return [1.0] * (len(completions) - 1)


def nan_reward(prompts, completions, **batch):
    return [float("nan")] * len(completions)


@pytest.mark.parametrize("fn, message", [
    (short_reward, "short_reward returned 7 rewards for 8 completions"),
    (nan_reward, "nan_reward returned nan")])
def test_bad_reward_function_is_a_clear_error(fn, message):
    with pytest.raises(ValueError, match=message):
        online_trainer(reward_fn=[length_reward, fn], max_steps=1).train()


def test_group_of_one_is_a_clear_error():
    with pytest.raises(ValueError, match="num_samples_per_prompt must be >= 2"):
        online_trainer(num_samples_per_prompt=1)


def test_offline_batch_not_divisible_by_the_group_is_a_clear_error():
    batch = {k: v[:6] for k, v in offline_batches(1)[0].items()}
    with pytest.raises(ValueError, match="6 rows, not divisible by num_samples_per_prompt=4"):
        offline_trainer([batch]).train()


def test_prompt_longer_than_the_context_is_a_clear_error():
    with pytest.raises(ValueError, match="prompt_input_ids has length 6.*context of 9 tokens"):
        online_trainer(tiny_model(block_size=9), max_steps=1).train()


def test_reference_model_needed_only_with_kl():
    trainer = online_trainer(max_steps=1)
    assert trainer.ref_model is None and "kl" not in trainer.train()[0]
    with pytest.raises(ValueError, match="beta=0.1 adds a KL penalty.*ref_model="):
        online_trainer(beta=0.1)


@pytest.mark.parametrize("missing", ["reward_fn", "tokenizer"])
def test_online_without_reward_fn_or_tokenizer_is_a_clear_error(missing):
    with pytest.raises(ValueError, match="online GRPO.*needs reward_fn=.*tokenizer="):
        online_trainer(max_steps=1, **{missing: None}).train()


def test_reference_model_is_frozen():
    model = tiny_model()
    ref = copy.deepcopy(model)
    before = copy.deepcopy(ref.state_dict())
    history = online_trainer(model, lr=0.05, ref_model=ref, beta=0.1, max_steps=2).train()
    assert history[1]["kl"] > 0
    assert all(torch.equal(ref.state_dict()[k], before[k]) for k in before)
    assert all(p.grad is None and not p.requires_grad for p in ref.parameters())
    assert not ref.training
    assert not torch.equal(model.lm_head.weight, ref.lm_head.weight)


# --- offline: the loss and gradient by hand -------------------------------------------------
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_offline_step_equals_hand_computation(loss_type):
    """Two micro-batches of two groups, one SGD step at lr 1: the update is minus the gradient of
    grpo_loss over the whole step (bnpo: the mean of the two micro-batch losses)."""
    batches = offline_batches(n_batches=2, groups=2, T=8)
    model = tiny_model()
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    hand = copy.deepcopy(model)
    parts = []
    for b in batches:
        logps = per_token_logps(hand(b["input_ids"]), b["input_ids"])
        with torch.no_grad():
            ref_logps = per_token_logps(ref(b["input_ids"]), b["input_ids"])
        parts.append((logps, logps.detach(), ref_logps, group_advantages(b["rewards"], G),
                      b["response_mask"][:, 1:].bool()))
    kw = dict(beta=0.1, loss_type=loss_type, max_completion_length=8)
    if loss_type == "bnpo":  # the mean of the micro-batches' own means
        loss = sum(grpo_loss(*part, **kw)[0] for part in parts) / 2
    else:  # the whole step's loss_sum over its count
        whole = [torch.cat(x) for x in zip(*parts)]
        loss = grpo_loss(*whole, **kw)[0] / grpo_loss_count(whole[-1], loss_type, 8)
    loss.backward()

    record = offline_trainer(batches, model, ref_model=ref, beta=0.1, loss_type=loss_type,
                             grad_accum_steps=2).train()[0]
    assert record["loss"] == pytest.approx(loss.item(), rel=1e-5)
    start = dict(hand.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach() - start[name].detach(), -start[name].grad,
                                   rtol=1e-4, atol=1e-7)


def test_all_equal_reward_group_contributes_no_gradient():
    """Group 0's rewards are all 2: whatever its completions say, the update is the same."""
    batch = offline_batches(n_batches=1, groups=2)[0]
    batch["rewards"][:G] = 2.0  # group 1's rewards are [0, 1, 1, 2]: their mean is not 2
    other = {k: v.clone() for k, v in batch.items()}
    other["input_ids"][:G] = torch.where(batch["input_ids"][:G] > 0, 15 - batch["input_ids"][:G], 0)
    params, records = [], []
    for b in (batch, other):
        model = tiny_model()
        records.append(offline_trainer([b], model, loss_type="grpo").train()[0])
        params.append(model.state_dict())
    assert records[0]["frac_reward_zero_std"] == 0.5 and records[0]["grad_norm"] > 0
    assert records[0]["grad_norm"] == records[1]["grad_norm"]
    assert all(torch.equal(params[0][k], params[1][k]) for k in params[0])


# --- reproducibility ------------------------------------------------------------------------
def test_seeded_generation_is_reproducible():
    def run(seed):
        trainer = online_trainer(generation_seed=seed, max_steps=3)
        seen = capture(trainer)
        return [r["loss"] for r in trainer.train()], [m[0]["completion_ids"] for m in seen]

    (losses_a, ids_a), (losses_b, ids_b), (_, ids_c) = run(0), run(0), run(1)
    assert losses_a == losses_b  # bitwise
    assert all(torch.equal(a, b) for a, b in zip(ids_a, ids_b))
    assert not all(torch.equal(a, c) for a, c in zip(ids_a, ids_c))


def test_resume_in_the_middle_of_a_reused_rollout_is_bitwise(tmp_path):
    """5 straight steps with num_iterations=2 == 3 steps (the checkpoint falls between the two uses
    of the second rollout) + resume for steps 4 and 5: the cached rollout and the sampling stream
    come back with the checkpoint."""
    ckpt = str(tmp_path / "ckpt")
    straight_model = tiny_model()
    straight = online_trainer(straight_model, num_iterations=2, max_steps=5).train()
    first = online_trainer(num_iterations=2, max_steps=3, save_every=3, checkpoint_dir=ckpt).train()
    resumed_model = tiny_model(seed=1)
    resumed = online_trainer(resumed_model, num_iterations=2, max_steps=5, checkpoint_dir=ckpt,
                             resume_from="latest").train()
    assert [r["step"] for r in resumed] == [4, 5]
    assert [r["loss"] for r in straight] == [r["loss"] for r in first + resumed]
    assert all(torch.equal(v, resumed_model.state_dict()[k])
               for k, v in straight_model.state_dict().items())


# --- DDP ----------------------------------------------------------------------------------------
def test_offline_ddp_equals_one_process(tmp_path):
    """2 processes x 2 micro-batches of 1 group == 1 process x 1 batch of 4 groups, over 10 steps,
    for grpo (num_iterations=2), dapo (batch-scaled rewards, KL) and dr_grpo."""
    script = os.path.join(ROOT, "tests", "scripts", "grpo_offline_ddp.py")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT,
               TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    one, two = str(tmp_path / "one.pt"), str(tmp_path / "two.pt")
    r = subprocess.run([sys.executable, script, "--out", one], env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node=2", script, "--out", two, "--grad-accum-steps", "2"],
                       env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = torch.load(one, weights_only=True), torch.load(two, weights_only=True)
    for name in a:
        assert len(a[name]["loss"]) == len(b[name]["loss"]) == 10
        # the GRPO loss at ratio 1 is minus the mean advantage, 0 up to rounding: hence the atol
        torch.testing.assert_close(torch.tensor(b[name]["loss"]), torch.tensor(a[name]["loss"]),
                                   rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(torch.tensor(b[name]["grad_norm"]),
                                   torch.tensor(a[name]["grad_norm"]), rtol=1e-5, atol=0)
        for k, v in a[name]["params"].items():
            assert (b[name]["params"][k] - v).norm() <= 1e-5 * v.norm(), (name, k)

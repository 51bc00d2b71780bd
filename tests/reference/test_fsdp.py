"""Trainer(parallelism="fsdp"): FSDP2 trains SFT, DPO and GRPO as DDP does (2 processes), each
rank holds half of the weights, a sharded checkpoint resumes bit for bit and on another world
size, ranks may generate different numbers of tokens, and the wrong options or checkpoint kind
get clear errors.

Run under torchrun, this file is the worker of the two-process tests:
    torchrun --nproc_per_node=2 tests/reference/test_fsdp.py --out results.pt
"""
import argparse
import copy
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from reference import DPOTrainer, GRPOTrainer, SFTTrainer, configure_optimizer, fsdp
from reference.chapters.common import sharded_loader
from reference.data import (CharTokenizer, PreferenceCollator, PreferenceDataset, PromptCollator,
                            PromptDataset, SFTCollator, SFTDataset, exact_match, left_pad,
                            make_addition_splits, max_answer_tokens)
from reference.distributed import barrier, teardown, torchrun_env
from reference.model import GPTConfig, TinyGPT
from reference.optimizer import warmup_cosine_scheduler
from reference.rewards import correctness_reward

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 6


def tiny_model(tok, digits=2):
    return TinyGPT(GPTConfig(vocab_size=tok.vocab_size, block_size=4 * digits + 4, n_layer=2,
                             n_head=2, n_embd=16))


def sft(parallelism, out=None, batch_size=8, resume=False, **options):
    """STEPS steps of SFT on 1-digit sums (80 to train on: the 6th step starts a new epoch),
    evaluated (held-out loss, greedy exact match) every 3, checkpointed every 3 into out."""
    torch.manual_seed(0)
    tok = CharTokenizer()
    train, held_out = make_addition_splits(1, 20, seed=0)
    collate = SFTCollator(tok.pad_id)
    loader = sharded_loader(SFTDataset(train, tok), batch_size, collate, seed=0)
    val = torch.utils.data.DataLoader(SFTDataset(held_out, tok), batch_size=20, collate_fn=collate)
    model = tiny_model(tok, digits=1)
    optimizer = configure_optimizer(model, lr=5e-3, weight_decay=0.1)
    trainer = SFTTrainer(
        model=model, optimizer=optimizer, train_loader=loader, val_loader=val, device="cpu",
        max_steps=STEPS, scheduler=warmup_cosine_scheduler(optimizer, 2, STEPS), eval_every=3,
        eval_fn=lambda m: {"accuracy": exact_match(m, held_out, tok)}, out_dir=out,
        save_every=3 if out else None, resume_from="latest" if resume else None, progress=False,
        parallelism=parallelism, **options)
    return trainer, trainer.train()


def dpo(parallelism):
    """4 DPO steps from the initial model against its frozen copy (whole on every rank)."""
    torch.manual_seed(0)
    tok = CharTokenizer()
    train, _ = make_addition_splits(2, 40, seed=0)
    pairs = sharded_loader(PreferenceDataset(train, tok, seed=0), 4,
                           PreferenceCollator(tok.pad_id), seed=0)
    model = tiny_model(tok)
    optimizer = configure_optimizer(model, lr=5e-3, weight_decay=0.1)
    trainer = DPOTrainer(model=model, ref_model=copy.deepcopy(model), optimizer=optimizer,
                         train_loader=pairs, device="cpu", max_steps=4, rpo_alpha=1.0,
                         pad_token_id=tok.pad_id, progress=False, parallelism=parallelism)
    return trainer, trainer.train()


def grpo(parallelism):
    """4 online GRPO steps on 1-digit sums: 2 prompts x 4 samples per rank, each generation
    used twice, with a KL penalty to a frozen copy (whole on every rank). The untrained model
    ends its samples at random lengths, so the ranks generate different numbers of tokens."""
    torch.manual_seed(0)
    tok = CharTokenizer()
    train, _ = make_addition_splits(1, 20, seed=0)
    prompts = sharded_loader(PromptDataset(train, tok), 2, PromptCollator(tok.pad_id), seed=0)
    model = tiny_model(tok, digits=1)
    optimizer = configure_optimizer(model, lr=1e-2, weight_decay=0.1)
    trainer = GRPOTrainer(model=model, optimizer=optimizer, train_loader=prompts, device="cpu",
                          num_samples_per_prompt=4, reward_fn=correctness_reward, tokenizer=tok,
                          beta=0.1, ref_model=copy.deepcopy(model), num_iterations=2,
                          max_completion_length=max_answer_tokens(1), generation_seed=0,
                          max_steps=4, progress=False, parallelism=parallelism)
    return trainer, trainer.train()


def weights(trainer):
    """The whole final weights (on rank 0; {} elsewhere under FSDP)."""
    if trainer.fsdp:
        return fsdp.full_state_dict(trainer.raw_model)
    return {k: v.detach().clone() for k, v in trainer.raw_model.state_dict().items()}


def uneven_generation():
    """Inside fsdp.gathered, rank 0 generates 1 token and rank 1 generates 4, then both train a
    step: without it, rank 1's second forward would wait forever for rank 0's all-gather."""
    trainer, _ = sft("fsdp")
    tok, model = CharTokenizer(), trainer.raw_model
    ids, mask = left_pad([tok.encode("1+2=")], tok.pad_id)
    with fsdp.gathered(model):
        out = model.generate(ids, mask, max_new_tokens=1 + 3 * trainer.dist.rank)
    trainer.max_steps += 1
    trainer.train()  # one more step, whose all-gathers and reduce-scatters must pair up
    return list(out.shape)


def worker(out):
    """Every two-process run; rank 0 saves what the tests compare."""
    torch.set_num_threads(1)
    rank = torchrun_env().rank
    results = {}
    for parallelism in ("ddp", "fsdp"):
        for name, run in (("sft", sft), ("dpo", dpo), ("grpo", grpo)):
            args = (os.path.join(out, f"sft_{parallelism}"),) if name == "sft" else ()
            trainer, history = run(parallelism, *args)
            results[f"{name}_{parallelism}"] = {"history": history, "weights": weights(trainer)}
    model = trainer.raw_model  # GRPO's, under FSDP: how much of it this rank holds
    results["parameters"] = model.num_parameters()
    results["shard"] = [None] * 2
    dist.all_gather_object(results["shard"], sum(p.to_local().numel() for p in model.parameters()))
    # a killed run: the step-6 checkpoint lost; the resumed run redoes steps 4-6
    straight, resumed = (os.path.join(out, name) for name in ("sft_fsdp", "sft_fsdp_resumed"))
    if rank == 0:
        shutil.copytree(straight, resumed)
        shutil.rmtree(os.path.join(resumed, "checkpoints", "step_000006"))
    barrier()
    trainer, history = sft("fsdp", resumed, resume=True)
    results["sft_fsdp_resumed"] = {"history": history, "weights": weights(trainer)}
    results["uneven_generation"] = [None] * 2
    dist.all_gather_object(results["uneven_generation"], uneven_generation())
    if rank == 0:
        torch.save(results, os.path.join(out, "results.pt"))
    teardown()


# --- the tests --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """Every two-process run, in one torchrun launch."""
    out = str(tmp_path_factory.mktemp("fsdp_two"))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT,
               TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node=2", os.path.abspath(__file__), "--out", out],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return out, torch.load(os.path.join(out, "results.pt"), weights_only=False)


@pytest.fixture
def group():
    """In-process FSDP runs make a 1-rank process group; end it after the test."""
    yield
    teardown(barrier=False)


def train_records(history):
    return [r for r in history if "split" not in r]


def assert_close(a, b, keys, rtol=1e-5, atol=0.0):
    ra, rb = train_records(a["history"]), train_records(b["history"])
    assert [r["step"] for r in ra] == [r["step"] for r in rb] and ra
    for key in keys:
        torch.testing.assert_close(torch.tensor([r[key] for r in ra]),
                                   torch.tensor([r[key] for r in rb]), rtol=rtol, atol=atol,
                                   msg=key)
    assert a["weights"].keys() == b["weights"].keys()
    for name, w in b["weights"].items():
        assert (a["weights"][name] - w).norm() <= rtol * w.norm(), name


def test_sft_under_fsdp_trains_as_under_ddp(two):
    _, results = two
    fsdp_run, ddp_run = results["sft_fsdp"], results["sft_ddp"]
    assert_close(fsdp_run, ddp_run, ("loss", "grad_norm", "mean_token_accuracy"))
    evals = [[r for r in run["history"] if r.get("split") == "eval"] for run in (fsdp_run,
                                                                                 ddp_run)]
    assert [r["accuracy"] for r in evals[0]] == [r["accuracy"] for r in evals[1]]
    torch.testing.assert_close(torch.tensor([r["loss"] for r in evals[0]]),
                               torch.tensor([r["loss"] for r in evals[1]]), rtol=1e-5, atol=0)


def test_dpo_under_fsdp_trains_as_under_ddp(two):
    _, results = two
    assert_close(results["dpo_fsdp"], results["dpo_ddp"],
                 ("loss", "grad_norm", "rewards/margins", "nll_loss"))


def test_grpo_under_fsdp_samples_and_trains_as_under_ddp(two):
    """The same completions (so the same rewards) from the same per-rank streams; the loss at
    ratio 1 is minus the mean advantage, 0 up to rounding: hence the atol."""
    _, results = two
    a, b = (train_records(results[name]["history"]) for name in ("grpo_fsdp", "grpo_ddp"))
    assert [r["reward"] for r in a] == [r["reward"] for r in b]
    assert [r["completions/mean_length"] for r in a] == [r["completions/mean_length"] for r in b]
    assert_close(results["grpo_fsdp"], results["grpo_ddp"], ("loss", "grad_norm", "kl"),
                 atol=1e-6)


def test_each_rank_holds_half_of_the_weights(two):
    out, results = two
    assert sum(results["shard"]) == results["parameters"]
    assert all(0.45 <= n / results["parameters"] <= 0.55 for n in results["shard"])
    path = os.path.join(out, "sft_fsdp", "checkpoints", "step_000006")
    assert sorted(os.listdir(path)) == [".metadata", "__0_0.distcp", "__1_0.distcp",
                                        "sha256.json", "trainer.pt"]


def test_a_resumed_sharded_run_is_bitwise_the_straight_one(two):
    _, results = two
    straight = train_records(results["sft_fsdp"]["history"])
    resumed = train_records(results["sft_fsdp_resumed"]["history"])
    assert [r["step"] for r in resumed] == [4, 5, 6]
    assert resumed == straight[3:]
    a, b = results["sft_fsdp"]["weights"], results["sft_fsdp_resumed"]["weights"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ranks_may_generate_different_numbers_of_tokens(two):
    _, results = two
    assert results["uneven_generation"] == [[1, 1], [1, 4]]


def test_a_two_process_checkpoint_resumes_in_one_process(two, tmp_path, group):
    """2 processes x 8 -> 1 process x 16: the position is a global sample count, and DCP
    reshards the model and AdamW state; steps 4-6 as the two-process run, to rounding."""
    out, results = two
    folder = str(tmp_path / "run")
    shutil.copytree(os.path.join(out, "sft_fsdp"), folder)
    shutil.rmtree(os.path.join(folder, "checkpoints", "step_000006"))
    trainer, history = sft("fsdp", folder, batch_size=16, resume=True)
    assert [r["step"] for r in train_records(history)] == [4, 5, 6]
    two_processes = {"history": [r for r in results["sft_fsdp"]["history"] if r["step"] > 3],
                     "weights": results["sft_fsdp"]["weights"]}
    assert_close({"history": history, "weights": weights(trainer)}, two_processes,
                 ("loss", "grad_norm"))


def test_one_process_is_a_one_rank_fsdp_run(group, monkeypatch):
    """No torchrun: a 1-rank group of its own. Close to the plain model (not bitwise: FSDP's
    gathered weights are other tensors). Activation checkpointing runs each block's training
    forward twice, the second time in backward, and changes no bit."""
    plain, plain_history = sft("ddp")
    sharded, history = sft("fsdp")
    assert dist.get_world_size() == 1
    assert isinstance(sharded.raw_model, torch.distributed.fsdp.FSDPModule)
    assert_close({"history": history, "weights": weights(sharded)},
                 {"history": plain_history, "weights": weights(plain)}, ("loss", "grad_norm"))
    training_forwards, apply = [], fsdp.activation_checkpoint

    def spy(block):
        block.attn.register_forward_hook(
            lambda *_: training_forwards.append(torch.is_grad_enabled()))  # eval runs no_grad
        return apply(block)
    monkeypatch.setattr(fsdp, "activation_checkpoint", spy)
    _, recomputed = sft("fsdp", activation_checkpointing=True)
    assert sum(training_forwards) == 2 * 2 * STEPS  # 2 blocks, each twice a step
    assert recomputed == history


def test_a_damaged_shard_falls_back_to_the_previous_checkpoint(tmp_path, group):
    out = str(tmp_path / "run")
    _, history = sft("fsdp", out)
    shard = os.path.join(out, "checkpoints", "step_000006", "__0_0.distcp")
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 2)
    with pytest.warns(UserWarning, match=r"skipping checkpoint .*step_000006: the checksum of "
                                         r"__0_0.distcp does not match"):
        _, redone = sft("fsdp", out, resume=True)
    assert train_records(redone) == train_records(history)[3:]


def test_a_ddp_checkpoint_is_a_clear_error_under_fsdp(tmp_path, group):
    out = str(tmp_path / "run")
    sft("ddp", out)
    with pytest.raises(ValueError, match=r"step_000006 holds state.pt, a checkpoint of a DDP run"
                                         r".*parallelism='ddp'"):
        sft("fsdp", out, resume=True)


@pytest.mark.parametrize("options, message", [
    ({"parallelism": "zero3"}, "parallelism must be 'ddp' .* or 'fsdp'"),
    ({"parallelism": "ddp", "activation_checkpointing": True}, "options of parallelism='fsdp'"),
    ({"parallelism": "fsdp", "mixed_precision": "bf16", "amp_dtype": "bf16"},
     "mixed_precision='bf16' replaces autocast"),
    ({"parallelism": "fsdp", "mixed_precision": "fp8"}, "mixed_precision must be 'bf16'"),
])
def test_bad_parallelism_options_are_clear_errors(options, message):
    model = TinyGPT(GPTConfig())
    with pytest.raises(ValueError, match=message):
        SFTTrainer(model=model, optimizer=configure_optimizer(model), device="cpu",
                   train_loader=[{"input_ids": torch.zeros(1, 4, dtype=torch.long),
                                  "labels": torch.zeros(1, 4, dtype=torch.long)}], **options)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    worker(p.parse_args().out)

"""The reference trainers train a Hugging Face causal LM as it is: a tiny GPT-2 built from a
config (random weights; HF_HUB_OFFLINE=1, so nothing can be downloaded), through SFT, DPO
against a deep-copied reference, and online GRPO, whose samples come from the project's
sampler (`reference.rollout.sample`: any model whose forward returns logits or `.logits`)."""
import copy
import math
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: a download would fail loudly

import pytest  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

from conftest import read_jsonl  # noqa: E402
from reference import DPOTrainer, GRPOTrainer, SFTTrainer, configure_optimizer  # noqa: E402
from reference.data import (CharTokenizer, PreferenceCollator, PreferenceDataset, SFTCollator,  # noqa: E402
                            SFTDataset, make_addition_splits)
from reference.data import PromptCollator, PromptDataset  # noqa: E402

TOK = CharTokenizer()
TRAIN, _ = make_addition_splits(1, 20, seed=0)  # one-digit sums: 80 train problems, prompts of 4 tokens


def gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=TOK.vocab_size, n_positions=16, n_embd=32, n_layer=2, n_head=2,
                     bos_token_id=TOK.eos_id, eos_token_id=TOK.eos_id, pad_token_id=TOK.pad_id,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg)


def optimizer(model, lr):
    return configure_optimizer(model=model, optimizer_type="adamw", lr=lr, weight_decay=0.0)


def test_sft_trains_a_gpt2_and_its_loss_is_hugging_faces(tmp_path):
    model = gpt2()
    data = SFTDataset(TRAIN, TOK)
    batches = [SFTCollator(TOK.pad_id)([data[(16 * i + j) % len(data)] for j in range(16)]) for i in range(40)]
    with torch.no_grad():  # GPT-2's own loss: the same shift, -100 ignored, mean over target tokens
        hf_loss = model(batches[0]["input_ids"], attention_mask=batches[0]["attention_mask"],
                        labels=batches[0]["labels"]).loss.item()
    SFTTrainer(model=model, optimizer=optimizer(model, 3e-3), train_loader=batches, val_loader=None, device="cpu",
               max_epochs=1, grad_accum_steps=2, use_amp=False, out_dir=str(tmp_path), progress=False).train()
    records = read_jsonl(os.path.join(tmp_path, "metrics.jsonl"))
    assert len(records) == 20  # 40 batches, 2 per step
    assert records[-1]["loss"] < 0.7 * records[0]["loss"], (records[0]["loss"], records[-1]["loss"])
    # one step on one batch: the trainer's loss is GPT-2's own
    model = gpt2()
    SFTTrainer(model=model, optimizer=optimizer(model, 3e-3), train_loader=batches[:1], val_loader=None,
               device="cpu", max_epochs=1, use_amp=False, out_dir=str(tmp_path / "one"), progress=False).train()
    assert read_jsonl(os.path.join(tmp_path, "one", "metrics.jsonl"))[0]["loss"] == pytest.approx(hf_loss, rel=1e-5)


def test_dpo_trains_a_gpt2_against_a_deep_copied_reference(tmp_path):
    model = gpt2()
    pairs = PreferenceDataset(TRAIN, TOK, seed=0)
    loader = DataLoader(pairs, batch_size=16, shuffle=True, collate_fn=PreferenceCollator(TOK.pad_id),
                        generator=torch.Generator().manual_seed(0))
    DPOTrainer(model=model, ref_model=copy.deepcopy(model), optimizer=optimizer(model, 3e-3), train_loader=loader,
               val_loader=None, beta=0.1, device="cpu", max_epochs=4, pad_token_id=TOK.pad_id,
               out_dir=str(tmp_path), progress=False).train()
    records = read_jsonl(os.path.join(tmp_path, "metrics.jsonl"))
    assert len(records) == 20  # 80 pairs / 16, 4 epochs
    assert math.isclose(records[0]["loss"], math.log(2), rel_tol=1e-5)  # policy == reference at step 1
    assert records[0]["rewards/margins"] == 0.0
    assert records[-1]["rewards/margins"] > 0.1 and records[-1]["loss"] < records[0]["loss"]


def starts_with_one(prompts, completions, **batch):
    """A reward a random model can learn in a few steps: the completion's first character is '1'."""
    return [float(c.startswith("1")) for c in completions]


def grpo_run(out, seed):
    model = gpt2()
    loader = DataLoader(PromptDataset(TRAIN, TOK), batch_size=8, shuffle=True, collate_fn=PromptCollator(TOK.pad_id),
                        generator=torch.Generator().manual_seed(0))
    GRPOTrainer(model=model, optimizer=optimizer(model, 1e-2), train_loader=loader, num_samples_per_prompt=4,
                clip_eps=0.2, device="cpu", max_epochs=3, reward_fn=starts_with_one, tokenizer=TOK,
                max_completion_length=3, generation_seed=seed, out_dir=str(out), progress=False).train()
    return read_jsonl(os.path.join(out, "metrics.jsonl"))


def test_grpo_trains_a_gpt2_online_with_the_project_sampler(tmp_path):
    records = grpo_run(tmp_path / "a", seed=0)
    assert len(records) == 30 and all(r["tokens"] == 32 for r in records)  # 8 prompts x 4 samples per step
    assert all(math.isfinite(v) for r in records for v in r.values())
    assert all(1 <= r["completions/mean_length"] <= 3 for r in records)
    first, last = (sum(r["reward"] for r in part) / 5 for part in (records[:5], records[-5:]))
    assert last > first + 0.3, (first, last)
    # the samples are drawn from the trainer's own seeded generator: the same seed, the same run
    again = grpo_run(tmp_path / "b", seed=0)
    assert [r["reward"] for r in again] == [r["reward"] for r in records]
    assert [r["reward"] for r in grpo_run(tmp_path / "c", seed=1)] != [r["reward"] for r in records]

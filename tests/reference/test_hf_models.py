"""The reference trainers train Hugging Face causal LMs as they are: tiny GPT-2-, Llama- and
Qwen2-style models built from configs (random weights; HF_HUB_OFFLINE=1, so nothing can be
downloaded), on prompts of mixed lengths.

Left-padded prompts are the hard case. GPT-2 learns one embedding per absolute position, so a
prompt placed after k padding tokens is a different input unless positions come from the
attention mask (`reference.logprobs.positions_from_mask`); Llama and Qwen2 rotate by relative
position and are nearly immune. The padding-invariance tests fail for GPT-2 without that rule."""
import copy
import math
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: a download would fail loudly

import pytest  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,  # noqa: E402
                          Qwen2Config, Qwen2ForCausalLM)

from conftest import read_jsonl  # noqa: E402
from reference import DPOTrainer, GRPOTrainer, SFTTrainer, configure_optimizer  # noqa: E402
from reference.data import (CharTokenizer, PreferenceCollator, PreferenceDataset,  # noqa: E402
                            PromptCollator, PromptDataset, SFTCollator, SFTDataset, left_pad,
                            make_addition_splits)
from reference.logprobs import forward_logits, logits_of, per_token_logps, takes  # noqa: E402
from reference.model import GPTConfig, TinyGPT  # noqa: E402
from reference.rollout import sample, sampler_for  # noqa: E402

TOK = CharTokenizer()
ARCHS = ["gpt2", "llama", "qwen2"]


@pytest.fixture(autouse=True)
def one_thread():
    """Models this small gain nothing from a second thread, and lose much when other processes
    share the cores; the session's thread count is restored for the tests that follow."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build(arch, seed=0, context=32, init=0.02):
    """A tiny random model of `arch` whose vocabulary is the character tokenizer's. `init` is
    the weights' standard deviation: at the default 0.02 a random model of this size says
    nearly the same thing whatever its input; at 0.2 its completions depend on their context
    and positions, as a trained model's do."""
    torch.manual_seed(seed)
    ids = dict(bos_token_id=TOK.eos_id, eos_token_id=TOK.eos_id, pad_token_id=TOK.pad_id,
               initializer_range=init)
    if arch == "gpt2":
        return GPT2LMHeadModel(GPT2Config(
            vocab_size=TOK.vocab_size, n_positions=context, n_embd=32, n_layer=2, n_head=2,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids))
    cfg = dict(vocab_size=TOK.vocab_size, hidden_size=32, intermediate_size=64,
               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=context, **ids)
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**cfg))
    return Qwen2ForCausalLM(Qwen2Config(**cfg))


def mixed_problems():
    """Sums of 1, 2 and 3 digits, shuffled together: prompts of 4, 6 and 8 tokens."""
    problems = []
    for digits in (1, 2, 3):
        train, _ = make_addition_splits(digits, 20, n_train=80, seed=digits)
        problems += train
    order = torch.randperm(len(problems), generator=torch.Generator().manual_seed(0)).tolist()
    return [problems[i] for i in order]


MIXED = mixed_problems()


def optimizer(model, lr):
    return configure_optimizer(model=model, optimizer_type="adamw", lr=lr, weight_decay=0.0)


def prompts_of_mixed_lengths(seed=0):
    """A 3-token prompt and batch-mates up to 3x longer, as random token ids (no padding id)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, TOK.vocab_size, (n,), generator=g).tolist() for n in (3, 9, 6)]


SEEDS = range(4)  # four random models of each architecture


# --- padding invariance -----------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_completion_log_probs_do_not_depend_on_left_padding(arch):
    for seed in SEEDS:
        model = build(arch, seed, init=0.2).eval()
        prompts = prompts_of_mixed_lengths(seed)
        completions = torch.randint(2, TOK.vocab_size, (3, 5),
                                    generator=torch.Generator().manual_seed(seed))
        ids, mask = left_pad(prompts, TOK.pad_id)  # a rollout: left-padded prompt | completion
        batch_ids = torch.cat([ids, completions], dim=1)
        batch_mask = torch.cat([mask, torch.ones_like(completions)], dim=1)
        alone_ids = torch.cat([torch.tensor([prompts[0]]), completions[:1]], dim=1)
        with torch.no_grad():
            batched = per_token_logps(forward_logits(model, batch_ids, batch_mask), batch_ids)
            alone = per_token_logps(forward_logits(model, alone_ids, torch.ones_like(alone_ids)),
                                    alone_ids)
            # the model left to number tokens from the padded row's start
            shifted = per_token_logps(logits_of(model(batch_ids, attention_mask=batch_mask)),
                                      batch_ids)
        L = completions.shape[1]
        assert (batched[0, -L:] - alone[0, -L:]).abs().max() <= 1e-5, seed
        if arch == "gpt2":  # learned absolute positions: the padding really shifts the prompt
            assert (shifted[0, -L:] - alone[0, -L:]).abs().max() > 1e-3, seed


class Wrapper(torch.nn.Module):
    """Wraps a model as DDP does: `.module`, and a forward that passes everything on."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def test_positions_reach_a_model_inside_a_wrapper():
    model = build("gpt2", init=0.2).eval()
    ids, mask = left_pad(prompts_of_mixed_lengths(), TOK.pad_id)
    assert takes(Wrapper(model), "position_ids") and not takes(TinyGPT(GPTConfig()), "position_ids")
    with torch.no_grad():
        assert torch.equal(forward_logits(Wrapper(model), ids, mask),
                           forward_logits(model, ids, mask))


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_samples_do_not_depend_on_left_padding_and_the_cache_changes_nothing(arch):
    greedy = dict(max_new_tokens=12, do_sample=False, pad_token_id=TOK.pad_id)
    for seed in SEEDS:
        model = build(arch, seed, init=0.2).eval()
        prompts = prompts_of_mixed_lengths(seed)
        ids, mask = left_pad(prompts, TOK.pad_id)
        batched = sample(model, ids, mask, **greedy)
        assert batched.shape == (3, 12)
        for row, prompt in enumerate(prompts):
            alone = sample(model, torch.tensor([prompt]), None, **greedy)
            assert torch.equal(alone[0], batched[row]), (seed, row, alone[0], batched[row])
        assert torch.equal(sample(model, ids, mask, use_cache=False, **greedy), batched), seed


@pytest.mark.parametrize("arch", ARCHS)
def test_seeded_sampling_with_the_cache_repeats_and_ends_rows_like_tinygpt(arch):
    model = build(arch).eval()
    ids, mask = left_pad(prompts_of_mixed_lengths(), TOK.pad_id)
    ids, mask = ids.repeat(4, 1), mask.repeat(4, 1)

    def draw(seed, use_cache=True):
        return sample(model, ids, mask, max_new_tokens=10, temperature=1.5, eos_token_id=TOK.eos_id,
                      pad_token_id=TOK.pad_id, generator=torch.Generator().manual_seed(seed),
                      use_cache=use_cache)

    first = draw(0)
    assert torch.equal(draw(0), first) and not torch.equal(draw(1), first)
    assert torch.equal(draw(0, use_cache=False), first)  # the same draws, the same logits
    for row in first.tolist():  # TinyGPT's rule: after a row's first end token, only padding
        if TOK.eos_id in row:
            assert set(row[row.index(TOK.eos_id) + 1:]) <= {TOK.pad_id}, row


def test_sample_keeps_tinygpt_generate_contract_and_the_sampler_is_chosen_by_capability():
    torch.manual_seed(0)
    tiny = TinyGPT(GPTConfig(vocab_size=TOK.vocab_size, block_size=32)).eval()
    ids, mask = left_pad(prompts_of_mixed_lengths(), TOK.pad_id)
    kwargs = dict(max_new_tokens=10, eos_token_id=TOK.eos_id, pad_token_id=TOK.pad_id)
    assert torch.equal(sample(tiny, ids, mask, do_sample=False, **kwargs),
                       tiny.generate(ids, mask, do_sample=False, **kwargs))
    seeded = [f(ids, mask, do_sample=True, generator=torch.Generator().manual_seed(3), **kwargs)
              for f in (tiny.generate, lambda *a, **k: sample(tiny, *a, **k))]
    assert torch.equal(*seeded)
    # a generate() with TinyGPT's contract is used as it is; Hugging Face's is not
    assert sampler_for(tiny) == tiny.generate
    assert sampler_for(build("llama")).func is sample


# --- training on prompts of mixed lengths -----------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_sft_trains_on_mixed_lengths_and_its_loss_is_hugging_faces(tmp_path, arch):
    model = build(arch)
    data = SFTDataset(MIXED, TOK)
    collate = SFTCollator(TOK.pad_id)
    batches = [collate([data[(16 * i + j) % len(data)] for j in range(16)]) for i in range(20)]
    assert len({int(b["attention_mask"].sum(1).min()) for b in batches}) > 1  # lengths differ
    with torch.no_grad():  # the model's own loss: the same shift, -100 ignored, mean over targets
        hf_loss = model(batches[0]["input_ids"], attention_mask=batches[0]["attention_mask"],
                        labels=batches[0]["labels"]).loss.item()
    SFTTrainer(model=model, optimizer=optimizer(model, 1e-2), train_loader=batches,
               val_loader=None, device="cpu", max_epochs=1, use_amp=False, out_dir=str(tmp_path),
               progress=False).train()
    records = read_jsonl(os.path.join(tmp_path, "metrics.jsonl"))
    assert len(records) == 20
    assert records[0]["loss"] == pytest.approx(hf_loss, rel=1e-5)
    assert records[-1]["loss"] < 0.8 * records[0]["loss"], (records[0]["loss"], records[-1]["loss"])


@pytest.mark.parametrize("arch", ARCHS)
def test_dpo_trains_on_mixed_lengths_against_a_deep_copied_reference(tmp_path, arch):
    model = build(arch)
    pairs = PreferenceDataset(MIXED[:64], TOK, seed=0)
    loader = DataLoader(pairs, batch_size=16, shuffle=True,
                        collate_fn=PreferenceCollator(TOK.pad_id),
                        generator=torch.Generator().manual_seed(0))
    DPOTrainer(model=model, ref_model=copy.deepcopy(model), optimizer=optimizer(model, 3e-3),
               train_loader=loader, val_loader=None, beta=0.1, device="cpu", max_epochs=4,
               pad_token_id=TOK.pad_id, out_dir=str(tmp_path), progress=False).train()
    records = read_jsonl(os.path.join(tmp_path, "metrics.jsonl"))
    assert len(records) == 16  # 64 pairs / 16, 4 epochs
    assert math.isclose(records[0]["loss"], math.log(2), rel_tol=1e-5)  # policy == reference
    assert records[0]["rewards/margins"] == 0.0
    last = records[-4:]
    assert sum(r["rewards/margins"] for r in last) / 4 > 0.05, [r["rewards/margins"] for r in last]
    assert sum(r["loss"] for r in last) / 4 < math.log(2) - 0.02, [r["loss"] for r in last]


def starts_with_one(prompts, completions, **batch):
    """A reward a random model can learn in a few steps: the completion's first character is '1'."""
    return [float(c.startswith("1")) for c in completions]


def grpo_trainer(model, out, seed, steps=12, **kwargs):
    loader = DataLoader(PromptDataset(MIXED, TOK), batch_size=8, shuffle=True,
                        collate_fn=PromptCollator(TOK.pad_id),
                        generator=torch.Generator().manual_seed(0))
    return GRPOTrainer(model=model, optimizer=optimizer(model, 1e-2), train_loader=loader,
                       num_samples_per_prompt=4, clip_eps=0.2, device="cpu", max_steps=steps,
                       reward_fn=starts_with_one, tokenizer=TOK, max_completion_length=3,
                       generation_seed=seed, out_dir=out and str(out), progress=False,
                       **kwargs)


def grpo_run(arch, out, seed, steps=12):
    grpo_trainer(build(arch), out, seed, steps).train()
    return read_jsonl(os.path.join(out, "metrics.jsonl"))


@pytest.mark.parametrize("arch", ARCHS)
def test_grpo_trains_online_on_mixed_lengths_seeded_and_reproducible(tmp_path, arch):
    records = grpo_run(arch, tmp_path / "a", seed=0)
    assert len(records) == 12
    assert all(math.isfinite(v) for r in records for v in r.values() if isinstance(v, float))
    first, last = (sum(r["reward"] for r in part) / 4 for part in (records[:4], records[-4:]))
    assert last > first + 0.3, (first, last)
    # the samples are drawn from the trainer's own seeded generator: the same seed, the same run
    # (its first steps: the learning rate is constant, so a shorter run is the same run's start)
    again = grpo_run(arch, tmp_path / "b", seed=0, steps=4)
    for key in ("reward", "loss", "grad_norm"):
        assert [r[key] for r in again] == [r[key] for r in records[:4]], key
    other = grpo_run(arch, tmp_path / "c", seed=1, steps=4)
    assert [r["reward"] for r in other] != [r["reward"] for r in records[:4]]


def test_right_padded_prompts_are_refused_with_the_fix():
    model = build("qwen2")
    ids, mask = left_pad(prompts_of_mixed_lengths(), TOK.pad_id)
    trainer = grpo_trainer(model, None, seed=0)
    batch = {"prompt_input_ids": ids.flip(1), "prompt_attention_mask": mask.flip(1)}
    with pytest.raises(ValueError, match="padding_side = 'left'"):
        trainer.roll_out([batch])


def test_grpo_resumes_a_hugging_face_model_exactly(tmp_path):
    """6 straight steps == 3 steps, a checkpoint, and 3 resumed steps: the weights, the
    optimizer and the sampling stream come back, so the resumed run samples the same tokens."""
    straight_model = build("llama")
    straight = grpo_trainer(straight_model, tmp_path / "straight", seed=0, steps=6).train()
    grpo_trainer(build("llama"), tmp_path / "run", seed=0, steps=3, save_every=3).train()
    resumed_model = build("llama", seed=1)
    resumed = grpo_trainer(resumed_model, tmp_path / "run", seed=0, steps=6,
                           resume_from="latest").train()
    assert [r["step"] for r in resumed] == [4, 5, 6]
    for key in ("reward", "loss", "grad_norm"):
        assert [r[key] for r in resumed] == [r[key] for r in straight[3:]], key
    assert all(torch.equal(v, resumed_model.state_dict()[k])
               for k, v in straight_model.state_dict().items())

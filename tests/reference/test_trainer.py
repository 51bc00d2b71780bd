"""The Trainer's loop: token normalization over micro-batches, clipping, the GradScaler, AMP
choice."""
import pytest
import torch

from reference import SFTTrainer, configure_optimizer
from reference.data import CharTokenizer, Problem, SFTCollator, SFTDataset
from reference.model import GPTConfig, TinyGPT
from reference.runtime import resolve_amp_dtype
from reference.sft import sft_loss_sum


def grads_of(model, loss):
    model.zero_grad()
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def test_token_normalization_matches_full_batch_and_mean_of_means_does_not():
    """Micro-batches with unequal target-token counts: dividing each by the step's total count
    gives the full-batch gradient; averaging per-micro-batch means does not."""
    torch.manual_seed(0)
    tok = CharTokenizer()
    model = TinyGPT(GPTConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_embd=32))
    collate = SFTCollator(tok.pad_id)
    short = collate([SFTDataset([Problem(1, 2, 2)], tok)[0]] * 3)  # 2 targets per row
    long = collate([SFTDataset([Problem(99, 98, 2)], tok)[0]])     # 4 targets
    full = collate([SFTDataset([Problem(1, 2, 2)], tok)[0]] * 3
                   + [SFTDataset([Problem(99, 98, 2)], tok)[0]])

    def loss_sum(b):
        return sft_loss_sum(model(b["input_ids"]), b["labels"])

    s_full, n_full = loss_sum(full)
    g_full = grads_of(model, s_full / n_full)
    (s1, n1), (s2, n2) = loss_sum(short), loss_sum(long)
    assert n1.item() != n2.item()
    g_right = grads_of(model, s1 / (n1 + n2) + s2 / (n1 + n2))
    (s1, n1), (s2, n2) = loss_sum(short), loss_sum(long)
    g_mean_of_means = grads_of(model, (s1 / n1 + s2 / n2) / 2)
    torch.testing.assert_close(g_right, g_full, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(g_mean_of_means, g_full, rtol=1e-3, atol=1e-6)


def make_trainer(**kw):
    torch.manual_seed(0)
    tok = CharTokenizer()
    model = TinyGPT(GPTConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_embd=32))
    ds = SFTDataset([Problem(a, b, 2) for a, b in [(1, 2), (34, 56), (78, 9), (12, 88)]], tok)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=SFTCollator(tok.pad_id))
    opt = configure_optimizer(model=model, optimizer_type="adamw", lr=1e-2, weight_decay=0.0)
    args = dict(model=model, optimizer=opt, train_loader=loader, val_loader=None, device="cpu",
                max_epochs=1, grad_accum_steps=1, use_amp=False, progress=False)
    args.update(kw)
    return SFTTrainer(**args)


def test_clipping_bounds_the_norm_and_logs_the_pre_clip_norm():
    trainer = make_trainer(max_grad_norm=1e-3, max_steps=2)
    seen = []
    step = trainer.optimizer.step

    def checked_step(*a, **k):  # the gradients the optimizer actually uses
        seen.append(torch.nn.utils.get_total_norm(
            [p.grad for p in trainer.raw_model.parameters()]).item())
        return step(*a, **k)

    trainer.optimizer.step = checked_step
    history = trainer.train()
    assert len(seen) == 2
    assert all(n <= 1e-3 * (1 + 1e-5) for n in seen)
    # logged before clipping: far above the limit
    assert all(r["grad_norm"] > 1e-2 for r in history)


def test_grad_scaler_skips_an_overflowing_step_and_lowers_the_scale():
    """fp16 autocast with a GradScaler (on CPU too, with torch 2.13): a loss scale so large that
    the scaled gradients overflow makes the scaler skip the step and halve its scale."""
    trainer = make_trainer(amp_dtype="fp16", max_steps=1)
    assert trainer.scaler.is_enabled()
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 127)
    before = {k: v.clone() for k, v in trainer.raw_model.state_dict().items()}
    history = trainer.train()
    after = trainer.raw_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing moved
    assert history[0]["skipped_steps"] == 1
    assert trainer.scaler.get_scale() == 2.0 ** 126


def test_grad_scaler_steps_normally_with_a_sane_scale():
    trainer = make_trainer(amp_dtype="fp16", max_steps=2)
    before = trainer.raw_model.lm_head.weight.clone()
    history = trainer.train()
    assert history[-1]["skipped_steps"] == 0
    assert not torch.equal(before, trainer.raw_model.lm_head.weight)


def test_reference_rejects_bad_accumulation_and_clipping():
    with pytest.raises(ValueError, match="grad_accum_steps must be >= 1"):
        make_trainer(grad_accum_steps=0)
    with pytest.raises(ValueError, match="max_grad_norm must be > 0"):
        make_trainer(max_grad_norm=-1.0)


def test_use_amp_picks_bf16_on_cpu():
    assert resolve_amp_dtype(torch.device("cpu"), use_amp=True) == torch.bfloat16
    assert resolve_amp_dtype(torch.device("cpu"), use_amp=False) is None


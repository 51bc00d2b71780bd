"""The SFT loss, the optimizer groups, the schedule, and bad input."""
import math

import pytest
import torch
import torch.nn.functional as F

from reference import SFTTrainer, configure_optimizer
from reference.data import CharTokenizer, Problem, SFTCollator, SFTDataset
from reference.model import GPTConfig, TinyGPT
from reference.optimizer import warmup_cosine
from reference.sft import sft_loss_sum


def test_masked_loss_equals_hand_computation():
    # one sequence of 4 positions, vocabulary 3; only positions 2 and 3 are targets
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0], [9.0, 9.0, 9.0]]])
    labels = torch.tensor([[-100, -100, 1, 2]])
    loss_sum, n = sft_loss_sum(logits, labels)
    # position 1 predicts label[2]=1 from logits [0,1,0]; position 2, label[3]=2 from [0,0,3]
    expected = (-(1 - math.log(2 + math.e))) + (-(3 - math.log(2 + math.exp(3))))
    assert n.item() == 2
    assert loss_sum.item() == pytest.approx(expected, rel=1e-6)


def test_uniform_logits_give_log_vocab():
    logits = torch.zeros(2, 5, 14)
    labels = torch.randint(0, 14, (2, 5))
    loss_sum, n = sft_loss_sum(logits, labels)
    assert (loss_sum / n).item() == pytest.approx(math.log(14), rel=1e-6)


def test_padding_does_not_change_the_loss():
    torch.manual_seed(0)
    model = TinyGPT(GPTConfig(vocab_size=14, block_size=16, n_layer=1, n_embd=32)).eval()
    tok = CharTokenizer()
    items = [SFTDataset([Problem(3, 4, 2), Problem(56, 78, 2)], tok)[i] for i in range(2)]
    batch = SFTCollator(tok.pad_id)(items)
    padded = {k: F.pad(v, (0, 5), value=-100 if k == "labels" else 0) for k, v in batch.items()}
    with torch.no_grad():
        a = sft_loss_sum(model(batch["input_ids"], batch["attention_mask"]), batch["labels"])
        b = sft_loss_sum(model(padded["input_ids"], padded["attention_mask"]), padded["labels"])
    assert a[1].item() == b[1].item()
    assert a[0].item() == pytest.approx(b[0].item(), rel=1e-6)


def test_optimizer_groups_decay_matrices_only():
    model = TinyGPT(GPTConfig(vocab_size=14, block_size=16, n_layer=2, n_embd=32))
    opt = configure_optimizer(model=model, optimizer_type="adamw", lr=1e-3, weight_decay=0.1)
    decay, no_decay = opt.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = sorted(names[id(p)] for p in decay["params"])
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(n.endswith("weight") and "ln" not in n and n not in ("wte.weight", "wpe.weight")
               for n in decayed)
    assert "lm_head.weight" in decayed and "blocks.0.attn.qkv.weight" in decayed
    not_decayed = {names[id(p)] for p in no_decay["params"]}
    assert {"wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias",
            "blocks.0.attn.proj.bias"} <= not_decayed
    assert len(decayed) + len(not_decayed) == len(list(model.parameters()))
    assert isinstance(opt, torch.optim.AdamW)


def test_unknown_optimizer_type_is_a_clear_error():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="unknown optimizer_type 'lion'.*adamw"):
        configure_optimizer(model=model, optimizer_type="lion", lr=1e-3, weight_decay=0.0)
    sgd = configure_optimizer(model=model, optimizer_type="sgd", lr=0.1, weight_decay=0.0)
    assert isinstance(sgd, torch.optim.SGD)


def test_schedule_warms_up_linearly_then_decays_by_cosine():
    lrs = [warmup_cosine(s, warmup_steps=10, total_steps=110, min_ratio=0.1) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(b > a for a, b in zip(lrs[:10], lrs[1:10]))          # rising during warmup
    assert all(b <= a for a, b in zip(lrs[10:], lrs[11:]))          # never rising after
    assert lrs[60] == pytest.approx(0.1 + 0.9 * 0.5)                 # half-way: cosine's midpoint
    assert warmup_cosine(110, 10, 110, 0.1) == pytest.approx(0.1)    # ends at min_ratio
    assert warmup_cosine(500, 10, 110, 0.1) == pytest.approx(0.1)    # and stays there


def make_trainer(batches=None, dataset=None, **kw):
    torch.manual_seed(0)
    tok = CharTokenizer()
    model = TinyGPT(GPTConfig(vocab_size=14, block_size=16, n_layer=1, n_embd=32))
    if batches is None:
        problems = [Problem(1, 2, 1), Problem(3, 4, 1), Problem(5, 6, 1), Problem(7, 8, 1)]
        ds = dataset if dataset is not None else SFTDataset(problems, tok)
        batches = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=SFTCollator(tok.pad_id))
    opt = configure_optimizer(model=model, optimizer_type="adamw", lr=1e-3, weight_decay=0.0)
    args = dict(model=model, optimizer=opt, train_loader=batches, val_loader=None, device="cpu",
                max_epochs=1, grad_accum_steps=1, use_amp=False)
    args.update(kw)
    return SFTTrainer(**args)


def test_sft_trainer_public_signature_trains():
    trainer = make_trainer(max_epochs=2)
    history = trainer.train()
    assert [r["step"] for r in history] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) and r["tokens"] > 0 for r in history)


def test_batch_missing_labels_is_a_clear_error():
    ids = torch.randint(2, 14, (2, 6))
    trainer = make_trainer(batches=[{"input_ids": ids}])
    with pytest.raises(ValueError, match="missing 'labels'"):
        trainer.train()


def test_labels_all_ignored_is_a_clear_error():
    ids = torch.randint(2, 14, (2, 6))
    trainer = make_trainer(batches=[{"input_ids": ids, "labels": torch.full_like(ids, -100)}])
    with pytest.raises(ValueError, match="no target tokens"):
        trainer.train()


def test_sequence_longer_than_context_is_a_clear_error():
    ids = torch.randint(2, 14, (2, 20))
    trainer = make_trainer(batches=[{"input_ids": ids, "labels": ids}])
    with pytest.raises(ValueError, match="block_size is 16"):
        trainer.train()


def test_empty_dataset_is_a_clear_error():
    with pytest.raises(ValueError, match="empty list of problems"):
        SFTDataset([], CharTokenizer())
    with pytest.raises(ValueError, match="train_loader yields no batches"):
        make_trainer(batches=[])


def test_zero_epochs_without_max_steps_is_a_clear_error():
    with pytest.raises(ValueError, match="max_epochs must be >= 1"):
        make_trainer(max_epochs=0)
    assert make_trainer(max_epochs=0, max_steps=3).max_steps == 3


def test_cuda_without_cuda_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="CUDA is not available"):
        make_trainer(device="cuda")


def test_nan_loss_stops_with_the_step():
    trainer = make_trainer(max_steps=3)
    with torch.no_grad():
        trainer.raw_model.lm_head.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="at step 1"):
        trainer.train()

"""The bench: tokenizer, data splits, collator, TinyGPT and its generate()."""

import pytest
import torch

from reference.data import (CharTokenizer, Problem, SFTCollator, SFTDataset, exact_match, left_pad,
                            make_addition_splits)
from reference.model import GPTConfig, TinyGPT


def test_tokenizer_round_trip_and_unknown_character():
    tok = CharTokenizer()
    assert tok.decode(tok.encode("12+34=46")) == "12+34=46"
    assert tok.decode(tok.encode("46") + [tok.eos_id] + tok.encode("99")) == "46"
    with pytest.raises(ValueError, match="'x'"):
        tok.encode("1x")


@pytest.mark.parametrize("digits", [1, 2, 3])
def test_train_and_eval_splits_are_disjoint(digits):
    train, held = make_addition_splits(digits, n_eval=50, n_train=500 if digits == 3 else None,
                                       seed=3)
    assert len(held) == 50 and len(set(held)) == 50
    assert set(train).isdisjoint(held)
    assert len(set(train)) == len(train)
    assert all(0 <= p.a < 10 ** digits and 0 <= p.b < 10 ** digits and p.digits == digits
               for p in train + held)
    if digits < 3:
        assert len(train) + len(held) == 10 ** (2 * digits)  # every problem is in exactly one split


def test_splits_depend_on_seed_only():
    assert make_addition_splits(2, 100, seed=1) == make_addition_splits(2, 100, seed=1)
    assert make_addition_splits(2, 100, seed=1)[1] != make_addition_splits(2, 100, seed=2)[1]


def test_collator_right_pads_and_masks_prompt_and_padding():
    tok = CharTokenizer()
    ds = SFTDataset([Problem(1, 2, 2), Problem(62, 54, 2)], tok)
    batch = SFTCollator(tok.pad_id)([ds[0], ds[1]])
    # "01+02=" "3" <eos> is 8 tokens; "62+54=" "116" <eos> is 10
    assert batch["input_ids"].shape == (2, 10)
    assert batch["attention_mask"].tolist() == [[1] * 8 + [0] * 2, [1] * 10]
    assert batch["input_ids"][0].tolist() == tok.encode("01+02=3") + [tok.eos_id] + [tok.pad_id] * 2
    assert batch["labels"][0].tolist() == [-100] * 6 + tok.encode("3") + [tok.eos_id] + [-100] * 2
    assert batch["labels"][1].tolist() == [-100] * 6 + tok.encode("116") + [tok.eos_id]


def test_prompt_and_answer_format():
    assert Problem(12, 34, 2).prompt == "12+34=" and Problem(12, 34, 2).answer == "46"
    assert Problem(7, 5, 2).prompt == "07+05=" and Problem(7, 5, 2).answer == "12"
    assert Problem(99, 99, 2).answer == "198" and Problem(3, 4, 3).prompt == "003+004="


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=14, block_size=16, n_layer=2, n_head=2, n_embd=32)
    cfg.update(kw)
    return TinyGPT(GPTConfig(**cfg)).eval()


def test_forward_shape_and_context_limit():
    model = tiny_model()
    assert model(torch.zeros(3, 16, dtype=torch.long)).shape == (3, 16, 14)
    with pytest.raises(ValueError, match="block_size is 16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_attention_mask_does_not_change_right_padded_logits():
    model = tiny_model()
    ids = torch.randint(2, 14, (2, 10))
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0
    with torch.no_grad():
        plain, masked = model(ids), model(ids, attention_mask=mask)
    torch.testing.assert_close(plain[0, :7], masked[0, :7], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(plain[1], masked[1], rtol=1e-5, atol=1e-5)


def test_generate_with_left_padding_matches_unpadded():
    """A left-padded prompt continues exactly as the same prompt alone: the mask hides the
    padding and positions start at the first real token."""
    model = tiny_model()
    short, long = [5, 6, 12, 7, 13], [5, 6, 7, 12, 8, 9, 13]
    ids, mask = left_pad([short, long], pad_id=0)
    batched = model.generate(ids, mask, max_new_tokens=6)
    alone = model.generate(torch.tensor([short]), max_new_tokens=6)
    no_mask = model.generate(torch.tensor([long]), max_new_tokens=6)
    assert batched[0].tolist() == alone[0].tolist()
    assert batched[1].tolist() == no_mask[0].tolist()


def test_generate_kv_cache_matches_recomputation():
    model = tiny_model()
    ids, mask = left_pad([[5, 6, 12, 7, 13], [5, 6, 7, 12, 8, 9, 13]], pad_id=0)
    cached = model.generate(ids, mask, max_new_tokens=8, use_cache=True)
    full = model.generate(ids, mask, max_new_tokens=8, use_cache=False)
    assert cached.tolist() == full.tolist()


def test_generate_stops_rows_at_eos_and_pads_after():
    model = tiny_model()
    with torch.no_grad():  # make token 1 (eos) the argmax everywhere
        model.lm_head.weight.zero_()
        model.lm_head.weight[1].fill_(1.0)
        model.ln_f.bias.fill_(1.0)
    out = model.generate(torch.tensor([[5, 6]]), max_new_tokens=4, eos_token_id=1, pad_token_id=0)
    assert out.tolist() == [[1, 0, 0, 0]]


def test_sampling_is_seeded_and_top_k_limits_tokens():
    model = tiny_model()
    ids = torch.tensor([[5, 6, 12]] * 8)
    a = model.generate(ids, max_new_tokens=6, do_sample=True,
                       generator=torch.Generator().manual_seed(1))
    b = model.generate(ids, max_new_tokens=6, do_sample=True,
                       generator=torch.Generator().manual_seed(1))
    assert a.tolist() == b.tolist()
    top1 = model.generate(ids, max_new_tokens=6, do_sample=True, top_k=1,
                          generator=torch.Generator().manual_seed(2))
    # top-1 sampling is greedy
    assert top1.tolist() == model.generate(ids, max_new_tokens=6).tolist()


def test_generate_rejects_prompts_that_do_not_fit():
    with pytest.raises(ValueError, match="exceeds block_size"):
        tiny_model().generate(torch.zeros(1, 12, dtype=torch.long), max_new_tokens=5)


def test_exact_match_counts_right_answers():
    tok = CharTokenizer()

    class Oracle(torch.nn.Module):
        """Generates the right answer for every prompt except those whose answer is even."""
        training = False

        def eval(self):
            return self

        def train(self, mode=True):
            return self

        def generate(self, ids, mask, max_new_tokens, eos_token_id, pad_token_id):
            rows = []
            for row in ids.tolist():
                text = tok.decode([t for t in row if t != pad_token_id])
                a, b = map(int, text[:-1].split("+"))
                ans = str(a + b) if (a + b) % 2 else str(a + b + 1)
                toks = tok.encode(ans) + [eos_token_id]
                rows.append(toks + [pad_token_id] * (max_new_tokens - len(toks)))
            return torch.tensor(rows)

    # sums 3, 4, 15, 42
    problems = [Problem(1, 2, 2), Problem(2, 2, 2), Problem(10, 5, 2), Problem(40, 2, 2)]
    assert exact_match(Oracle(), problems, tok) == 0.5

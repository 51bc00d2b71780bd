"""The DPO math (loss, rewards, sequence log-probs, concatenated forward) and the preference
data."""
import math
import random
import warnings

import pytest
import torch
import torch.nn.functional as F

from reference.data import (CharTokenizer, PreferenceCollator, PreferenceDataset, Problem,
                            rejected_answer)
from reference.dpo import check_dpo_batch, concat_pairs, dpo_loss, dpo_metrics, preference_accuracy
from reference.logprobs import sequence_logps
from reference.model import GPTConfig, TinyGPT

TOK = CharTokenizer()


def logps_for(delta):
    """(policy_chosen, policy_rejected, ref_chosen, ref_rejected) whose DPO logits are `delta`."""
    delta = torch.as_tensor(delta, dtype=torch.float32)
    zeros = torch.zeros_like(delta)
    return delta, zeros, zeros, zeros


def sigmoid_loss(x, eps=0.0):
    """-(1-eps) log sigmoid(x) - eps log sigmoid(-x), in plain floats."""
    return -(1 - eps) * math.log(1 / (1 + math.exp(-x))) - eps * math.log(1 / (1 + math.exp(x)))


# --- dpo_loss ------------------------------------------------------------------------------

def test_loss_is_ln2_when_policy_equals_reference():
    torch.manual_seed(0)
    chosen, rejected = -10 * torch.rand(5), -10 * torch.rand(5)
    losses, chosen_rewards, rejected_rewards = dpo_loss(chosen, rejected, chosen.clone(),
                                                        rejected.clone())
    assert torch.allclose(losses, torch.full((5,), math.log(2)))
    assert torch.equal(chosen_rewards, torch.zeros(5)) and \
           torch.equal(rejected_rewards, torch.zeros(5))


@pytest.mark.parametrize("beta", [0.05, 0.1, 0.5, 2.0])
def test_sigmoid_loss_difference_is_minus_beta_delta(beta):
    # -log sigmoid(x) + log sigmoid(-x) = -x: the loss is log(1 + e^-x), not symmetric in x
    delta = torch.tensor([-7.0, -1.0, -0.25, 0.0, 0.3, 2.0, 12.0])
    plus, _, _ = dpo_loss(*logps_for(delta), beta=beta)
    minus, _, _ = dpo_loss(*logps_for(-delta), beta=beta)
    assert torch.allclose(plus - minus, -beta * delta, atol=1e-6)


def test_loss_uses_all_four_logps_with_the_papers_signs():
    # policy prefers chosen by 3 nats, the reference by 1: logits = 3 - 1 = 2
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        torch.tensor([-2.0]), torch.tensor([-5.0]), torch.tensor([-4.0]), torch.tensor([-5.0]),
        beta=0.5)
    assert losses.item() == pytest.approx(sigmoid_loss(0.5 * 2))
    assert chosen_rewards.item() == pytest.approx(0.5 * (-2 + 4))
    assert rejected_rewards.item() == pytest.approx(0.0)


def test_swapping_chosen_and_rejected_swaps_rewards_and_flips_margins():
    torch.manual_seed(1)
    pc, pr, rc, rr = (-10 * torch.rand(6) for _ in range(4))
    _, c, r = dpo_loss(pc, pr, rc, rr, beta=0.2)
    _, c_swapped, r_swapped = dpo_loss(pr, pc, rr, rc, beta=0.2)
    assert torch.equal(c_swapped, r) and torch.equal(r_swapped, c)
    m, m_swapped = dpo_metrics(c, r, pc, pr), dpo_metrics(c_swapped, r_swapped, pr, pc)
    assert m["rewards/margins"][0].item() == pytest.approx(-m_swapped["rewards/margins"][0].item())
    assert m["rewards/chosen"][0].item() == pytest.approx(m_swapped["rewards/rejected"][0].item())
    # no ties in random data: every pair is won on exactly one side
    assert m["rewards/accuracies"][0].item() + m_swapped["rewards/accuracies"][0].item() == 6


def test_metrics_are_sums_with_the_pair_count():
    chosen_rewards, rejected_rewards = torch.tensor([0.3, -0.1, 0.2]), torch.tensor([0.1, 0.4, 0.2])
    m = dpo_metrics(chosen_rewards, rejected_rewards, torch.tensor([-1.0, -2.0, -3.0]),
                    torch.tensor([-4.0, -5.0, -6.0]))
    assert sorted(m) == sorted(["rewards/chosen", "rewards/rejected", "rewards/accuracies",
                                "rewards/margins", "logps/chosen", "logps/rejected"])
    assert all(n == 3 for _, n in m.values())
    assert m["rewards/chosen"][0].item() == pytest.approx(0.4)
    assert m["rewards/accuracies"][0].item() == 1.0      # the tie (0.2 vs 0.2) is not a win
    assert m["rewards/margins"][0].item() == pytest.approx(-0.3)
    assert m["logps/rejected"][0].item() == pytest.approx(-15.0)


@pytest.mark.parametrize("loss_type,label_smoothing", [("sigmoid", 0.0), ("sigmoid", 0.2),
                                                       ("ipo", 0.0), ("hinge", 0.0)])
def test_loss_and_gradient_are_finite_at_extreme_margins(loss_type, label_smoothing):
    policy_chosen = torch.tensor([1e4, -1e4], requires_grad=True)
    zeros = torch.zeros(2)
    ones = torch.ones(2, dtype=torch.long)
    losses, _, _ = dpo_loss(policy_chosen, zeros, zeros, zeros, beta=1.0, loss_type=loss_type,
                            label_smoothing=label_smoothing, chosen_tokens=ones,
                            rejected_tokens=ones)
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(policy_chosen.grad).all()
    if loss_type == "sigmoid" and label_smoothing == 0:
        assert losses.tolist() == pytest.approx([0.0, 1e4])


@pytest.mark.parametrize("eps", [0.1, 0.25, 0.45])
def test_cdpo_matches_its_formula(eps):
    delta = [-3.0, -0.5, 0.0, 1.5, 4.0]
    losses, _, _ = dpo_loss(*logps_for(delta), beta=0.5, label_smoothing=eps)
    assert losses.tolist() == pytest.approx([sigmoid_loss(0.5 * d, eps) for d in delta], rel=1e-5)


def test_hinge_matches_its_formula():
    # logits = (-1 - -3) - (-2 - -2) = 2 for the first pair, (-1 - -21) - 0 = 20 for the second
    pc, pr = torch.tensor([-1.0, -1.0]), torch.tensor([-3.0, -21.0])
    rc, rr = torch.tensor([-2.0, -2.0]), torch.tensor([-2.0, -2.0])
    hinge, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="hinge")
    assert hinge.tolist() == pytest.approx([1 - 0.1 * 2, 0.0])


def test_ipo_averages_each_side_over_its_tokens():
    """IPO as its authors and TRL define it: each side's log-ratio is a per-token mean, so
    completions of unequal length (here 2 and 5 tokens) weigh the same. The old summed form,
    ((-1 - -3) - (-2 - -5) - 5)^2 = 36 for the first pair, fails this."""
    pc, pr = torch.tensor([-1.0, -4.0]), torch.tensor([-3.0, -10.0])
    rc, rr = torch.tensor([-2.0, -2.0]), torch.tensor([-5.0, -5.0])
    nc, nr = torch.tensor([2, 4]), torch.tensor([5, 1])
    ipo, chosen_rewards, _ = dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="ipo",
                                      chosen_tokens=nc, rejected_tokens=nr)
    logits = (pc / nc - pr / nr) - (rc / nc - rr / nr)
    assert ipo.tolist() == pytest.approx(((logits - 1 / (2 * 0.1)) ** 2).tolist())
    assert ipo[0].item() == pytest.approx((0.5 - 0.4 - 5) ** 2)  # by hand: 24.01, not 36
    assert chosen_rewards.tolist() == pytest.approx((0.1 * (pc - rc) / nc).tolist())
    with pytest.raises(ValueError, match="pass chosen_tokens and rejected_tokens"):
        dpo_loss(pc, pr, rc, rr, loss_type="ipo")


@pytest.mark.parametrize("beta", [0.0, -0.1])
def test_nonpositive_beta_is_a_clear_error(beta):
    with pytest.raises(ValueError, match=r"beta must be > 0.*beta=" + str(beta)):
        dpo_loss(*logps_for([1.0]), beta=beta)


def test_unknown_loss_type_and_bad_label_smoothing_are_clear_errors():
    with pytest.raises(ValueError, match="unknown loss_type 'kto'.*sigmoid, ipo, hinge"):
        dpo_loss(*logps_for([1.0]), loss_type="kto")
    for eps in (-0.1, 0.5, 0.9):
        with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 0.5\)"):
            dpo_loss(*logps_for([1.0]), label_smoothing=eps)


# --- sequence_logps ------------------------------------------------------------------------

def test_sequence_logps_by_hand():
    # vocabulary 3; positions 2 and 3 are the completion, predicted by positions 1 and 2
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0], [9.0, 9.0, 9.0]]])
    labels = torch.tensor([[-100, -100, 1, 2]])
    expected = (1 - math.log(2 + math.e)) + (3 - math.log(2 + math.exp(3)))
    assert sequence_logps(logits, labels).item() == pytest.approx(expected, rel=1e-6)


def test_sequence_logps_counts_only_completion_tokens():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 5)
    labels = torch.tensor([[-100, -100, -100, 1, 4, 2], [-100, -100, -100, 3, 0, 0]])
    base = sequence_logps(logits, labels)
    assert base.shape == (2,)
    prompt_changed = logits.clone()
    prompt_changed[:, :2] = torch.randn(2, 2, 5)   # positions 0 and 1 predict prompt tokens 1 and 2
    prompt_changed[:, 5] = torch.randn(2, 5)       # the last position predicts nothing
    assert torch.equal(sequence_logps(prompt_changed, labels), base)
    completion_changed = logits.clone()
    # position 2 predicts the first completion token
    completion_changed[:, 2] += 3 * torch.randn(2, 5)
    assert not torch.isclose(sequence_logps(completion_changed, labels), base).any()


def test_right_padding_does_not_change_sequence_logps():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 5)
    labels = torch.tensor([[-100, -100, -100, 1, 4, 2], [-100, -100, -100, 3, 0, -100]])
    padded_logits = torch.cat([logits, torch.randn(2, 4, 5)], dim=1)
    # a -inf log-prob under a masked label must not leak a NaN
    padded_logits[:, 6:, 0] = float("-inf")
    padded_labels = F.pad(labels, (0, 4), value=-100)
    assert torch.allclose(sequence_logps(padded_logits, padded_labels),
                          sequence_logps(logits, labels))


# --- concat_pairs and check_dpo_batch ------------------------------------------------------

def pair_batch(problems, rejected):
    """A collated batch whose rejected answers are given by hand."""
    ds = PreferenceDataset(problems, TOK)
    ds.rejected = list(rejected)
    return PreferenceCollator(TOK.pad_id)([ds[i] for i in range(len(ds))])


def test_one_concatenated_forward_matches_two_separate_forwards():
    torch.manual_seed(0)
    model = TinyGPT(GPTConfig(vocab_size=TOK.vocab_size, block_size=16, n_layer=1,
                              n_embd=32)).eval()
    # chosen wider than rejected
    batch = pair_batch([Problem(55, 55, 2), Problem(3, 4, 2)], ["1", "12"])
    assert batch["chosen_input_ids"].shape[1] == 10 and batch["rejected_input_ids"].shape[1] == 9
    ids, labels, mask = concat_pairs(batch, TOK.pad_id)
    assert ids.shape == labels.shape == mask.shape == (4, 10)
    assert torch.equal(ids[:2], batch["chosen_input_ids"])                 # chosen first
    assert torch.equal(ids[2:, :9], batch["rejected_input_ids"])
    assert (ids[2:, 9] == TOK.pad_id).all() and (labels[2:, 9] == -100).all() and \
           (mask[2:, 9] == 0).all()
    with torch.no_grad():
        joint = sequence_logps(model(ids, attention_mask=mask), labels)
        chosen = sequence_logps(model(batch["chosen_input_ids"], batch["chosen_attention_mask"]),
                                batch["chosen_labels"])
        rejected = sequence_logps(model(batch["rejected_input_ids"],
                                        batch["rejected_attention_mask"]),
                                  batch["rejected_labels"])
    assert torch.allclose(joint[:2], chosen, rtol=1e-5) and \
           torch.allclose(joint[2:], rejected, rtol=1e-5)


def test_check_dpo_batch_names_a_missing_or_misshapen_key():
    batch = pair_batch([Problem(12, 34, 2), Problem(5, 6, 2)], ["47", "12"])
    assert check_dpo_batch(batch) == 2
    missing = {k: v for k, v in batch.items() if k != "rejected_labels"}
    with pytest.raises(ValueError, match="missing 'rejected_labels'"):
        check_dpo_batch(missing)
    misshapen = dict(batch, chosen_labels=batch["chosen_labels"][:, :-1])
    with pytest.raises(ValueError, match="'chosen_labels' has shape"):
        check_dpo_batch(misshapen)


def test_check_dpo_batch_rejects_a_completion_with_no_tokens():
    batch = pair_batch([Problem(12, 34, 2), Problem(5, 6, 2)], ["47", "12"])
    batch["rejected_labels"][1] = -100
    with pytest.raises(ValueError,
                       match="row 1 of 'rejected_labels' is a completion with no tokens"):
        check_dpo_batch(batch)


def test_check_dpo_batch_warns_with_the_count_of_identical_pairs():
    problems = [Problem(12, 34, 2), Problem(5, 6, 2), Problem(9, 9, 2)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a normal batch warns about nothing
        check_dpo_batch(pair_batch(problems, ["47", "12", "17"]))
    with pytest.warns(UserWarning, match="2 of 3 DPO pairs have identical chosen and rejected"):
        assert check_dpo_batch(pair_batch(problems, ["46", "12", "18"])) == 3


# --- preference data -----------------------------------------------------------------------

def test_rejected_answer_is_always_wrong_and_plausible():
    rng, kinds = random.Random(0), set()
    problems = [Problem(rng.randrange(100), rng.randrange(100), 2) for _ in range(200)] + \
               [Problem(0, 0, 2)]
    for p in problems:
        wrong = rejected_answer(p, rng)
        assert wrong != p.answer and wrong.isdigit(), (p, wrong)
        assert wrong == "0" or not wrong.startswith("0"), (p, wrong)
        assert abs(len(wrong) - len(p.answer)) <= 1, (p, wrong)
        kinds.add("same length" if len(wrong) == len(p.answer) else "carry dropped")
    assert kinds == {"same length", "carry dropped"}  # both kinds of mistake occur


def test_rejected_answer_is_deterministic():
    problems = [Problem(a, b, 2) for a, b in [(56, 78), (9, 1), (99, 99), (10, 20)]] * 10
    rng_a, rng_b = random.Random(3), random.Random(3)
    assert [rejected_answer(p, rng_a) for p in problems] == \
           [rejected_answer(p, rng_b) for p in problems]
    seed0 = PreferenceDataset(problems, TOK, seed=0)
    assert seed0.rejected == PreferenceDataset(problems, TOK, seed=0).rejected
    assert seed0.rejected != PreferenceDataset(problems, TOK, seed=1).rejected
    assert seed0[5] == seed0[5]  # drawn once, at construction, not on every access


def test_preference_dataset_labels_only_the_completions():
    ds = PreferenceDataset([Problem(56, 78, 2)], TOK)
    item = ds[0]
    for side, answer in (("chosen", "134"), ("rejected", ds.rejected[0])):
        ids, labels = item[f"{side}_input_ids"], item[f"{side}_labels"]
        assert ids[:6] == TOK.encode("56+78=") and labels[:6] == [-100] * 6
        assert labels[6:] == ids[6:] and ids[-1] == TOK.eos_id
        assert TOK.decode(ids[6:]) == answer
    assert ds.rejected[0] != "134"
    with pytest.raises(ValueError, match="empty list of problems"):
        PreferenceDataset([], TOK)


def test_preference_collator_pads_each_half():
    batch = pair_batch([Problem(55, 55, 2), Problem(3, 4, 2)], ["1", "12"])
    assert sorted(batch) == sorted(f"{side}_{key}" for side in ("chosen", "rejected")
                                   for key in ("input_ids", "labels", "attention_mask"))
    assert batch["chosen_input_ids"].shape == (2, 10) and \
           batch["rejected_input_ids"].shape == (2, 9)
    assert batch["chosen_attention_mask"].sum(1).tolist() == [10, 8]   # "110"+eos and "7"+eos
    assert batch["rejected_attention_mask"].sum(1).tolist() == [8, 9]  # "1"+eos and "12"+eos
    assert batch["chosen_labels"][1, 8:].tolist() == [-100, -100]
    assert batch["chosen_input_ids"][1, 8:].tolist() == [TOK.pad_id] * 2


class PrefersOne(torch.nn.Module):
    """Gives the character '1' a higher logit than every other token, at every position."""

    def __init__(self):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(TOK.vocab_size))
        with torch.no_grad():
            self.bias[TOK.stoi["1"]] = 2.0

    def forward(self, input_ids, attention_mask=None):
        return self.bias.expand(*input_ids.shape, -1)


def test_preference_accuracy_on_a_model_that_prefers_ones():
    problems = [Problem(5, 6, 2), Problem(10, 12, 2), Problem(0, 1, 2), Problem(1, 2, 2)]
    # "11" vs "12": chosen has more ones (win); "22" vs "21": fewer (loss); "1" vs "2": win;
    # "3" vs "4": a tie, which is not a win
    ds = PreferenceDataset(problems, TOK)
    ds.rejected = ["12", "21", "2", "4"]
    # two batches, so the fraction must be counted over both
    loader = torch.utils.data.DataLoader(ds, batch_size=3,
                                         collate_fn=PreferenceCollator(TOK.pad_id))
    model = PrefersOne().train()
    assert preference_accuracy(model, loader) == pytest.approx(2 / 4)
    assert model.training

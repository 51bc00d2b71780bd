"""GRPO's math on hand-built tensors: advantages, the clipped loss, its normalizations, KL,
rewards."""
import math

import pytest
import torch
import torch.nn.functional as F

from reference.grpo import LOSS_TYPES, group_advantages, grpo_loss, grpo_loss_count, k3_kl
from reference.logprobs import per_token_logps
from reference.rewards import check_rewards, correctness_reward, format_reward


def random_batch(B=4, L=5, seed=0):
    """logps (a leaf that requires grad), old/ref logps near it, a right-padded mask."""
    g = torch.Generator().manual_seed(seed)
    logps = (-torch.rand(B, L, generator=g) * 3).requires_grad_()
    old = logps.detach() + 0.3 * torch.randn(B, L, generator=g)
    ref = logps.detach() + 0.3 * torch.randn(B, L, generator=g)
    lengths = torch.tensor([L, 2, 4, 1, 3, 5, 2, 4][:B])
    mask = torch.arange(L) < lengths[:, None]
    return logps, old, ref, mask


# --- advantages -------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages_sum_to_zero_in_each_group(scale):
    rewards = torch.tensor([0.0, 1.0, 1.0, 0.5, 2.0, -1.0, 3.0, 0.0, 0.2, 0.2, 0.9, 0.1])
    A = group_advantages(rewards, group_size=4, scale=scale)
    assert A.shape == rewards.shape
    assert torch.allclose(A.view(3, 4).sum(dim=1), torch.zeros(3), atol=1e-5)
    assert (A != 0).any()


def test_group_scaled_advantages_ignore_reward_offset_and_scale():
    rewards = torch.tensor([0.0, 1.0, 3.0, 2.0, 5.0, -1.0, 4.0, 0.0])  # std >> eps in each group
    A = group_advantages(rewards, group_size=4, scale="group")
    A2 = group_advantages(3.0 * rewards - 5.0, group_size=4, scale="group")
    assert torch.allclose(A, A2, atol=1e-3)
    # group std is torch's unbiased one, as in TRL: group 0 = [0,1,3,2], mean 1.5, std sqrt(5/3)
    assert A[2].item() == pytest.approx(1.5 / (math.sqrt(5 / 3) + 1e-4), rel=1e-6)


def test_batch_and_none_scales():
    rewards = torch.tensor([0.0, 1.0, 3.0, 2.0, 5.0, -1.0, 4.0, 0.0])
    centered = rewards - rewards.view(2, 4).mean(1).repeat_interleave(4)
    assert torch.equal(group_advantages(rewards, 4, scale="none"), centered)
    expected = centered / (rewards.std() + 1e-4)
    assert torch.allclose(group_advantages(rewards, 4, scale="batch"), expected, rtol=1e-6)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_all_equal_group_has_exactly_zero_advantage_and_gradient(scale):
    # 0.9 three times: float32's mean(0.9, 0.9, 0.9) != 0.9, so the naive r - mean is 6e-8,
    # /eps = 6e-4
    rewards = torch.tensor([0.9, 0.9, 0.9, 0.0, 1.0, 0.0])
    A = group_advantages(rewards, group_size=3, scale=scale)
    assert torch.equal(A[:3], torch.zeros(3))
    assert (A[3:] != 0).all()
    logps, _, _, _ = random_batch(B=6, L=4)
    noise = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))
    # ratio != 1 but inside the clip range, so every token has a gradient
    old = logps.detach() + 0.01 * noise
    mask = torch.ones(6, 4, dtype=torch.bool)
    loss, _ = mean_loss(logps, old, None, A, mask, beta=0.0)
    loss.backward()
    assert torch.equal(logps.grad[:3], torch.zeros(3, 4))
    assert (logps.grad[3:] != 0).all()


def test_group_advantages_rejects_bad_input():
    with pytest.raises(ValueError, match="divisible"):
        group_advantages(torch.zeros(5), group_size=2)
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.zeros(4), group_size=1)
    with pytest.raises(ValueError, match="scale"):
        group_advantages(torch.zeros(4), group_size=2, scale="std")


# --- KL -----------------------------------------------------------------------------------------
def test_k3_is_nonnegative_and_zero_with_zero_gradient_at_equality():
    g = torch.Generator().manual_seed(0)
    logps = -torch.rand(10_000, generator=g) * 10
    # tiny to large gaps
    ref = logps + torch.randn(10_000, generator=g) * torch.logspace(-8, 1, 10_000)
    assert (k3_kl(logps, ref) >= 0).all()
    x = logps.clone().requires_grad_()
    kl = k3_kl(x, x.detach())
    assert torch.equal(kl, torch.zeros_like(kl))
    kl.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    # and it is exp(d) - d - 1 with d = ref - logp
    assert k3_kl(torch.tensor(0.0), torch.tensor(1.0)).item() == pytest.approx(math.e - 2, rel=1e-6)


def mean_loss(logps, old, ref, A, mask, **kw):
    """grpo_loss as a batch mean (loss_sum / grpo_loss_count), its metrics as means."""
    loss_sum, metrics = grpo_loss(logps, old, ref, A, mask, **kw)
    count = grpo_loss_count(mask, kw.get("loss_type", "grpo"), kw.get("max_completion_length"))
    return loss_sum / count, {k: s / n for k, (s, n) in metrics.items()}


# --- ratio and clipping -----------------------------------------------------------------------
def test_on_policy_ratio_is_one_and_nothing_is_clipped():
    logps, _, _, mask = random_batch()
    A = torch.tensor([1.0, -2.0, 0.5, -0.5])
    loss, metrics = mean_loss(logps, logps.detach(), None, A, mask, loss_type="dapo")
    assert all(metrics[k].item() == 0 for k in ("clip_ratio/low_mean", "clip_ratio/high_mean",
                                               "clip_ratio/region_mean"))
    loss.backward()
    # ratio == 1 exactly, so the loss is -mean(A) over tokens and d loss / d logp = -A / n_tokens
    n = mask.sum()
    assert loss.item() == pytest.approx(-(A[:, None] * mask).sum().item() / n.item(), rel=1e-6)
    expected = torch.where(mask, -A[:, None] / n, torch.zeros(()))
    assert torch.allclose(logps.grad, expected, rtol=1e-6, atol=0)
    # old_logps is a constant: passing the live logps must not cancel the gradient
    logps.grad = None
    mean_loss(logps, logps, None, A, mask, loss_type="dapo")[0].backward()
    assert torch.allclose(logps.grad, expected, rtol=1e-6, atol=0)


def clip_case():
    """Row 0 has A > 0, row 1 has A < 0; the ratios straddle [0.8, 1.2]; row 1's last token is
    padding."""
    ratios = torch.tensor([[1.5, 0.5, 1.0, 1.1],    # A>0: 1.5 is clipped high; 0.5 is not
                                                    # (min keeps 0.5*A)
                           [0.5, 1.5, 0.9, 7.0]])   # A<0: 0.5 is clipped low; 1.5 is not;
                                                    # 7.0 is masked
    old = torch.tensor([[-1.0, -2.0, -0.5, -3.0], [-1.5, -2.5, -0.7, -1.0]])
    logps = (old + ratios.log()).requires_grad_()
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    return logps, old, torch.tensor([1.0, -1.0]), mask


def test_clipped_tokens_get_zero_gradient_and_are_counted():
    logps, old, A, mask = clip_case()
    loss, metrics = mean_loss(logps, old, None, A, mask, clip_eps=0.2, loss_type="dapo")
    loss.backward()
    clipped = torch.tensor([[1, 0, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(logps.grad[clipped | (mask == 0)], torch.zeros(3))
    assert (logps.grad[~clipped & (mask == 1)] != 0).all()
    assert metrics["clip_ratio/high_mean"].item() == pytest.approx(1 / 7)
    assert metrics["clip_ratio/low_mean"].item() == pytest.approx(1 / 7)
    assert metrics["clip_ratio/region_mean"].item() == pytest.approx(2 / 7)


def test_clip_eps_high_widens_only_the_upper_bound():
    logps, old, A, mask = clip_case()
    loss, metrics = mean_loss(logps, old, None, A, mask, clip_eps=0.2, clip_eps_high=0.6,
                              loss_type="dapo")
    loss.backward()
    assert metrics["clip_ratio/high_mean"].item() == 0          # 1.5 < 1.6: no longer clipped
    assert metrics["clip_ratio/low_mean"].item() == pytest.approx(1 / 7)
    assert logps.grad[0, 0] != 0 and logps.grad[1, 0] == 0


# --- normalizations ---------------------------------------------------------------------------
def per_token_loss_by_hand(logps, old, ref, A, mask, eps=0.2, beta=0.1):
    """The per-token loss with plain Python floats, loop by loop."""
    rows = []
    for i in range(len(logps)):
        row = []
        for t in range(len(logps[i])):
            if not mask[i][t]:
                row.append(None)
                continue
            r = math.exp(logps[i][t] - old[i][t])
            objective = min(r * A[i], min(max(r, 1 - eps), 1 + eps) * A[i])
            d = ref[i][t] - logps[i][t]
            row.append(-objective + beta * (math.exp(d) - d - 1))
        rows.append(row)
    return rows


def test_each_loss_type_matches_its_formula():
    logps, old, ref, mask = random_batch(B=4, L=5)
    A = torch.tensor([1.5, -0.7, 0.3, -1.2])
    rows = per_token_loss_by_hand(logps.tolist(), old.tolist(), ref.tolist(), A.tolist(),
                                  mask.tolist())
    real = [[x for x in row if x is not None] for row in rows]
    total, n_tokens, B, max_len = sum(map(sum, real)), sum(map(len, real)), 4, 8
    expected = {"grpo": sum(sum(r) / len(r) for r in real) / B,
                "bnpo": total / n_tokens,
                "dr_grpo": total / (B * max_len),
                "dapo": total / n_tokens}
    for loss_type in LOSS_TYPES:
        loss, metrics = mean_loss(logps, old, ref, A, mask, beta=0.1, loss_type=loss_type,
                                  max_completion_length=max_len)
        assert loss.item() == pytest.approx(expected[loss_type], rel=1e-5), loss_type
    kl = [math.exp(r - p) - (r - p) - 1
          for pr, rr, mr in zip(logps.tolist(), ref.tolist(), mask.tolist())
          for p, r, m in zip(pr, rr, mr) if m]
    assert metrics["kl"].item() == pytest.approx(sum(kl) / len(kl), rel=1e-5)


def test_dapo_with_global_count_does_not_depend_on_the_micro_batch_split():
    """loss_sum over the step's token count: split into micro-batches of unequal lengths, the
    sum of their loss_sums / the same global count is the full batch's loss, and gradient."""
    logps, old, ref, mask = random_batch(B=4, L=5)
    A = torch.tensor([1.5, -0.7, 0.3, -1.2])
    n = mask.sum()
    full, _ = grpo_loss(logps, old, ref, A, mask, beta=0.05, loss_type="dapo")
    (full / n).backward()
    full_grad, logps.grad = logps.grad.clone(), None
    halves = [grpo_loss(logps[s], old[s], ref[s], A[s], mask[s], beta=0.05, loss_type="dapo")[0] / n
              for s in (slice(0, 1), slice(1, 4))]  # unequal splits: 5 tokens, then 9
    sum(halves).backward()
    assert sum(halves).item() == pytest.approx((full / n).item(), rel=1e-6)
    assert torch.allclose(logps.grad, full_grad, rtol=1e-6, atol=1e-9)
    # each half's own mean, summed, is not the full loss
    local = sum(mean_loss(logps[s], old[s], ref[s], A[s], mask[s], beta=0.05, loss_type="dapo")[0]
                for s in (slice(0, 1), slice(1, 4)))
    assert local.item() != pytest.approx((full / n).item(), rel=1e-3)


def test_grpo_and_dapo_differ_on_unequal_lengths_only():
    logps, old, ref, mask = random_batch(B=4, L=5)
    A = torch.tensor([1.5, -0.7, 0.3, -1.2])
    grpo, _ = mean_loss(logps, old, None, A, mask, loss_type="grpo")
    dapo, _ = mean_loss(logps, old, None, A, mask, loss_type="dapo")
    assert grpo.item() != pytest.approx(dapo.item(), rel=1e-3)
    full = torch.ones_like(mask)
    grpo, _ = mean_loss(logps, old, None, A, full, loss_type="grpo")
    dapo, _ = mean_loss(logps, old, None, A, full, loss_type="dapo")
    assert grpo.item() == pytest.approx(dapo.item(), rel=1e-6)


def test_masked_logits_do_not_change_the_loss_or_its_gradient():
    torch.manual_seed(0)
    B, P, L, V = 3, 4, 5, 14                     # prompt of 4 tokens, completion slots of 5
    input_ids = torch.randint(0, V, (B, P + L))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]], dtype=torch.bool)
    clean = torch.randn(B, P + L, V)
    old = per_token_logps(clean, input_ids)[:, P - 1:] + 0.2 * torch.randn(B, L)
    ref = per_token_logps(clean, input_ids)[:, P - 1:] + 0.2 * torch.randn(B, L)
    A = torch.tensor([1.0, -1.0, 0.5])

    def loss_and_grad(logits, old, ref):
        logits = logits.clone().requires_grad_()
        # logits at P-1+j predict completion token j
        logps = per_token_logps(logits, input_ids)[:, P - 1:]
        loss, _ = mean_loss(logps, old, ref, A, mask, beta=0.1, loss_type="grpo")
        loss.backward()
        return loss, logits.grad

    garbage = clean.clone()
    predicts_masked = torch.zeros(B, P + L, dtype=torch.bool)
    predicts_masked[:, P - 1:P - 1 + L] = ~mask
    garbage[predicts_masked] = 1e30 * torch.randn(int(predicts_masked.sum()), V)
    garbage[:, -1] = 1e30                          # the last position predicts nothing
    # exp() overflows there
    bad_old, bad_ref = old.masked_fill(~mask, -1e30), ref.masked_fill(~mask, 1e30)
    loss, grad = loss_and_grad(clean, old, ref)
    loss2, grad2 = loss_and_grad(garbage, bad_old, bad_ref)
    assert torch.isfinite(loss2) and torch.isfinite(grad2).all()
    assert loss2.item() == loss.item()
    assert torch.equal(grad2, grad)
    assert torch.equal(grad[predicts_masked], torch.zeros(int(predicts_masked.sum()), V))


def test_non_finite_values_on_masked_tokens_are_ignored():
    logps, old, ref, mask = random_batch()
    A = torch.tensor([1.0, -2.0, 0.5, -0.5])
    loss, _ = mean_loss(logps, old, ref, A, mask, beta=0.1)
    loss.backward()
    grad, logps.grad = logps.grad.clone(), None
    # NaN log-probs where mask is 0
    bad = logps.detach().masked_fill(~mask, math.nan).requires_grad_()
    bad_old, bad_ref = old.masked_fill(~mask, -math.inf), ref.masked_fill(~mask, math.inf)
    loss2, _ = mean_loss(bad, bad_old, bad_ref, A, mask, beta=0.1)
    loss2.backward()
    assert loss2.item() == loss.item()
    assert torch.equal(bad.grad, grad)  # zero on masked tokens, not NaN


# --- arguments --------------------------------------------------------------------------------
def test_reference_logps_needed_only_with_a_kl_penalty():
    logps, old, _, mask = random_batch()
    A = torch.ones(4)
    loss, metrics = mean_loss(logps, old, None, A, mask, beta=0.0)
    assert torch.isfinite(loss) and "kl" not in metrics
    with pytest.raises(ValueError, match="ref_logps"):
        mean_loss(logps, old, None, A, mask, beta=0.04)


def test_bad_loss_arguments_are_named():
    logps, old, _, mask = random_batch()
    A = torch.ones(4)
    with pytest.raises(ValueError, match="'grpo', 'bnpo', 'dr_grpo', 'dapo'"):
        mean_loss(logps, old, None, A, mask, loss_type="ppo")
    with pytest.raises(ValueError, match="max_completion_length"):
        mean_loss(logps, old, None, A, mask, loss_type="dr_grpo")
    with pytest.raises(ValueError, match="advantages"):
        mean_loss(logps, old, None, torch.ones(3), mask)
    with pytest.raises(ValueError, match="mask"):
        mean_loss(logps, old, None, A, mask[:, :3])


def test_per_token_logps_uses_the_temperature():
    torch.manual_seed(0)
    logits, ids = torch.randn(2, 6, 14), torch.randint(0, 14, (2, 6))
    got = per_token_logps(logits, ids, temperature=0.7)
    manual = torch.stack([torch.stack([F.log_softmax(logits[b, t] / 0.7, dim=-1)[ids[b, t + 1]]
                                       for t in range(5)]) for b in range(2)])
    assert got.shape == (2, 5) and got.dtype == torch.float32
    assert torch.allclose(got, manual, atol=1e-6)
    assert not torch.allclose(per_token_logps(logits, ids), manual, atol=1e-3)


# --- rewards ----------------------------------------------------------------------------------
def test_correctness_reward():
    prompts = ["07+05=", "07+05=", "12+34=", "99+99=", "00+00=", "00+00=", "07+05="]
    completions = ["12", "012", "46", "198", "0", "00", "13"]
    assert correctness_reward(prompts, completions) == [1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0]


def test_format_reward():
    completions = ["12", "012", "0", "00", "1+2", "", "46", "4a"]
    ended = [True, True, True, True, True, True, False, True]
    assert format_reward(["12+34="] * 8, completions, ended=ended) == [1.0, 0, 1.0, 0, 0, 0, 0, 0]
    with pytest.raises(ValueError, match="ended"):
        format_reward(["12+34="], ["46"])


def test_check_rewards_names_the_function():
    assert check_rewards([1, 0.5], 2, "correctness_reward") == [1.0, 0.5]
    with pytest.raises(ValueError, match="my_reward returned 1 rewards for 2"):
        check_rewards([1.0], 2, "my_reward")
    with pytest.raises(ValueError, match="my_reward returned nan"):
        check_rewards([1.0, float("nan")], 2, "my_reward")
    with pytest.raises(ValueError, match="inf"):
        check_rewards([float("inf"), 0.0], 2, "my_reward")

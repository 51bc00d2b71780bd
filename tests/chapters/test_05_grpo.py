"""Chapter 05 and `python -m reference 05` run the same experiment: identical numbers in both
phases, sampling included, from two implementations of the GRPO math. Plus: bad input is a
clear error, a resume in the middle of GRPO is bitwise, online GRPO trains under torchrun with
two processes, and --method dpo is chapter 04."""
import math
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, TINY, assert_identical_runs, load_chapter, read_jsonl
from reference import chapters

# 20 SFT steps (a target it never reaches), then 20 GRPO steps of 4 prompts x 8 samples, in fp32
TINY05 = TINY + ["--batch-size", "4", "--sft-steps", "20", "--sft-target", "0.99", "--max-steps",
                 "20", "--amp", "off", "--save-every", "10"]
PHASES = ("sft", "")
SUMMARY_KEYS = ("eval_accuracy", "eval_loss", "final_loss", "steps", "eval_accuracy_sft",
                "eval_accuracy_grpo", "sft_steps")
GRPO_KEYS = {"reward", "reward_std", "rewards/correctness_reward/mean",
             "rewards/correctness_reward/std", "frac_reward_zero_std", "clip_ratio/low_mean",
             "clip_ratio/high_mean", "clip_ratio/region_mean", "completions/mean_length",
             "completions/clipped_ratio", "entropy", "num_tokens", "tokens", "loss_count"}


@pytest.fixture(scope="module")
def chapter_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ch05") / "run")
    return out, load_chapter("05").main(TINY05 + ["--out", out])


def test_chapter_05_matches_reference_bitwise(chapter_run, tmp_path):
    out, ch = chapter_run
    ref = chapters.run("05", TINY05 + ["--out", str(tmp_path)])
    assert_identical_runs(out, str(tmp_path), PHASES)
    assert {k: ch[k] for k in SUMMARY_KEYS} == {k: ref[k] for k in SUMMARY_KEYS}
    grpo = read_jsonl(os.path.join(out, "metrics.jsonl"))
    assert all(GRPO_KEYS <= set(r) and "kl" not in r for r in grpo)
    # the paper's loss averages over completions; the tokens are the completions' own
    assert all(r["loss_count"] == 32 and 32 <= r["tokens"] <= 32 * 4 for r in grpo)
    assert all(r["clip_ratio/region_mean"] == 0.0 for r in grpo)  # mu = 1: the ratio is 1
    steps = [r["num_tokens"] for r in grpo]  # cumulative, prompts included
    assert all(b - a >= 32 * 7 for a, b in zip([0] + steps, steps))
    assert [r["step"] for r in read_jsonl(os.path.join(out, "metrics.jsonl"), "eval")] == [10, 20]


def test_chapter_05_kl_and_reuse_match_reference_bitwise(tmp_path):
    """beta > 0 (a frozen reference, k3 KL), num_iterations 2 (old_logps, the clip) and two
    micro-batches per step: still the same numbers, and the clip and the KL are active."""
    args = TINY05 + ["--grpo-beta", "0.05", "--num-iterations", "2", "--grpo-lr", "1e-2",
                     "--grad-accum-steps", "2"]
    load_chapter("05").main(args + ["--out", str(tmp_path / "ch")])
    chapters.run("05", args + ["--out", str(tmp_path / "ref")])
    assert_identical_runs(str(tmp_path / "ch"), str(tmp_path / "ref"), PHASES)
    grpo = read_jsonl(os.path.join(tmp_path, "ch", "metrics.jsonl"))
    assert all("kl" in r for r in grpo) and grpo[-1]["kl"] > 0
    assert max(r["clip_ratio/region_mean"] for r in grpo[1::2]) > 0  # the reuse steps clip
    assert all(r["clip_ratio/region_mean"] == 0 for r in grpo[0::2])  # fresh samples: ratio 1


def test_resume_in_the_middle_of_grpo_is_bitwise(chapter_run, tmp_path):
    """The GRPO checkpoint at step 20 is lost: --resume loads step 10 (its sampler's state
    included) and redoes steps 11-20 exactly."""
    out, _ = chapter_run
    resumed = str(tmp_path / "run")
    shutil.copytree(out, resumed)
    shutil.rmtree(os.path.join(resumed, "checkpoints", "step_000020"))
    load_chapter("05").main(TINY05 + ["--out", resumed, "--resume"])
    assert_identical_runs(out, resumed, PHASES)


@pytest.mark.parametrize("flags, message", [
    (["--num-samples-per-prompt", "1"], "--num-samples-per-prompt must be >= 2"),
    (["--temperature", "0"], "--temperature > 0"),
    (["--num-iterations", "3"], "--save-every must be a multiple of --num-iterations"),
])
def test_bad_flags_are_clear_errors(flags, message, capsys):
    with pytest.raises(SystemExit):
        load_chapter("05").get_args(flags)
    assert re.search(message, capsys.readouterr().err)


def test_prompt_longer_than_the_context_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="prompts of 6 tokens \\+ --max-completion-length 7 "
                                         "exceed the model's context of 12"):
        load_chapter("05").main(TINY05 + ["--max-completion-length", "7", "--sft-steps", "1",
                                          "--out", str(tmp_path)])


def test_online_ddp_trains_whole_groups_and_reward_rises(tmp_path):
    """Two processes, each sampling its own prompts' groups: finite metrics, every group whole
    (loss_count = the completions of both ranks), and the reward goes up."""
    out = str(tmp_path / "two")
    # one-digit sums (80 train problems), 4 prompts x 8 samples per rank and step
    args = ["--sft-steps", "60", "--sft-target", "0.99", "--max-steps", "40", "--batch-size", "4",
            "--eval-every", "40", "--eval-size", "20", "--n-embd", "32", "--n-layer", "1",
            "--amp", "off", "--seed", "0", "--device", "cpu", "--digits", "1", "--grpo-lr",
            "1e-3", "--lr", "1e-2", "--warmup-steps", "10", "--save-every", "40"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT,
               TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node=2", os.path.join(ROOT, "tutorial", "05_grpo", "train.py"),
                        *args, "--out", out], env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    grpo = read_jsonl(os.path.join(out, "metrics.jsonl"))
    assert len(grpo) == 40 and all(r["loss_count"] == 64 for r in grpo)  # 2 ranks x 32
    assert all(math.isfinite(v) for r in grpo for v in r.values())
    first, last = (sum(r["reward"] for r in part) / 10 for part in (grpo[:10], grpo[-10:]))
    assert last > first, (first, last)


def test_method_dpo_is_chapter_04(tmp_path):
    """Chapter 05 adds GRPO and changes nothing else: --method dpo is chapter 04, number for
    number."""
    args = TINY + ["--sft-steps", "20", "--sft-target", "0.99", "--max-steps", "20", "--amp",
                   "off"]
    load_chapter("05").main(args + ["--method", "dpo", "--out", str(tmp_path / "05")])
    load_chapter("04").main(args + ["--out", str(tmp_path / "04")])
    assert_identical_runs(str(tmp_path / "05"), str(tmp_path / "04"), PHASES)

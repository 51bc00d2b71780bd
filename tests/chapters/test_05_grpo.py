"""Chapter 05 and `python -m reference 05` run the same experiment: identical numbers in both
phases, sampling included. Plus: the defaults agree, bad input is a clear error, and online GRPO
trains under torchrun with two processes."""
import json
import math
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT, TINY, load_chapter, read_jsonl
from reference import chapters
from reference.compare import compare

# 20 SFT steps of 4 sequences, then 20 GRPO steps of 4 prompts x 8 samples, in fp32; checkpoints every 10 steps
TINY05 = TINY + ["--batch-size", "4", "--sft-steps", "20", "--max-steps", "20", "--amp", "off", "--save-every", "10"]
SUMMARY_KEYS = ("eval_accuracy", "eval_loss", "final_loss", "steps", "eval_accuracy_sft", "eval_accuracy_grpo",
                "sft_steps")
GRPO_KEYS = {"reward", "reward_std", "rewards/correctness_reward", "frac_reward_zero_std", "clip_ratio/low_mean",
             "clip_ratio/high_mean", "clip_ratio/region_mean", "completions/mean_length",
             "completions/clipped_ratio", "generation_fraction"}
TIMING = "generation_fraction"  # a ratio of wall-clock times: never bitwise


def records(out, phase=""):
    with open(os.path.join(out, phase, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k != TIMING} for line in f if line.strip()]


def assert_identical_runs(a, b):
    for phase, steps in (("sft", 20), ("", 20)):
        ra, rb = records(a, phase), records(b, phase)
        assert len([r for r in ra if "split" not in r]) == steps
        assert [sorted(r) for r in ra] == [sorted(r) for r in rb]  # the same keys, record by record
        diffs, notes = compare(ra, rb)
        assert diffs == [] and notes == [], (phase, diffs[:3], notes)


@pytest.fixture(scope="module")
def chapter_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ch05") / "run")
    return out, load_chapter("05").main(TINY05 + ["--out", out])


def test_chapter_05_matches_reference_bitwise(chapter_run, tmp_path):
    out, ch = chapter_run
    ref = chapters.run("05", TINY05 + ["--out", str(tmp_path)])
    assert_identical_runs(out, str(tmp_path))
    grpo = read_jsonl(os.path.join(out, "metrics.jsonl"))
    assert all(GRPO_KEYS <= set(r) and "kl" not in r for r in grpo)
    assert all(r["tokens"] == 32 for r in grpo)  # loss_type grpo averages over completions
    assert all(r[k] == 0.0 for r in grpo for k in ("clip_ratio/low_mean", "clip_ratio/high_mean"))  # mu = 1
    assert [r["step"] for r in read_jsonl(os.path.join(out, "metrics.jsonl"), split="eval")] == [10, 20]
    assert {k: ch[k] for k in SUMMARY_KEYS} == {k: ref[k] for k in SUMMARY_KEYS}
    assert "grpo_seconds" in ch and "grpo_seconds" in ref


def test_chapter_05_kl_and_reuse_match_reference_bitwise(tmp_path):
    """beta > 0 (a frozen reference, k3 KL), num_iterations 2 (old_logps, the clip), dapo, top-k and
    the format reward: still the same numbers, and the clip and KL are active."""
    args = TINY05 + ["--beta", "0.05", "--num-iterations", "2", "--loss-type", "dapo", "--top-k", "5",
                     "--format-reward-weight", "0.5", "--grpo-lr", "1e-2", "--grad-accum-steps", "2"]
    load_chapter("05").main(args + ["--out", str(tmp_path / "ch")])
    chapters.run("05", args + ["--out", str(tmp_path / "ref")])
    assert_identical_runs(str(tmp_path / "ch"), str(tmp_path / "ref"))
    grpo = read_jsonl(os.path.join(tmp_path, "ch", "metrics.jsonl"))
    assert all("kl" in r and "rewards/format_reward" in r for r in grpo)
    assert grpo[-1]["kl"] > 0 and max(r["clip_ratio/region_mean"] for r in grpo[1::2]) > 0


def test_chapter_05_defaults_match_reference_defaults():
    ch = vars(load_chapter("05").get_args([]))
    ref = vars(chapters.get_args("05", []))
    ch.pop("out"), ref.pop("out")
    ch.pop("crash_at_step")  # the chapter's fault-tolerance demo; the reference Trainer has no such flag
    assert ch == ref
    assert ch["method"] == "grpo" and ch["beta"] == 0.0 and ch["loss_type"] == "grpo" and ch["max_steps"] == 800
    dpo = vars(load_chapter("05").get_args(["--method", "dpo"]))
    ch04 = vars(load_chapter("04").get_args([]))
    assert {k: dpo[k] for k in ch04 if k != "out"} == {k: ch04[k] for k in ch04 if k != "out"}  # chapter 04's


@pytest.mark.parametrize("flags, message", [
    (["--num-samples-per-prompt", "1"], "--num-samples-per-prompt must be >= 2"),
    (["--temperature", "0"], "--temperature > 0"),
    (["--loss-type", "sigmoid"], "--loss-type sigmoid is not a --method grpo loss"),
])
def test_bad_flags_are_clear_errors(flags, message, capsys):
    with pytest.raises(SystemExit):
        load_chapter("05").get_args(flags)
    assert re.search(message, capsys.readouterr().err)


def test_prompt_longer_than_the_context_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="prompts of 6 tokens \\+ --max-completion-length 7 exceed the model's "
                                         "context of 12 tokens"):
        load_chapter("05").main(TINY05 + ["--max-completion-length", "7", "--sft-steps", "1", "--out", str(tmp_path)])


def test_bad_reward_function_is_a_clear_error(tmp_path, monkeypatch):
    ch = load_chapter("05")

    def correctness_reward(prompts, completions, **batch):
        return [float("nan")] * len(completions)
    monkeypatch.setattr(ch, "correctness_reward", correctness_reward)
    with pytest.raises(ValueError, match="reward function correctness_reward returned nan"):
        ch.main(TINY05 + ["--sft-steps", "1", "--out", str(tmp_path)])


def test_online_ddp_trains_whole_groups_and_reward_rises(tmp_path):
    """Two processes, each sampling its own prompts' groups: finite metrics, every group whole
    (tokens = completions of both ranks), and the reward goes up."""
    out = str(tmp_path / "two")
    # one-digit sums (80 train problems), 4 prompts x 8 samples per rank and step
    args = ["--sft-steps", "60", "--max-steps", "40", "--batch-size", "4", "--eval-every", "40", "--eval-size", "20",
            "--n-embd", "32", "--n-layer", "1", "--amp", "off", "--seed", "0", "--device", "cpu", "--digits", "1",
            "--grpo-lr", "1e-3", "--lr", "1e-2", "--warmup-steps", "10"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        os.path.join(ROOT, "tutorial", "05_grpo", "train.py"), *args, "--out", out],
                       env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    grpo = read_jsonl(os.path.join(out, "metrics.jsonl"))
    assert len(grpo) == 40 and all(r["tokens"] == 64 for r in grpo)  # 2 ranks x 32 completions
    assert all(math.isfinite(v) for r in grpo for v in r.values())
    first, last = (sum(r["reward"] for r in part) / 10 for part in (grpo[:10], grpo[-10:]))
    assert last > first, (first, last)


def test_method_dpo_is_chapter_04(tmp_path):
    """Chapter 05 adds GRPO and changes nothing else: --method dpo is chapter 04, number for number."""
    args = TINY + ["--sft-steps", "20", "--max-steps", "20", "--amp", "off", "--method", "dpo"]
    load_chapter("05").main(args + ["--out", str(tmp_path / "05")])
    load_chapter("04").main(args[:-2] + ["--out", str(tmp_path / "04")])
    assert_identical_runs(str(tmp_path / "05"), str(tmp_path / "04"))

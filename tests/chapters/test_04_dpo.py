"""Chapter 04 and `python -m reference 04` run the same experiment: identical numbers in both
phases. Plus the weak start's early stop, the chapter's resume across phases, and DDP with two
processes == one process."""
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, TINY, assert_identical_runs, load_chapter, read_jsonl
from reference import chapters

# 20 SFT steps (a target it never reaches), then 30 DPO steps, in fp32; checkpoints every 10 steps
TINY04 = TINY + ["--sft-steps", "20", "--sft-target", "0.99", "--amp", "off", "--save-every", "10"]
PHASES = ("sft", "")
SUMMARY_KEYS = ("eval_accuracy", "eval_loss", "final_loss", "steps", "eval_accuracy_sft",
                "eval_accuracy_dpo", "pref_accuracy_sft", "pref_accuracy_dpo", "sft_steps")
TRL_KEYS = {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
            "logps/chosen", "logps/rejected"}


def metrics(out, phase=""):
    return os.path.join(out, phase, "metrics.jsonl")


@pytest.fixture(scope="module")
def chapter_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ch04") / "run")
    return out, load_chapter("04").main(TINY04 + ["--out", out])


def test_chapter_04_matches_reference_bitwise(chapter_run, tmp_path):
    out, ch = chapter_run
    ref = chapters.run("04", TINY04 + ["--out", str(tmp_path)])
    assert_identical_runs(out, str(tmp_path), PHASES)
    assert {k: ch[k] for k in SUMMARY_KEYS} == {k: ref[k] for k in SUMMARY_KEYS}
    dpo = read_jsonl(metrics(out))
    assert len(dpo) == 30 and all(TRL_KEYS | {"nll_loss", "loss_count", "tokens"} <= set(r)
                                  for r in dpo)
    assert [r["step"] for r in read_jsonl(metrics(out), split="eval")] == [10, 20, 30]
    # loss_count counts pairs (the loss's divisor); tokens counts both completions' tokens
    assert all(r["loss_count"] == 32 and r["tokens"] > 2 * 32 for r in dpo)
    # the policy starts as the reference: the DPO part of the first loss is ln 2, the rest RPO's
    assert dpo[0]["loss"] - dpo[0]["nll_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert dpo[0]["rewards/margins"] == 0.0
    assert dpo[-1]["rewards/margins"] > 0 and ch["pref_accuracy_dpo"] > ch["pref_accuracy_sft"]


def test_plain_dpo_matches_reference(tmp_path):
    """--rpo-alpha 0: no NLL term, so no nll_loss either."""
    args = TINY04 + ["--rpo-alpha", "0", "--max-steps", "10"]
    load_chapter("04").main(args + ["--out", str(tmp_path / "ch")])
    chapters.run("04", args + ["--out", str(tmp_path / "ref")])
    assert_identical_runs(str(tmp_path / "ch"), str(tmp_path / "ref"), PHASES)
    assert "nll_loss" not in read_jsonl(metrics(str(tmp_path / "ch")))[0]


def test_weak_start_stops_at_the_first_evaluation_at_the_target(tmp_path):
    """--sft-target 0.0 is reached at the first evaluation: SFT ends at step 10 of 20, with a
    checkpoint there, in the chapter and the reference alike; a resume does not train it on."""
    args = TINY + ["--amp", "off", "--save-every", "20", "--sft-steps", "20",
                   "--sft-target", "0.0", "--max-steps", "10"]
    summary = load_chapter("04").main(args + ["--out", str(tmp_path / "ch")])
    chapters.run("04", args + ["--out", str(tmp_path / "ref")])
    assert_identical_runs(str(tmp_path / "ch"), str(tmp_path / "ref"), PHASES)
    sft = read_jsonl(metrics(str(tmp_path / "ch"), "sft"))
    assert [r["step"] for r in sft] == list(range(1, 11)) and summary["sft_steps"] == 10
    assert os.listdir(os.path.join(tmp_path, "ch", "sft", "checkpoints")) == ["step_000010"]
    again = load_chapter("04").main(args + ["--out", str(tmp_path / "ch"), "--resume"])
    assert again["sft_steps"] == 10 and again["steps"] == 10
    assert len(read_jsonl(metrics(str(tmp_path / "ch"), "sft"))) == 10


@pytest.mark.parametrize("lost", ["dpo_end", "sft_end"])
def test_resume_continues_either_phase_bitwise(chapter_run, tmp_path, capsys, lost):
    """dpo_end: the DPO phase's last checkpoint is lost, so --resume skips the finished SFT phase
    and redoes DPO steps 21-30. sft_end: the SFT phase's last checkpoint and every DPO one are
    lost, so SFT resumes at step 10 and DPO starts over. Either way: the straight run's numbers."""
    out, _ = chapter_run
    resumed = str(tmp_path / "run")
    shutil.copytree(out, resumed)
    os.remove(os.path.join(resumed, "summary.json"))
    if lost == "dpo_end":
        shutil.rmtree(os.path.join(resumed, "checkpoints", "step_000030"))
    else:
        shutil.rmtree(os.path.join(resumed, "sft", "checkpoints", "step_000020"))
        shutil.rmtree(os.path.join(resumed, "checkpoints"))
    capsys.readouterr()
    summary = load_chapter("04").main(TINY04 + ["--out", resumed, "--resume"])
    printed = capsys.readouterr().out
    sft_step = "step_000020" if lost == "dpo_end" else "step_000010"
    assert f"resumed from {os.path.join(resumed, 'sft', 'checkpoints', sft_step)}" in printed
    if lost == "dpo_end":
        assert f"resumed from {os.path.join(resumed, 'checkpoints', 'step_000020')}" in printed
    else:
        assert "no checkpoint yet, starting fresh" in printed
    assert_identical_runs(out, resumed, PHASES)
    assert summary["steps"] == 30
    a = torch.load(os.path.join(out, "model.pt"), weights_only=True)["model"]
    b = torch.load(os.path.join(resumed, "model.pt"), weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ddp_two_processes_equal_one_process(tmp_path):
    """Both phases under torchrun with 2 x 8 sequences (or pairs) per step == 1 x 16."""
    base = ["--max-steps", "10", "--sft-steps", "10", "--sft-target", "0.99", "--eval-every", "10",
            "--eval-size", "50", "--n-embd", "32", "--n-layer", "1", "--amp", "off", "--seed", "0",
            "--device", "cpu"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    load_chapter("04").main(base + ["--batch-size", "16", "--out", one])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT,
               TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node=2", os.path.join(ROOT, "tutorial", "04_dpo", "train.py"),
                        *base, "--batch-size", "8", "--out", two],
                       env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    for phase in PHASES:
        a, b = read_jsonl(metrics(one, phase)), read_jsonl(metrics(two, phase))
        assert len(a) == len(b) == 10
        for key in ("tokens", "loss_count"):  # global counts: every rank divides by the same
            assert [r[key] for r in a] == [r[key] for r in b]
        for key in ("loss", "grad_norm") + (tuple(sorted(TRL_KEYS)) if phase == "" else ()):
            torch.testing.assert_close(torch.tensor([r[key] for r in b]),
                                       torch.tensor([r[key] for r in a]), rtol=1e-5, atol=1e-6,
                                       msg=f"{phase or 'dpo'} {key}")
    pa = torch.load(os.path.join(one, "model.pt"), weights_only=True)["model"]
    pb = torch.load(os.path.join(two, "model.pt"), weights_only=True)["model"]
    for name in pa:
        assert (pa[name] - pb[name]).norm() <= 1e-5 * pa[name].norm(), name

"""Chapter 02: accumulation equivalence, clipping, the GradScaler, parity, and bad input."""
import pytest
import torch

from conftest import TINY, load_chapter, read_jsonl
from reference import chapters
from reference.runtime import resolve_amp_dtype

FP32 = [a for a in TINY if a not in ("--max-steps", "30")] + ["--amp", "off"]


def final_params(out):
    return torch.load(out / "model.pt", weights_only=True)["model"]


def test_accumulation_matches_full_batch(tmp_path):
    """4 micro-batches of 8 == one batch of 32: same per-step losses, same final parameters."""
    ch = load_chapter("02")
    common = FP32[:]
    i = common.index("--batch-size")
    del common[i:i + 2]
    ch.main(common + ["--max-steps", "20", "--batch-size", "8", "--grad-accum-steps", "4",
                      "--out", str(tmp_path / "acc")])
    ch.main(common + ["--max-steps", "20", "--batch-size", "32", "--grad-accum-steps", "1",
                      "--out", str(tmp_path / "full")])
    acc, full = (read_jsonl(tmp_path / "acc" / "metrics.jsonl"),
                 read_jsonl(tmp_path / "full" / "metrics.jsonl"))
    assert [r["tokens"] for r in acc] == [r["tokens"] for r in full]
    torch.testing.assert_close(torch.tensor([r["loss"] for r in acc]),
                               torch.tensor([r["loss"] for r in full]), rtol=1e-5, atol=0)
    pa, pb = final_params(tmp_path / "acc"), final_params(tmp_path / "full")
    for name in pa:
        assert (pa[name] - pb[name]).norm() <= 1e-5 * pb[name].norm(), name


@pytest.mark.parametrize("amp", ["off", "bf16"])
def test_chapter_02_matches_reference_bitwise(tmp_path, amp):
    argv = [a for a in TINY] + ["--amp", amp, "--grad-accum-steps", "2"]
    ch = load_chapter("02").main(argv + ["--out", str(tmp_path / "ch")])
    ref = chapters.run("02", argv + ["--out", str(tmp_path / "ref")])
    a, b = (read_jsonl(tmp_path / "ch" / "metrics.jsonl"),
            read_jsonl(tmp_path / "ref" / "metrics.jsonl"))
    assert len(a) == 30 and a == b  # every key of every step, bit for bit
    assert read_jsonl(tmp_path / "ch" / "metrics.jsonl", "eval") == \
           read_jsonl(tmp_path / "ref" / "metrics.jsonl", "eval")
    assert ch["final_loss"] == ref["final_loss"]


@pytest.mark.parametrize("argv, message", [
    (["--grad-accum-steps", "0"], "--grad-accum-steps must be >= 1"),
    (["--max-grad-norm", "-1"], "--max-grad-norm must be > 0"),
])
def test_bad_flags_are_clear_errors(capsys, argv, message):
    with pytest.raises(SystemExit):
        load_chapter("02").get_args(argv)
    assert message in capsys.readouterr().err


def test_fp16_where_unsupported_is_a_clear_error():
    meta = torch.device("meta")  # a device without fp16 autocast
    with pytest.raises(ValueError, match="autocast"):
        resolve_amp_dtype(meta, amp_dtype="fp16")


def test_nan_loss_in_fp32_names_the_step(tmp_path, monkeypatch):
    ch = load_chapter("02")
    real, calls = ch.sft_loss_sum, []

    def nan_at_step_3(logits, labels):  # the training loss turns NaN at the third step
        loss_sum, n = real(logits, labels)
        calls.append(1)
        return (loss_sum * float("nan") if len(calls) == 3 else loss_sum), n

    monkeypatch.setattr(ch, "sft_loss_sum", nan_at_step_3)
    with pytest.raises(FloatingPointError, match="step 3: the gradient norm is nan"):
        ch.main(TINY + ["--amp", "off", "--eval-every", "100", "--out", str(tmp_path)])

"""Chapter 01 and `python -m reference 01` run the same experiment: identical numbers."""

from conftest import TINY, load_chapter, read_jsonl
from reference import chapters
from reference.compare import compare, load


def test_chapter_01_matches_reference_bitwise(tmp_path):
    argv = TINY
    ch = load_chapter("01").main(argv + ["--out", str(tmp_path / "ch")])
    ref = chapters.run("01", argv + ["--out", str(tmp_path / "ref")])
    a, b = (read_jsonl(tmp_path / "ch" / "metrics.jsonl"),
            read_jsonl(tmp_path / "ref" / "metrics.jsonl"))
    assert len(a) == len(b) == 30
    assert [r["loss"] for r in a] == [r["loss"] for r in b]          # bitwise, every step
    assert [r["grad_norm"] for r in a] == [r["grad_norm"] for r in b]
    diffs, _ = compare(load(tmp_path / "ch" / "metrics.jsonl"),
                       load(tmp_path / "ref" / "metrics.jsonl"))
    assert diffs == []                                                 # eval records too
    assert ch["final_loss"] == ref["final_loss"] and ch["eval_accuracy"] == ref["eval_accuracy"]
    assert ch["steps"] == 30


def test_chapter_01_defaults_match_reference_defaults():
    ch = vars(load_chapter("01").get_args([]))
    ref = vars(chapters.get_args("01", []))
    ch.pop("out"), ref.pop("out")
    assert ch == ref


def test_chapter_01_writes_the_metrics_schema(tmp_path):
    summary = load_chapter("01").main(TINY + ["--out", str(tmp_path)])
    train = read_jsonl(tmp_path / "metrics.jsonl")
    evals = read_jsonl(tmp_path / "metrics.jsonl", split="eval")
    assert [r["step"] for r in train] == list(range(1, 31))
    assert all({"step", "loss", "lr", "grad_norm", "tokens"} <= set(r) for r in train)
    assert [r["step"] for r in evals] == [10, 20, 30]
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in evals)
    assert {"eval_accuracy", "final_loss", "steps", "train_seconds"} <= set(summary)
    assert (tmp_path / "model.pt").exists() and (tmp_path / "summary.json").exists()
    assert train[0]["loss"] > train[-1]["loss"]  # it learns something even in 30 tiny steps

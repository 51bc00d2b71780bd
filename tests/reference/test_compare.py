"""`reference.compare` is strict: a missing key, a missing or extra step, or a differing eval
record is a difference (exit 1); an empty or malformed log is an error (exit 2)."""
import json
import math

import pytest

from reference.compare import Difference, compare, diff_logs, load, main, max_abs_diff


def train(step, loss=None, **extra):
    loss = 2.0 - 0.1 * step if loss is None else loss
    return {"step": step, "loss": loss, "lr": 1e-3 * step, "grad_norm": 1.5 + step, "tokens": 100,
            **extra}


def evaluation(step, loss=1.0, accuracy=0.5):
    return {"step": step, "split": "eval", "loss": loss, "accuracy": accuracy}


def run_log(steps=6, eval_every=3):
    records = []
    for step in range(1, steps + 1):
        records.append(train(step))
        if step % eval_every == 0:
            records.append(evaluation(step, loss=1.0 / step))
    return records


def write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def cli(tmp_path, a_records, b_records, *flags):
    """Run `python -m reference.compare A B [flags]` in-process: (exit status, printed text)."""
    a, b = write(tmp_path / "a.jsonl", a_records), write(tmp_path / "b.jsonl", b_records)
    return main([a, b, *flags])


def test_identical_logs_exit_0_and_say_bit_for_bit(tmp_path, capsys):
    assert cli(tmp_path, run_log(), run_log()) == 0
    out = capsys.readouterr().out
    assert out == "identical: 6 train steps and 2 eval records match bit for bit\n"
    assert compare(run_log(), run_log()) == ([], [])


def test_records_with_only_a_step_are_a_difference(tmp_path, capsys):
    only_steps = [{"step": s} for s in (1, 2, 3)]
    assert cli(tmp_path, only_steps, only_steps) == 1
    out = capsys.readouterr().out
    assert "first difference: train step 1, key 'tokens': missing from both logs" in out
    diffs, _ = compare(only_steps, only_steps)
    assert {(d.key, d.kind, d.missing_from) for d in diffs} == {
        (k, "missing_key", "both") for k in ("loss", "lr", "grad_norm", "tokens")}
    assert len(diffs) == 12


def test_a_missing_required_key_is_a_difference(tmp_path, capsys):
    a = run_log()
    del a[4]["grad_norm"]  # train step 4 (after train 1-3 and eval 3)
    assert a[4]["step"] == 4 and "split" not in a[4]
    assert cli(tmp_path, a, run_log()) == 1
    out = capsys.readouterr().out
    assert f"first difference: train step 4, key 'grad_norm': missing from {tmp_path}" in out
    assert "a.jsonl (every train record needs loss, lr, grad_norm, tokens)" in out


def test_a_method_metric_one_log_lacks_is_a_difference(tmp_path, capsys):
    a = [train(s, kl=0.01 * s) for s in (1, 2, 3)]
    b = [train(1, kl=0.01), train(2), train(3, kl=0.03)]
    assert cli(tmp_path, a, b) == 1
    out = capsys.readouterr().out
    assert "first difference: train step 2, key 'kl': missing from" in out and "b.jsonl" in out
    first = diff_logs(a, b).first
    assert (first.split, first.step, first.key, first.kind, first.missing_from) == (
        "train", 2, "kl", "missing_key", "B")
    assert first.a == 0.02 and first.b is None


def test_a_missing_step_is_a_difference(tmp_path, capsys):
    a = [r for r in run_log() if r["step"] != 2]
    assert cli(tmp_path, a, run_log()) == 1
    out = capsys.readouterr().out
    assert "first difference: train step 2: missing from" in out
    assert "train steps only in" in out and "b.jsonl: 2 (1)" in out
    first = diff_logs(a, run_log()).first
    assert (first.kind, first.step, first.missing_from, first.key) == ("missing_step", 2, "A", None)


def test_a_log_that_lost_its_first_steps_in_a_crash_differs(tmp_path, capsys):
    a = [r for r in run_log() if r["step"] > 4]
    assert cli(tmp_path, a, run_log()) == 1
    out = capsys.readouterr().out
    assert "b.jsonl: 1-4 (4)" in out  # the train steps only B has, as a range
    assert "first difference: train step 1: missing from" in out
    kinds = [(d.split, d.step, d.kind) for d in compare(a, run_log())[0]]
    assert kinds == [("train", s, "missing_step") for s in (1, 2, 3)] + [
        ("eval", 3, "missing_step"), ("train", 4, "missing_step")]


def test_an_extra_step_is_a_difference(tmp_path, capsys):
    a = run_log() + [train(7)]
    assert cli(tmp_path, a, run_log()) == 1
    out = capsys.readouterr().out
    assert "first difference: train step 7: missing from" in out and "(" in out
    first = diff_logs(a, run_log()).first
    assert (first.kind, first.step, first.missing_from) == ("extra_step", 7, "B")


def test_a_differing_eval_record_is_a_difference(tmp_path, capsys):
    a = run_log()
    a[-1] = evaluation(6, loss=0.5, accuracy=0.75)
    assert a[-1]["step"] == 6 and a[-2] == train(6)
    assert cli(tmp_path, a, run_log()) == 1
    out = capsys.readouterr().out
    assert f"first difference: eval step 6, key 'loss': 0.5 vs {1 / 6!r}" in out
    assert [(d.key, d.a, d.b) for d in compare(a, run_log())[0]] == [
        ("loss", 0.5, 1 / 6), ("accuracy", 0.75, 0.5)]


def test_a_missing_eval_record_is_a_difference(tmp_path, capsys):
    a = [r for r in run_log() if r.get("split") != "eval" or r["step"] != 3]
    assert cli(tmp_path, a, run_log()) == 1
    assert "first difference: eval step 3: missing from" in capsys.readouterr().out


def test_values_are_reported_in_a_per_key_summary(tmp_path, capsys):
    a = run_log()
    for r in a:
        if "split" not in r and r["step"] >= 3:
            r["loss"] += 0.25
    assert cli(tmp_path, a, run_log()) == 1
    lines = capsys.readouterr().out.splitlines()
    loss = next(line for line in lines if line.split()[:2] == ["train", "loss"])
    assert loss.split()[2:] == ["0.25", f"{0.25 / (2.0 - 0.1 * 6):.3g}", "4/6", "0"]
    tokens = next(line for line in lines if line.split()[:2] == ["train", "tokens"])
    assert tokens.split()[2:] == ["0", "0", "0/6", "0"]
    assert f"first difference: train step 3, key 'loss': {1.7 + 0.25!r} vs 1.7" in lines


def test_the_first_difference_is_upstream_first_within_a_step():
    """tokens, lr, loss, grad_norm, then other keys alphabetically; the train record, then eval."""
    b = [train(1), train(2, kl=0.5), evaluation(2)]
    a = [train(1), {**train(2, kl=0.6), "loss": 9.0, "tokens": 7, "grad_norm": 9.0},
         evaluation(2, loss=3.0)]
    diffs, _ = compare(a, b)
    assert [(d.split, d.key) for d in diffs] == [
        ("train", "tokens"), ("train", "loss"), ("train", "grad_norm"), ("train", "kl"),
        ("eval", "loss")]
    assert diffs[0][:5] == ("train", 2, "tokens", 7, 100)  # the old tuple's fields come first
    assert diffs[0] == Difference("train", 2, "tokens", 7, 100, "value", None)


def test_empty_logs_are_an_error_naming_the_file(tmp_path, capsys):
    (tmp_path / "a.jsonl").write_text("")
    (tmp_path / "b.jsonl").write_text("\n\n")
    assert main([str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'a.jsonl'}: empty log (no records)" in err
    write(tmp_path / "a.jsonl", run_log())
    assert main([str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]) == 2
    assert f"{tmp_path / 'b.jsonl'}: empty log" in capsys.readouterr().err
    with pytest.raises(ValueError, match="empty log"):
        compare([], [])


def test_a_log_of_eval_records_only_is_an_error(tmp_path, capsys):
    assert cli(tmp_path, [evaluation(3)], [evaluation(3)]) == 2
    assert "a.jsonl: no train records" in capsys.readouterr().err


def test_a_malformed_line_is_reported_with_its_file_and_line_number(tmp_path, capsys):
    lines = [json.dumps(r) for r in run_log()]
    lines[4] = '{"step": 5, "loss": 1.5,, "lr": 0.1}'
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    b = write(tmp_path / "b.jsonl", run_log())
    assert main([str(tmp_path / "a.jsonl"), b]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'a.jsonl'}:5: not a JSON object (Expecting property name" in err
    assert "last line" not in err
    lines[4] = "[1, 2]"
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"a\.jsonl:5: not a JSON object \(a JSON list\)"):
        load(tmp_path / "a.jsonl")
    lines[4] = '{"loss": 1.5}'
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r'a\.jsonl:5: record has no integer "step"'):
        load(tmp_path / "a.jsonl")


def test_a_torn_last_line_is_an_error_that_says_so(tmp_path, capsys):
    text = "".join(json.dumps(r) + "\n" for r in run_log()) + '{"step": 7, "loss": 1.2'
    (tmp_path / "a.jsonl").write_text(text)
    assert main([str(tmp_path / "a.jsonl"), write(tmp_path / "b.jsonl", run_log())]) == 2
    err = capsys.readouterr().err
    assert f"a.jsonl:{len(run_log()) + 1}: not a JSON object" in err
    assert "last line, probably cut short by a crash mid-write" in err


def test_a_step_logged_twice_is_an_error_naming_both_lines(tmp_path):
    write(tmp_path / "a.jsonl", run_log() + [train(6)])
    with pytest.raises(ValueError, match=r"a\.jsonl:9: train step 6 is already at line 7"):
        load(tmp_path / "a.jsonl")


def test_max_step_compares_only_the_early_steps(tmp_path, capsys):
    a = run_log()
    a[-2] = train(6, loss=0.0)  # drifted at step 6 (its eval record too)
    a[-1] = evaluation(6, loss=0.0)
    assert cli(tmp_path, a, run_log(), "--max-step", "5") == 0
    out = capsys.readouterr().out
    assert out == "identical: 5 train steps and 1 eval records up to step 5 match bit for bit\n"
    assert cli(tmp_path, a, run_log(), "--max-step", "6") == 1
    assert "first difference: train step 6, key 'loss'" in capsys.readouterr().out
    assert compare(a[:-2], run_log(), max_step=5) == ([], [])  # steps after 5 may be missing
    assert cli(tmp_path, a, run_log(), "--max-step", "0") == 2
    assert "max_step must be >= 1" in capsys.readouterr().err


def test_rtol_accepts_small_relative_differences(tmp_path, capsys):
    a = run_log()
    for r in a:
        r["loss"] *= 1 + 1e-7
    assert cli(tmp_path, a, run_log()) == 1
    capsys.readouterr()
    assert cli(tmp_path, a, run_log(), "--rtol", "1e-6") == 0
    out = capsys.readouterr().out
    assert out.startswith("identical: 6 train steps and 2 eval records match within rtol=1e-06")
    assert cli(tmp_path, a, run_log(), "--rtol", "1e-8") == 1
    assert "(rtol=1e-08, atol=0)" in capsys.readouterr().out


def test_rtol_does_not_excuse_a_missing_key_or_step(tmp_path, capsys):
    a = [r for r in run_log() if r["step"] != 4]
    assert cli(tmp_path, a, run_log(), "--rtol", "1", "--atol", "1e9") == 1
    assert "first difference: train step 4: missing from" in capsys.readouterr().out


def test_wall_clock_keys_are_never_compared(tmp_path, capsys):
    a = [train(s, train_seconds=1.0 * s, generation_fraction=0.3) for s in (1, 2, 3)]
    b = [train(s, train_seconds=2.5 * s, generation_fraction=0.4, time=12.0) for s in (1, 2, 3)]
    assert cli(tmp_path, a, b) == 0
    out = capsys.readouterr().out
    assert "note: wall-clock keys that only one log has (never compared): ['time']" in out
    assert out.endswith("identical: 3 train steps and 0 eval records match bit for bit\n")
    assert compare(a, a) == ([], [])


def test_ignore_skips_a_method_metric_but_never_a_required_key(tmp_path, capsys):
    a = [train(s) for s in (1, 2)]
    b = [train(s, skipped_steps=0) for s in (1, 2)]
    assert cli(tmp_path, a, b) == 1
    capsys.readouterr()
    assert cli(tmp_path, a, b, "--ignore", "skipped_steps") == 0
    assert cli(tmp_path, a, b, "--ignore", "loss") == 2
    assert "cannot ignore ['loss']" in capsys.readouterr().err


def test_nan_matches_nan_and_a_bool_is_not_a_number():
    assert compare([train(1, loss=math.nan)], [train(1, loss=math.nan)]) == ([], [])
    diffs, _ = compare([train(1, loss=math.nan)], [train(1, loss=2.0)])
    assert [(d.key, d.kind) for d in diffs] == [("loss", "value")]
    diffs, _ = compare([train(1, flag=True)], [train(1, flag=1)])
    assert [d.key for d in diffs] == ["flag"]
    diffs, _ = compare([train(1, loss=math.inf)], [train(1, loss=2.0)], rtol=1.0)
    assert [d.key for d in diffs] == ["loss"]


def test_cli_exit_codes(tmp_path, capsys):
    assert cli(tmp_path, run_log(), run_log()) == 0
    assert cli(tmp_path, run_log()[:-1], run_log()) == 1
    assert main([str(tmp_path / "a.jsonl"), str(tmp_path / "missing.jsonl")]) == 2
    assert f"error: {tmp_path / 'missing.jsonl'}: No such file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "a.jsonl")])  # argparse: B is required
    assert e.value.code == 2


def test_max_abs_diff_still_gives_one_keys_largest_difference():
    a = run_log()
    a[0]["loss"] += 0.5
    assert max_abs_diff(a, run_log()) == pytest.approx(0.5)
    assert max_abs_diff(a, run_log(), split="eval") == 0.0

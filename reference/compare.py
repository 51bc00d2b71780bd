"""Strict diff of two metrics.jsonl files, step by step.

    python -m reference.compare A/metrics.jsonl B/metrics.jsonl [--rtol R] [--atol T] [--max-step N]

A is usually yours and B the reference. Every train record needs `step`, `loss`, `lr`,
`grad_norm` and `tokens`; every train step and every eval record must be in both logs, with the
same keys. A missing key, a missing step or an extra step is a difference, like a value that
differs by more than atol + rtol * |b|. Wall-clock keys (names containing seconds, time or
fraction) are never compared.

Prints "identical: ..." and exits 0, or a per-key summary and the first difference and exits 1.
An empty or malformed log is an error (exit 2), reported with its file and line number.
`--max-step N` compares only steps <= N: once two runs drift apart, only the early steps tell why.

From Python: `diff_logs(a, b)` (records) or `diff_files(path_a, path_b)` return a `Report`, whose
`first` is the first `Difference` in step order; `compare(a, b)` returns `(differences, notes)`."""
import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from typing import NamedTuple

VOLATILE = ("seconds", "time", "fraction")  # wall-clock measurements
REQUIRED = ("loss", "lr", "grad_norm", "tokens")  # in every train record
# Within one record, keys upstream of the others come first: the batch (tokens) and the schedule
# (lr) feed the forward pass (loss), which feeds the backward pass (grad_norm). Other keys follow
# in alphabetical order. So the first difference is the earliest cause that the log can show.
KEY_ORDER = ("tokens", "lr", "loss", "grad_norm")
SPLIT_ORDER = ("train", "eval")  # at one step the train record comes before the eval record
KINDS = ("value", "missing_key", "missing_step", "extra_step")


class LogError(ValueError):
    """A metrics log that cannot be compared at all: unreadable, malformed or empty."""


class Difference(NamedTuple):
    """One difference between log A and log B. The first five fields keep the old tuple's order.

    kind "value": both have `key` at this step and the values differ beyond the tolerance.
    kind "missing_key": `missing_from` ("A", "B" or "both") lacks `key` in this record.
    kind "missing_step": B has this (split, step) record and A does not (`missing_from` "A").
    kind "extra_step": A has this (split, step) record and B does not (`missing_from` "B").
    For a whole record `key` is None; a value that a log lacks is None."""
    split: str
    step: int
    key: object
    a: object = None
    b: object = None
    kind: str = "value"
    missing_from: object = None


@dataclass
class KeyStats:
    """One (split, key) over the records both logs have: how many values were compared, how many
    differ beyond the tolerance, how many records lack the key, and the largest differences."""
    compared: int = 0
    differing: int = 0
    missing: int = 0
    max_abs: float = 0.0
    max_rel: float = 0.0  # |a - b| / |b|, B being the reference
    numeric: bool = True


@dataclass
class Report:
    """What `diff_logs` found. `differences` is in step order, then split (train, eval), then key
    (KEY_ORDER, then alphabetical); `first` is differences[0] or None."""
    differences: list
    notes: list
    stats: dict  # (split, key) -> KeyStats, ordered like the differences (split, then key)
    counts: dict  # "A" / "B" -> {split: number of records compared}
    names: tuple = ("A", "B")
    rtol: float = 0.0
    atol: float = 0.0
    max_step: object = None
    only: dict = field(default_factory=dict)  # (split, "A" or "B") -> steps only that log has

    def name(self, side):
        """The name (path) of log "A" or "B" as given to diff_logs, or "both logs"."""
        return {"A": self.names[0], "B": self.names[1]}.get(side, "both logs")

    @property
    def first(self):
        return self.differences[0] if self.differences else None

    @property
    def identical(self):
        return not self.differences


def load(path):
    """The records of a metrics.jsonl, checked: every non-blank line is a JSON object with an
    integer "step", no (split, step) appears twice, and there is at least one record. Raises
    LogError naming the file and line otherwise."""
    with open(path) as f:
        lines = f.readlines()
    last = max((n for n, line in enumerate(lines, 1) if line.strip()), default=0)
    records, seen = [], {}
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            torn = ("; it is the last line, probably cut short by a crash mid-write: delete it, "
                    "or rerun" if n == last else "")
            why = f"{e.msg} at column {e.colno}"
            raise LogError(f"{where}: not a JSON object ({why}){torn}") from None
        if not isinstance(record, dict):
            raise LogError(f"{where}: not a JSON object (a JSON {type(record).__name__}); "
                           "metrics.jsonl holds one object per line")
        problem = record_problem(record)
        if problem:
            raise LogError(f"{where}: {problem}")
        key = (record.get("split", "train"), record["step"])
        if key in seen:
            raise LogError(f"{where}: {key[0]} step {key[1]} is already at line {seen[key]}; a log "
                           "has one record per step and split (a resumed run must drop the records "
                           "after its checkpoint, or write to an empty directory)")
        seen[key] = n
        records.append(record)
    if not records:
        raise LogError(f"{path}: empty log (no records): the run wrote nothing; rerun it, or check "
                       "that the path is the run's metrics.jsonl")
    return records


def record_problem(record):
    step, split = record.get("step"), record.get("split", "train")
    if not isinstance(step, int) or isinstance(step, bool):
        return f'record has no integer "step" (got {step!r}); every record needs its optimizer step'
    if not isinstance(split, str):
        return f'"split" must be a string such as "eval" (got {split!r})'
    return None


def index(records, name, max_step):
    """{(split, step): record}, only steps <= max_step; ValueError on a record that cannot be
    placed, a (split, step) seen twice, or no train record at all."""
    by_key = {}
    for i, record in enumerate(records, 1):
        problem = "not a dict" if not isinstance(record, dict) else record_problem(record)
        if problem:
            raise ValueError(f"{name}, record {i}: {problem}")
        key = (record.get("split", "train"), record["step"])
        if max_step is not None and key[1] > max_step:
            continue
        if key in by_key:
            raise ValueError(f"{name}: {key[0]} step {key[1]} appears twice; a log has one record "
                             "per step and split")
        by_key[key] = record
    if not records:
        raise ValueError(f"{name}: empty log (no records)")
    if not any(split == "train" for split, _ in by_key):
        upto = f" up to step {max_step}" if max_step is not None else ""
        raise ValueError(f"{name}: no train records{upto} (records without a split key); a metrics "
                         "log has one per optimizer step")
    return by_key


def split_rank(split):
    return (SPLIT_ORDER.index(split), "") if split in SPLIT_ORDER else (len(SPLIT_ORDER), split)


def key_rank(key):
    if key is None:  # a whole record: before the keys of that record
        return (-1, "")
    return (KEY_ORDER.index(key), "") if key in KEY_ORDER else (len(KEY_ORDER), key)


def order(d):
    return (d.step, split_rank(d.split), key_rank(d.key))


def is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def abs_diff(va, vb):
    if va == vb or (math.isnan(va) and math.isnan(vb)):
        return 0.0
    if math.isnan(va) or math.isnan(vb):
        return math.inf
    return abs(va - vb)


def rel_diff(va, vb):
    d = abs_diff(va, vb)
    return d / abs(vb) if vb != 0 and not math.isinf(vb) else (0.0 if d == 0 else math.inf)


def values_match(va, vb, rtol=0.0, atol=0.0):
    """True when va and vb are equal, or both numbers within atol + rtol * |vb|; NaN matches NaN."""
    if is_number(va) and is_number(vb):
        d = abs_diff(va, vb)
        return d == 0 or (math.isfinite(d) and d <= atol + rtol * abs(vb))
    return isinstance(va, bool) == isinstance(vb, bool) and va == vb


def diff_logs(a_records, b_records, rtol=0.0, atol=0.0, max_step=None, ignore=(), names=("A", "B")):
    """Compare two lists of metrics records strictly and return a Report.

    max_step: compare only records with step <= max_step. ignore: extra keys not to compare (the
    required keys cannot be ignored). names: how the two logs are called in messages."""
    if not (rtol >= 0 and atol >= 0):
        raise ValueError(f"rtol and atol must be >= 0, got rtol={rtol}, atol={atol}")
    if max_step is not None and max_step < 1:
        raise ValueError(f"max_step must be >= 1 (the first optimizer step), got {max_step}")
    ignore = {ignore} if isinstance(ignore, str) else set(ignore)
    bad = sorted(ignore & set(REQUIRED + ("step", "split")))
    if bad:
        raise ValueError(f"cannot ignore {bad}: every train record needs {', '.join(REQUIRED)}")
    name_a, name_b = names
    a, b = index(a_records, name_a, max_step), index(b_records, name_b, max_step)
    diffs, stats, volatile_one_side = [], {}, set()

    def stat(split, key):
        return stats.setdefault((split, key), KeyStats())

    def check_required(split, step, ra, rb):
        if split != "train":
            return
        for key in REQUIRED:
            lack = [n for n, r in (("A", ra), ("B", rb)) if r is not None and key not in r]
            if lack:
                stat(split, key).missing += 1
                missing_from = "both" if len(lack) == 2 else lack[0]
                diffs.append(Difference(split, step, key, ra and ra.get(key), rb and rb.get(key),
                                        "missing_key", missing_from))

    for split, step in sorted(set(a) | set(b), key=lambda k: (k[1], split_rank(k[0]))):
        ra, rb = a.get((split, step)), b.get((split, step))
        if ra is None or rb is None:
            kind, missing_from = ("missing_step", "A") if ra is None else ("extra_step", "B")
            diffs.append(Difference(split, step, None, None, None, kind, missing_from))
            check_required(split, step, ra, rb)
            continue
        check_required(split, step, ra, rb)
        for key in set(ra) | set(rb):
            if key in ("step", "split") or key in ignore:
                continue
            if any(v in key for v in VOLATILE):
                if (key in ra) != (key in rb):
                    volatile_one_side.add(key)
                continue
            if key not in ra or key not in rb:
                if split == "train" and key in REQUIRED:
                    continue  # reported by check_required
                stat(split, key).missing += 1
                missing_from = "A" if key not in ra else "B"
                diffs.append(Difference(split, step, key, ra.get(key), rb.get(key), "missing_key",
                                        missing_from))
                continue
            va, vb, s = ra[key], rb[key], stat(split, key)
            s.compared += 1
            if is_number(va) and is_number(vb):
                s.max_abs = max(s.max_abs, abs_diff(va, vb))
                s.max_rel = max(s.max_rel, rel_diff(va, vb))
            else:
                s.numeric = False
            if not values_match(va, vb, rtol, atol):
                s.differing += 1
                diffs.append(Difference(split, step, key, va, vb))
    diffs.sort(key=order)
    counts = {"A": {}, "B": {}}
    for n, by_key in (("A", a), ("B", b)):
        for split, _ in by_key:
            counts[n][split] = counts[n].get(split, 0) + 1
    only = {}
    for d in diffs:
        if d.kind in ("missing_step", "extra_step"):
            holder = "B" if d.kind == "missing_step" else "A"
            only.setdefault((d.split, holder), []).append(d.step)
    notes = []
    if volatile_one_side:
        notes.append(f"wall-clock keys that only one log has (never compared): "
                     f"{sorted(volatile_one_side)}")
    ordered = dict(sorted(stats.items(), key=lambda kv: (split_rank(kv[0][0]), key_rank(kv[0][1]))))
    return Report(diffs, notes, ordered, counts, tuple(names), rtol, atol, max_step, only)


def diff_files(path_a, path_b, rtol=0.0, atol=0.0, max_step=None, ignore=()):
    """diff_logs of two metrics.jsonl files, named by their paths in messages."""
    return diff_logs(load(path_a), load(path_b), rtol, atol, max_step, ignore,
                     names=(str(path_a), str(path_b)))


def compare(a_records, b_records, rtol=0.0, atol=0.0, max_step=None, ignore=()):
    """(differences, notes): every Difference in step order ([] means none), and notes on what
    was not compared. Raises ValueError on an empty log or a record without an integer step."""
    report = diff_logs(a_records, b_records, rtol, atol, max_step, ignore)
    return report.differences, report.notes


def max_abs_diff(a_records, b_records, key="loss", split="train"):
    """The largest |a - b| of `key` over the steps both logs have for `split` (not strict: use
    `compare` to check that the steps and keys agree)."""
    a = {r["step"]: r[key] for r in a_records if r.get("split", "train") == split and key in r}
    b = {r["step"]: r[key] for r in b_records if r.get("split", "train") == split and key in r}
    common = sorted(set(a) & set(b))
    if not common:
        raise ValueError(f"no {split} steps with {key!r} in common")
    return max(abs(a[s] - b[s]) for s in common)


def ranges(steps):
    """[1, 2, 3, 7, 9, 10] -> "1-3, 7, 9-10"."""
    parts, steps = [], sorted(steps)
    start = prev = steps[0]
    for s in steps[1:] + [None]:
        if s is not None and s == prev + 1:
            prev = s
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = s
    return ", ".join(parts)


def describe(d, names=("A", "B")):
    """One difference in words, the logs called by `names`."""
    name = {"A": names[0], "B": names[1], "both": "both logs"}
    where = f"{d.split} step {d.step}"
    if d.kind == "value":
        return f"{where}, key {d.key!r}: {d.a!r} vs {d.b!r}"
    if d.kind == "missing_key":
        why = (f" (every train record needs {', '.join(REQUIRED)})"
               if d.split == "train" and d.key in REQUIRED else "")
        return f"{where}, key {d.key!r}: missing from {name[d.missing_from]}{why}"
    other = names[1] if d.kind == "missing_step" else names[0]
    return f"{where}: missing from {name[d.missing_from]} ({other} has it)"


def tolerance(report):
    return f"rtol={report.rtol:g}, atol={report.atol:g}"


def number(x):
    return f"{x:.3g}" if x else "0"


def format_report(report):
    """The text `python -m reference.compare` prints."""
    lines = [f"note: {note}" for note in report.notes]
    upto = f" up to step {report.max_step}" if report.max_step is not None else ""
    if report.identical:
        counts = report.counts["A"]
        what = (f"{counts.get('train', 0)} train steps and {counts.get('eval', 0)} eval "
                f"records{upto}")
        largest = max(((s.max_rel, k) for k, s in report.stats.items()), default=(0.0, None))
        if largest[0] == 0:
            lines.append(f"identical: {what} match bit for bit")
        else:
            split, key = largest[1]
            lines.append(f"identical: {what} match within {tolerance(report)} (largest relative "
                         f"difference {number(largest[0])}, {split} {key!r})")
        return "\n".join(lines)
    for side in ("A", "B"):
        c = report.counts[side]
        lines.append(f"{side} = {report.name(side)}: {c.get('train', 0)} train steps, "
                     f"{c.get('eval', 0)} eval records{upto}")
    width = max([len(k) for _, k in report.stats] + [3])
    lines.append(f"{'split':<6} {'key':<{width}} {'max |a-b|':>10} {'max rel':>10} "
                 f"{'differing':>10} {'missing':>8}")
    for (split, key), s in report.stats.items():
        shown = s.numeric and s.compared  # "-": nothing to measure (no numbers in both logs)
        absd, rel = (number(s.max_abs), number(s.max_rel)) if shown else ("-", "-")
        lines.append(f"{split:<6} {key:<{width}} {absd:>10} {rel:>10} "
                     f"{f'{s.differing}/{s.compared}':>10} {s.missing:>8}")
    for (split, holder), steps in sorted(report.only.items(), key=lambda kv: split_rank(kv[0][0])):
        lines.append(f"{split} steps only in {report.name(holder)}: {ranges(steps)} ({len(steps)})")
    lines.append(f"first difference: {describe(report.first, report.names)}")
    lines.append(f"{len(report.differences)} differences in all ({tolerance(report)})")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m reference.compare",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("a", help="a metrics.jsonl (yours)")
    p.add_argument("b", help="another metrics.jsonl (the reference)")
    p.add_argument("--rtol", type=float, default=0.0,
                   help="relative tolerance, for runs on other machines or thread counts "
                        "(default 0: bit for bit)")
    p.add_argument("--atol", type=float, default=0.0, help="absolute tolerance (default 0)")
    p.add_argument("--max-step", type=int, default=None,
                   help="compare only steps <= N (after a drift, only early steps mean much)")
    p.add_argument("--ignore", action="append", default=[], metavar="KEY",
                   help="a method metric not to compare (repeatable; not a required key)")
    args = p.parse_args(argv)
    try:
        report = diff_files(args.a, args.b, args.rtol, args.atol, args.max_step, args.ignore)
    except OSError as e:
        print(f"error: {e.filename}: {e.strerror}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_report(report))
    return 0 if report.identical else 1


if __name__ == "__main__":
    sys.exit(main())

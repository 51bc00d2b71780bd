"""Diff two metrics.jsonl files step by step.

    python -m reference.compare A/metrics.jsonl B/metrics.jsonl [--rtol 0 --atol 0]

Prints "identical" (exit 0), or the first step and key whose values differ beyond the
tolerance, with both values (exit 1). Keys that only one file has are listed but not compared;
wall-clock keys (seconds, time, generation fraction) are never compared."""
import argparse
import json
import math
import sys

VOLATILE = ("seconds", "time", "fraction")  # wall-clock measurements


def load(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def records_by_key(records):
    return {(r.get("split", "train"), r["step"]): r for r in records}


def compare(a_records, b_records, rtol=0.0, atol=0.0):
    """(differences, notes): the differences found in step order, and notes on keys or steps one
    side lacks. Each difference is (split, step, key, a_value, b_value)."""
    a, b = records_by_key(a_records), records_by_key(b_records)
    diffs, notes = [], []
    missing = sorted(set(a) ^ set(b))
    if missing:
        notes.append(f"{len(missing)} (split, step) records are in only one file, e.g. {missing[0]}")
    only = set()
    for key in sorted(set(a) & set(b), key=lambda k: (k[1], k[0])):
        ra, rb = a[key], b[key]
        only |= set(ra) ^ set(rb)
        for name in sorted(set(ra) & set(rb)):
            if any(v in name for v in VOLATILE):
                continue
            va, vb = ra[name], rb[name]
            if not values_match(va, vb, rtol, atol):
                diffs.append((key[0], key[1], name, va, vb))
    if only:
        notes.append(f"keys in only one file (not compared): {sorted(only)}")
    if missing and not (set(a) & set(b)):
        diffs.append(("-", "-", "records", len(a_records), len(b_records)))
    return diffs, notes


def values_match(va, vb, rtol, atol):
    if isinstance(va, (int, float)) and isinstance(vb, (int, float)):
        if math.isnan(va) or math.isnan(vb):
            return math.isnan(va) and math.isnan(vb)
        return abs(va - vb) <= atol + rtol * abs(vb)
    return va == vb


def max_abs_diff(a_records, b_records, key="loss", split="train"):
    """The largest |a - b| of `key` over the steps both files have for `split`."""
    a = {r["step"]: r[key] for r in a_records if r.get("split", "train") == split and key in r}
    b = {r["step"]: r[key] for r in b_records if r.get("split", "train") == split and key in r}
    common = sorted(set(a) & set(b))
    if not common:
        raise ValueError(f"no {split} steps with {key!r} in common")
    return max(abs(a[s] - b[s]) for s in common)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m reference.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--rtol", type=float, default=0.0, help="relative tolerance (default 0: bitwise)")
    p.add_argument("--atol", type=float, default=0.0, help="absolute tolerance (default 0)")
    args = p.parse_args(argv)
    diffs, notes = compare(load(args.a), load(args.b), args.rtol, args.atol)
    for note in notes:
        print(f"note: {note}")
    if not diffs:
        print("identical")
        return 0
    split, step, key, va, vb = diffs[0]
    print(f"differ: first at {split} step {step}, key {key!r}: {va!r} vs {vb!r} "
          f"({len(diffs)} differing values in all)")
    return 1


if __name__ == "__main__":
    sys.exit(main())

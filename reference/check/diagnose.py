"""Reading a run's output against the reference's: `check_outputs` finds what keeps a run from
being compared (a missing log or summary, keys that the reference logs and yours does not),
`diagnose` looks a first difference up in its chapter's table (`TABLES`: the `RULES` that can
name the chapter's lessons in its stages) and returns a `Diagnosis`, and `compared` and
`format_table` put a difference and a table in words."""
import json
import os
from typing import NamedTuple

from ..compare import REQUIRED, LogError, load
from .launch import Problem
from .lessons import CHAPTERS, LESSONS, RETAUGHT, TITLES, lineage
from .rules import CRASHES, RULES, Facts
from .stages import stages

SUMMARY_KEYS = ("eval_accuracy", "final_loss", "steps", "train_seconds")


def check_outputs(out, stage, ref_out):
    """Problems of a finished run's folder: missing files, an unreadable log, keys that the
    reference logs and yours does not. Returns the keys yours logs and the reference does not
    (not compared)."""
    extra = set()
    for phase in stage.phases:
        path = os.path.join(out, phase, "metrics.jsonl")
        if not os.path.exists(path):
            raise Problem(f"your run wrote no {os.path.relpath(path, out)} in {out}: every run "
                          "writes DIR/metrics.jsonl" + (" and DIR/sft/metrics.jsonl for the SFT "
                                                        "phase" if "sft" in stage.phases else ""),
                          "schema")
        try:
            mine = load(path)
        except LogError as e:
            raise Problem(f"your metrics log cannot be read: {e}", "schema") from None
        ref = load(os.path.join(ref_out, phase, "metrics.jsonl"))
        for split in ("train", "eval"):
            have = set().union(*[r for r in mine if r.get("split", "train") == split] or [set()])
            want = set().union(*[r for r in ref if r.get("split", "train") == split] or [set()])
            missing = sorted(want - have - {"split"})
            if split == "train":
                missing = sorted(set(missing) | {k for k in REQUIRED if k not in have})
            if missing and (have or split == "train"):
                where = f"{phase}/metrics.jsonl" if phase else "metrics.jsonl"
                raise Problem(f"wrong schema: the {split} records of your {where} lack "
                              f"{', '.join(repr(k) for k in missing)} (the reference logs them)",
                              "schema")
            extra |= have - want - {"step", "split"}
    path = os.path.join(out, "summary.json")
    if not os.path.exists(path):
        raise Problem(f"your run wrote no summary.json in {out}: a run ends by writing "
                      f"DIR/summary.json with at least {', '.join(SUMMARY_KEYS)}", "schema")
    try:
        with open(path) as f:
            summary = json.load(f)
    except (OSError, ValueError) as e:
        raise Problem(f"your summary.json cannot be read: {e}", "schema") from None
    missing = [k for k in SUMMARY_KEYS if not isinstance(summary, dict) or k not in summary]
    if missing:
        raise Problem(f"wrong schema: your summary.json lacks {', '.join(missing)}", "schema")
    return extra


# --- The diagnosis tables ---------------------------------------------------------------------

class Diagnosis(NamedTuple):
    lesson: str  # a key of LESSONS, or "" when no entry fits
    title: str
    chapter: str
    where: str
    when: str  # the table entry that matched
    also: tuple  # other lessons that fit the same evidence


def scopes(chapter):
    return ("any", "sft") + (("dpo",) if chapter == "04" else ()) + \
        (("grpo",) if chapter == "05" else ())


def table(chapter):
    """Chapter `chapter`'s diagnosis table: the rules that can name one of its lessons (of its
    lineage, less those it teaches anew) in one of its stages, in the order they are tried."""
    kinds, taught, anew = {s.kind for s in stages(chapter)}, lineage(chapter), \
        RETAUGHT.get(chapter, ())
    return [r._replace(also=tuple(x for x in r.also if x not in anew)) for r in RULES
            if r.scope in scopes(chapter) and r.lesson not in anew
            and all(LESSONS[x].chapter in taught for x in (r.lesson, *r.also))
            and (not r.kinds or kinds & set(r.kinds))]


TABLES = {nn: table(nn) for nn in CHAPTERS}


def diagnose(chapter, stage, phase, report, mine, ref):
    """The Diagnosis of `report`'s first difference: the first entry of chapter `chapter`'s
    table that fits. mine and ref are {(split, step): record} of the two logs."""
    f = Facts(chapter, stage, phase, report, mine, ref)
    for rule in TABLES[chapter]:
        if rule.scope not in ("any", f.method) or (rule.kinds and stage.kind not in rule.kinds):
            continue
        try:
            fits = rule.test(f)
        except (KeyError, TypeError, ZeroDivisionError):
            fits = False
        if fits:
            lesson = LESSONS[rule.lesson]
            return Diagnosis(rule.lesson, lesson.title, lesson.chapter, lesson.where, rule.when,
                             rule.also)
    return Diagnosis("", "no entry of the table fits", chapter, "", "", ())


def by_step(records):
    return {(r.get("split", "train"), r["step"]): r for r in records}


def compared(d):
    """How a value differs, in numbers: the ratio of yours to the reference's."""
    if d.kind != "value" or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                    for v in (d.a, d.b)):
        return ""
    if d.b == 0:
        return f"yours is {d.a!r} where the reference's is 0"
    return (f"yours / the reference's = {d.a / d.b:.6g} (yours - the reference's = "
            f"{d.a - d.b:.3g})")


def format_table(chapter):
    """Chapter `chapter`'s diagnosis table in words."""
    out = [f"Chapter {chapter} ({TITLES[chapter]}): the first entry that fits the first "
           "difference names the lesson."]
    for rule in TABLES[chapter]:
        lesson = LESSONS[rule.lesson]
        scope = {"any": "", "sft": "[SFT] ", "dpo": "[DPO] ", "grpo": "[GRPO] "}[rule.scope]
        also = f" (or: {'; '.join(LESSONS[x].title for x in rule.also)})" if rule.also else ""
        out.append(f"- {scope}{rule.when} -> {lesson.title} ({lesson.chapter}){also}")
    for crash in CRASHES:
        lesson = LESSONS[crash.lesson]
        if lesson.chapter in lineage(chapter):
            out.append(f"- a run that crashed with {crash.text!r} in its stderr ({crash.when}) "
                       f"-> {lesson.title} ({lesson.chapter})")
    return "\n".join(out)

"""The READMEs quote benchmarks/results.json exactly: their results tables are rendered from it
(`python benchmarks/run.py --update-readme` after `make bench`), so a fresh bench run that is not
written in, or a hand-edited number, fails here."""
import importlib.util
import json
import os

import pytest

from conftest import ROOT


def bench_module():
    spec = importlib.util.spec_from_file_location("bench_run",
                                                  os.path.join(ROOT, "benchmarks", "run.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("readme", ["README.md", "README.zh-CN.md"])
def test_readme_results_tables_are_results_json(readme):
    bench = bench_module()
    with open(os.path.join(ROOT, "benchmarks", "results.json")) as f:
        results = json.load(f)
    with open(os.path.join(ROOT, readme)) as f:
        text = f.read()
    start, end = bench.MARKERS
    assert text.count(start) == 1 and text.count(end) == 1, \
        f"{readme} needs one {start} ... {end} block"
    block = text.split(start)[1].split(end)[0].strip()
    assert block == bench.readme_tables(results), \
        f"run `python benchmarks/run.py --update-readme` ({readme})"
    for key in ("trainer_overhead", "dpo_over_sft_precomputed", "kv_cache_speedup",
                "hf_kv_cache_speedup", "ddp_2x1_over_1x1_throughput", "fp32_over_bf16_step_time",
                "grpo_generation_fraction", "fsdp_over_ddp_step_time", "chapter_05_grpo_seconds",
                "chapter_06_fsdp_seconds", "plain_dpo_summary", "seeds"):
        assert key in results, f"benchmarks/results.json lacks {key}: run `make bench`"


def test_readme_links_point_at_files():
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    for target in ("README.zh-CN.md", "docs/05_grpo.png", "tutorial/05_grpo/05_grpo.ipynb",
                   "benchmarks/results.json"):
        assert f"({target})" in text and os.path.exists(os.path.join(ROOT, target)), target


def structure(text):
    """A README's skeleton: its heading levels in order, and the shape of each table (rows and
    columns), which both languages share."""
    lines, fenced = [], False
    for line in text.splitlines():
        fenced ^= line.startswith("```")
        lines.append("" if fenced or line.startswith("```") else line)
    headings = [line.split(" ")[0] for line in lines if line.startswith("#")]
    tables, rows = [], 0
    for line in lines + [""]:
        if line.startswith("|"):
            rows += 1
            columns = line.count("|")
        elif rows:
            tables.append((rows, columns))
            rows = 0
    return headings, tables


def test_both_readmes_have_the_same_sections_and_tables():
    texts = []
    for name in ("README.md", "README.zh-CN.md"):
        with open(os.path.join(ROOT, name)) as f:
            texts.append(f.read())
    english, chinese = map(structure, texts)
    assert english[0] == chinese[0], "README.zh-CN.md must have README.md's sections, in order"
    assert english[1] == chinese[1], "README.zh-CN.md must have README.md's tables, row by row"

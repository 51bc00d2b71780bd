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
                "ddp_2x1_over_1x1_throughput", "fp32_over_bf16_step_time",
                "grpo_generation_fraction", "chapter_05_grpo_seconds"):
        assert key in results, f"benchmarks/results.json lacks {key}: run `make bench`"


def test_readme_links_point_at_files():
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    for target in ("README.zh-CN.md", "docs/05_grpo.png", "tutorial/05_grpo/05_grpo.ipynb",
                   "benchmarks/results.json"):
        assert f"({target})" in text and os.path.exists(os.path.join(ROOT, target)), target

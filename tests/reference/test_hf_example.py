"""reference/examples/hf_grpo_example.py: GRPO on a Hugging Face model with its own tokenizer,
from a random config (nothing downloaded), in one process, from a saved directory (--model),
and under torchrun with two processes (gloo)."""
import importlib.util
import math
import os
import subprocess
import sys

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: a download would fail loudly

import pytest  # noqa: E402
import torch  # noqa: E402

from conftest import ROOT, read_jsonl  # noqa: E402

PATH = os.path.join(ROOT, "reference", "examples", "hf_grpo_example.py")
spec = importlib.util.spec_from_file_location("hf_grpo_example", PATH)
example = importlib.util.module_from_spec(spec)
spec.loader.exec_module(example)


@pytest.fixture(autouse=True)
def one_thread():
    """The example runs in this process: one thread, as torchrun gives each worker, and the
    session's thread count back afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def train_records(out):
    return [r for r in read_jsonl(os.path.join(out, "metrics.jsonl")) if r.get("split") != "eval"]


def test_prompts_differ_in_length_and_the_rewards_check_the_answer():
    tokenizer = example.char_tokenizer()
    tokenizer.padding_side = "left"
    batch = example.PromptCollator(tokenizer, chat=False)(example.make_problems(16, 3, seed=0))
    lengths = batch["prompt_attention_mask"].sum(dim=1)
    assert lengths.min() < lengths.max()  # left-padded: real tokens end every row
    assert bool((batch["prompt_attention_mask"][:, -1] == 1).all())
    assert example.correct_sum(None, ["12", " 12 and more", "13", "x12"], [12, 12, 12, 12]) == \
        [1.0, 1.0, 0.0, 0.0]
    assert example.number_format(None, ["12", "12", "12 apples", "apples"],
                                 ended=[True, False, True, True]) == [1.0, 0.5, 0.5, 0.0]


def test_example_trains_a_random_model_from_a_config_in_one_process(tmp_path):
    summary = example.main(["--out", str(tmp_path), "--max-steps", "12", "--eval-size", "16"])
    records = train_records(tmp_path)
    assert summary["steps"] == 12 and summary["processes"] == 1 and len(records) == 12
    assert all(math.isfinite(v) for r in records for v in r.values() if isinstance(v, float))
    for name in ("correct_sum", "number_format"):  # each reward function's own metrics
        assert any(key.startswith(f"rewards/{name}") for key in records[0]), sorted(records[0])
    assert 0.0 <= summary["eval_accuracy"] <= 1.0
    first, last = (sum(r["reward"] for r in part) / 4 for part in (records[:4], records[-4:]))
    assert last > first + 0.01, (first, last)  # it learns the answer's form


def test_example_loads_a_model_and_tokenizer_from_a_directory(tmp_path):
    tokenizer = example.char_tokenizer()
    torch.manual_seed(0)
    example.tiny_model(tokenizer, "llama").save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    summary = example.main(["--model", str(tmp_path / "model"), "--out", str(tmp_path / "run"),
                            "--max-steps", "2", "--eval-size", "8"])
    assert summary["steps"] == 2 and len(train_records(tmp_path / "run")) == 2


def test_example_under_torchrun_with_two_processes(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, HF_HUB_OFFLINE="1",
               TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           PATH, "--out", str(tmp_path), "--max-steps", "3", "--batch-size", "4",
           "--eval-size", "8"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 process(es), step 3" in r.stdout, r.stdout
    assert len(train_records(tmp_path)) == 3  # rank 0 alone writes the log

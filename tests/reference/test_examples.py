"""reference/examples/: the single-process example runs and resumes; the distributed one runs
under torchrun."""
import os
import subprocess
import sys

from conftest import ROOT, read_jsonl


def env(**extra):
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    e.update(extra)
    return e


EXAMPLES = os.path.join(ROOT, "reference", "examples")


def test_basic_example_runs_and_resumes(tmp_path):
    cmd = [sys.executable, os.path.join(EXAMPLES, "basic_trainer_example.py"), "--out", str(tmp_path), "--max-steps", "20"]
    r = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(read_jsonl(tmp_path / "metrics.jsonl")) == 20
    r = subprocess.run(cmd[:-1] + ["30", "--resume"], env=env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr[-2000:]
    assert [x["step"] for x in read_jsonl(tmp_path / "metrics.jsonl")] == list(range(1, 31))


def test_distributed_example_under_torchrun(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(EXAMPLES, "distributed_train_example.py"), "--out", str(tmp_path), "--max-steps", "10",
           "--batch-size", "16"]
    r = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "2 process(es), step 10" in r.stdout
    assert len(read_jsonl(tmp_path / "metrics.jsonl")) == 10  # rank 0 alone writes the log

"""Chapter 03 on CPU with gloo: DDP with accumulation, on two nodes on loopback, equals one
process, and checkpoint failure modes.

The bitwise resume after a SIGKILL is tested by tests/scripts/kill_and_resume.py (seeded random
kills, test_reliability.py) and by reference.check's "kill and resume" stage (mid-epoch, with
accumulation, against the reference; test_check.py); torchrun's restart of a killed worker by
the chapter's notebook (section 8, whose verdicts nbval compares), and of the reference
Trainer's by test_examples.py."""
import hashlib
import os
import socket
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, TINY, load_chapter, read_jsonl
from reference import chapters

SCRIPT = os.path.join(ROOT, "tutorial", "03_ddp", "train.py")
# 20 steps of a tiny model; every process sees 16 sequences per step in total
BASE = ["--max-steps", "20", "--eval-every", "10", "--eval-size", "50", "--n-embd", "32",
        "--n-layer", "1", "--amp", "off", "--seed", "0", "--device", "cpu", "--save-every", "10"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT,
                TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")


def losses(out):
    return [r["loss"] for r in read_jsonl(os.path.join(out, "metrics.jsonl"))]


def final_params(out):
    return torch.load(os.path.join(out, "model.pt"), weights_only=True)["model"]


def assert_close_runs(a, b, rtol=1e-5):
    """Losses and gradient norms to rtol at every step, and the final weights. The gradient
    norm is the check on the world-size factor of each rank's loss scale: DDP averages the
    gradients over the ranks, so without the factor 2 x 8 sequences would have half the gradient
    of 1 x 16, which AdamW's scale invariance hides from the losses and the weights."""
    la, lb = losses(a), losses(b)
    assert len(la) == len(lb) == 20
    torch.testing.assert_close(torch.tensor(la), torch.tensor(lb), rtol=rtol, atol=0)
    ga, gb = ([r["grad_norm"] for r in read_jsonl(os.path.join(out, "metrics.jsonl"))]
              for out in (a, b))
    torch.testing.assert_close(torch.tensor(ga), torch.tensor(gb), rtol=rtol, atol=0)
    pa, pb = final_params(a), final_params(b)
    for name in pa:  # relative to the tensor's norm: elementwise, a weight near 0 has no scale
        assert (pa[name] - pb[name]).norm() <= rtol * pb[name].norm(), name


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The baseline: 1 process x batch 16, in-process."""
    out = str(tmp_path_factory.mktemp("one") / "run")
    load_chapter("03").main(BASE + ["--batch-size", "16", "--out", out])
    return out


def test_two_nodes_with_accumulation_equal_one_process(one_process, tmp_path):
    """Two torchrun launches on loopback, one process each (the two-machine command with
    --master_addr=127.0.0.1), every step 2 micro-batches of 4 per process: DDP's no_sync on the
    first, an all-reduce on the second. The second node's process is global rank 1 but local
    rank 0, and must not write. (The chapter under one --standalone torchrun is test_check.py's
    spawned two-process stage, bit for bit against the reference, and the notebook's.)"""
    out, port = str(tmp_path / "run"), free_port()
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
         f"--node_rank={rank}", "--master_addr=127.0.0.1", f"--master_port={port}", SCRIPT, *BASE,
         "--batch-size", "4", "--grad-accum-steps", "2", "--out", out],
        env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    results = [node.communicate(timeout=120) for node in nodes]
    assert all(node.returncode == 0 for node in nodes), \
        results[0][1][-2000:] + results[1][1][-2000:]
    assert "held-out exact match" in results[0][0] and "held-out exact match" not in results[1][0]
    assert_close_runs(one_process, out)
    # the logged token count is global: both runs train on the same 16 sequences per step
    assert [r["tokens"] for r in read_jsonl(os.path.join(one_process, "metrics.jsonl"))] == \
           [r["tokens"] for r in read_jsonl(os.path.join(out, "metrics.jsonl"))]


def test_truncated_checkpoint_falls_back_with_a_warning(one_process, tmp_path):
    out = str(tmp_path / "run")
    args = BASE + ["--batch-size", "16", "--out", out]
    chapter = load_chapter("03")
    chapter.main(args)
    newest = os.path.join(out, "checkpoints", "step_000020", "state.pt")
    with open(newest, "r+b") as f:  # what a crash half-way through a write would leave
        f.truncate(os.path.getsize(newest) // 2)
    with pytest.warns(UserWarning, match="skipping checkpoint .*step_000020"):
        summary = chapter.main(args + ["--resume"])
    assert summary["steps"] == 20
    assert losses(out) == losses(one_process)  # resumed from step 10 and redid 11-20 exactly


def test_resume_without_checkpoint_starts_fresh(tmp_path, capsys):
    load_chapter("03").main(BASE + ["--max-steps", "5", "--batch-size", "8", "--out", str(tmp_path),
                                    "--resume"])
    assert "no checkpoint yet, starting fresh" in capsys.readouterr().out
    assert len(losses(str(tmp_path))) == 5


def test_resume_with_a_different_model_size_is_a_clear_error(tmp_path):
    chapter = load_chapter("03")
    chapter.main(BASE + ["--max-steps", "10", "--batch-size", "8", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="does not fit this model"):
        chapter.main(BASE + ["--max-steps", "20", "--batch-size", "8", "--out", str(tmp_path),
                             "--resume", "--n-embd", "48"])


def test_resume_with_a_different_world_size_is_a_clear_error(tmp_path):
    chapter = load_chapter("03")
    chapter.main(BASE + ["--max-steps", "10", "--batch-size", "8", "--out", str(tmp_path)])
    path = os.path.join(tmp_path, "checkpoints", "step_000010", "state.pt")
    state = torch.load(path, weights_only=True)
    state["world_size"] = 2  # as if two processes had written it
    torch.save(state, path)
    with open(path, "rb") as f, open(path + ".sha256", "w") as digest:  # a checksum that matches
        digest.write(hashlib.sha256(f.read()).hexdigest())
    with pytest.raises(ValueError,
                       match="written by 2 process.*this run has 1.*--nproc_per_node=2"):
        chapter.main(BASE + ["--max-steps", "20", "--batch-size", "8", "--out", str(tmp_path),
                             "--resume"])


def test_save_every_zero_is_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        load_chapter("03").get_args(["--save-every", "0"])
    assert "--save-every must be >= 1" in capsys.readouterr().err


def test_a_fresh_run_replaces_an_earlier_runs_checkpoints(tmp_path, capsys):
    chapter = load_chapter("03")
    chapter.main(BASE + ["--max-steps", "20", "--batch-size", "8", "--out", str(tmp_path)])
    chapter.main(BASE + ["--max-steps", "10", "--batch-size", "8", "--out", str(tmp_path),
                         "--seed", "1"])
    assert "removing the previous run's checkpoints" in capsys.readouterr().out
    # only the new run's checkpoints: a later --resume cannot pick up the old step 20
    assert sorted(os.listdir(os.path.join(tmp_path, "checkpoints"))) == ["step_000010"]


def test_a_batch_larger_than_the_shard_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="fewer than one --batch-size 20000"):
        load_chapter("03").main(BASE + ["--batch-size", "20000", "--out", str(tmp_path)])


def test_chapter_03_matches_reference_bitwise(tmp_path):
    argv = TINY + ["--amp", "off", "--grad-accum-steps", "2", "--save-every", "10"]
    load_chapter("03").main(argv + ["--out", str(tmp_path / "ch")])
    chapters.run("03", argv + ["--out", str(tmp_path / "ref")])
    assert read_jsonl(tmp_path / "ch" / "metrics.jsonl") == \
           read_jsonl(tmp_path / "ref" / "metrics.jsonl")
    assert sorted(p.name for p in (tmp_path / "ref" / "checkpoints").iterdir()) == \
           ["step_000020", "step_000030"]

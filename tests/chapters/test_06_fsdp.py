"""Chapter 06 on CPU with gloo: FSDP2 trains as one process does, each rank holds half of the
model and optimizer state, a killed run resumes bit for bit, sharded checkpoints move between
world sizes, checkpoints of the wrong kind or model get clear errors, and `python -m reference
06` (Trainer(parallelism="fsdp")) logs the same bits in one process.

The notebook runs the rest under torchrun, and tests/test_notebooks.py requires its verdicts:
FSDP2 against chapter 03's DDP (section 4), and the reference's two-process run against the
chapter's, bit for bit (section 7)."""
import importlib.util
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.distributed.checkpoint as dcp

from conftest import ROOT, assert_identical_runs, load_chapter, read_jsonl
from reference import chapters

SCRIPT = os.path.join(ROOT, "tutorial", "06_fsdp", "train.py")
# 20 fp32 steps of a tiny model; every run trains on 16 sequences per step in total
BASE = ["--max-steps", "20", "--eval-every", "10", "--eval-size", "50", "--n-embd", "32",
        "--n-layer", "1", "--amp", "off", "--seed", "0", "--device", "cpu", "--save-every", "10"]


def chapter():
    """tutorial/06_fsdp/train.py as a module (conftest's table stops at chapter 05)."""
    spec = importlib.util.spec_from_file_location("chapter_06", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def torchrun(nproc, args, extra=(), timeout=120):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT,
               TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", *extra, SCRIPT, *args]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r


def records(out):
    return read_jsonl(os.path.join(out, "metrics.jsonl"))


def final_params(out):
    return torch.load(os.path.join(out, "model.pt"), weights_only=True)["model"]


def max_relative_difference(a, b, key="loss", steps=range(1, 21)):
    ra, rb = ({r["step"]: r[key] for r in records(out)} for out in (a, b))
    return max(abs(ra[s] - rb[s]) / abs(rb[s]) for s in steps)


def assert_close_runs(a, b, rtol=1e-5, steps=range(1, 21)):
    """Losses and global gradient norms to rtol at every step, the same samples (target token
    counts, exact), and the final weights to rtol of each tensor's norm."""
    ra, rb = records(a), records(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb] == list(range(1, 21))
    for key in ("loss", "grad_norm"):
        assert max_relative_difference(a, b, key, steps) <= rtol, key
    assert [r["tokens"] for r in ra] == [r["tokens"] for r in rb]
    pa, pb = final_params(a), final_params(b)
    assert pa.keys() == pb.keys()
    for name in pa:
        assert (pa[name] - pb[name]).norm() <= rtol * pb[name].norm(), name


def copy_run(out, to, drop=("step_000020",)):
    """A copy of a finished run as if it had been killed after its step-10 checkpoint."""
    shutil.copytree(out, to)
    for name in drop:
        shutil.rmtree(os.path.join(to, "checkpoints", name))
    return str(to)


@pytest.fixture(scope="module")
def fsdp_two(tmp_path_factory):
    """FSDP2, torchrun with 2 processes x batch 8."""
    out = str(tmp_path_factory.mktemp("fsdp_two") / "run")
    torchrun(2, BASE + ["--batch-size", "8", "--out", out])
    return out


@pytest.fixture(scope="module")
def fsdp_one(tmp_path_factory):
    """Chapter 06 as one process (a 1-rank FSDP run, no torchrun) x batch 16, in-process."""
    out = str(tmp_path_factory.mktemp("fsdp_one") / "run")
    chapter().main(BASE + ["--batch-size", "16", "--out", out])
    return out


@pytest.fixture(scope="module")
def plain_one(tmp_path_factory):
    """Chapter 03 as one process x batch 16: no process group, no wrapper."""
    out = str(tmp_path_factory.mktemp("plain_one") / "run")
    load_chapter("03").main(BASE + ["--batch-size", "16", "--out", out])
    return out


def test_fsdp_trains_as_one_process(fsdp_two, fsdp_one, plain_one):
    for other in (fsdp_one, plain_one):
        assert_close_runs(fsdp_two, other)
    print({os.path.basename(os.path.dirname(o)): max_relative_difference(fsdp_two, o)
           for o in (fsdp_one, plain_one)})


def shard_elements(path):
    """{file: tensor elements it holds} from a DCP checkpoint's index."""
    index = dcp.FileSystemReader(path).read_metadata()
    held = {}
    for key, info in index.storage_data.items():
        entry = index.state_dict_metadata[key.fqn]
        if hasattr(entry, "chunks"):  # a tensor (the rest are pickled bytes)
            chunk = next(c for c in entry.chunks if c.offsets == key.offset)
            held[info.relative_path] = held.get(info.relative_path, 0) + math.prod(chunk.sizes)
    return held


def test_each_rank_holds_half_of_the_state(fsdp_two, fsdp_one):
    path = os.path.join(fsdp_two, "checkpoints", "step_000020")
    assert sorted(os.listdir(path)) == [".metadata", "__0_0.distcp", "__1_0.distcp",
                                        "sha256.json", "trainer.pt"]
    assert not [n for n in os.listdir(os.path.dirname(path)) if n.startswith(".tmp_")]
    held = shard_elements(path)
    parameters = sum(t.numel() for t in final_params(fsdp_two).values())
    # the weights and AdamW's two moments, split across the ranks' files (+ one step count per
    # parameter tensor, a replicated scalar that one rank writes)
    steps = len(final_params(fsdp_two))
    assert sum(held.values()) == 3 * parameters + steps
    assert shard_elements(os.path.join(fsdp_one, "checkpoints", "step_000020")) == \
        {"__0_0.distcp": 3 * parameters + steps}
    for name, n in held.items():
        assert 0.45 <= n / (3 * parameters) <= 0.55, (name, n, 3 * parameters)
    print({name: f"{n} elements, {os.path.getsize(os.path.join(path, name))} bytes"
           for name, n in held.items()}, f"whole: {3 * parameters + steps} elements")


def test_a_killed_run_resumes_bitwise(fsdp_two, tmp_path):
    """A worker is SIGKILLed after step 12; torchrun restarts both, they resume from the
    step-10 sharded checkpoint, and every loss and final weight is the uninterrupted run's."""
    out = str(tmp_path / "run")
    r = torchrun(2, BASE + ["--batch-size", "8", "--out", out, "--resume",
                            "--crash-at-step", "12"], extra=["--max-restarts=1"])
    assert "step 10, sample 160 of epoch 0, written by 2 process(es), read by 2" in r.stdout
    assert [x["loss"] for x in records(out)] == [x["loss"] for x in records(fsdp_two)]
    pa, pb = final_params(out), final_params(fsdp_two)
    assert all(torch.equal(pa[k], pb[k]) for k in pa)


def test_two_process_checkpoint_resumes_with_one_process(fsdp_two, tmp_path, capsys):
    """2 x batch 8 -> 1 x batch 8 x 2 micro-batches: the position is 160 global samples, 20 of
    this run's batches (a per-rank count, 10 batches, would replay half of them)."""
    out = copy_run(fsdp_two, tmp_path / "run")
    chapter().main(BASE + ["--batch-size", "8", "--grad-accum-steps", "2", "--resume",
                           "--out", out])
    assert ("step_000010: step 10, sample 160 of epoch 0, written by 2 process(es), read by 1"
            in capsys.readouterr().out)
    assert records(out)[:10] == records(fsdp_two)[:10]  # kept from before the kill
    assert_close_runs(fsdp_two, out, steps=range(11, 21))
    print("max relative loss difference, steps 11-20:",
          max_relative_difference(fsdp_two, out, steps=range(11, 21)))


def test_one_process_checkpoint_resumes_with_two_processes(fsdp_one, fsdp_two, tmp_path):
    out = copy_run(fsdp_one, tmp_path / "run")
    r = torchrun(2, BASE + ["--batch-size", "8", "--resume", "--out", out])
    assert "step 10, sample 160 of epoch 0, written by 1 process(es), read by 2" in r.stdout
    assert_close_runs(fsdp_two, out, steps=range(11, 21))
    assert_close_runs(fsdp_one, out, steps=range(11, 21))


def test_another_global_batch_is_a_clear_error(fsdp_two, tmp_path):
    out = copy_run(fsdp_two, tmp_path / "run")
    with pytest.raises(ValueError, match=r"trained on 16 sequences per step .* this run on "
                                         r"1 x 8 x 1 = 8.*--grad-accum-steps = 16"):
        chapter().main(BASE + ["--batch-size", "8", "--resume", "--out", out])


def test_a_damaged_shard_falls_back_with_a_warning(fsdp_one, tmp_path):
    out = copy_run(fsdp_one, tmp_path / "run", drop=())
    shard = os.path.join(out, "checkpoints", "step_000020", "__0_0.distcp")
    with open(shard, "r+b") as f:  # what a crash half-way through a write would leave
        f.truncate(os.path.getsize(shard) // 2)
    with pytest.warns(UserWarning, match=r"skipping checkpoint .*step_000020: the checksum of "
                                         r"__0_0.distcp does not match"):
        summary = chapter().main(BASE + ["--batch-size", "16", "--resume", "--out", out])
    assert summary["steps"] == 20
    assert records(out) == records(fsdp_one)  # resumed from step 10, redid 11-20 bit for bit


def test_activation_checkpointing_recomputes_and_changes_no_bit(fsdp_one, tmp_path):
    """Each block's training forward runs twice, the second time in backward, and the
    recomputed activations are the same bits."""
    module, training_forwards = chapter(), []
    apply = module.activation_checkpointing

    def spy(block):
        block.attn.register_forward_hook(
            lambda *_: training_forwards.append(torch.is_grad_enabled()))  # eval runs no_grad
        return apply(block)
    module.activation_checkpointing = spy
    out = str(tmp_path / "run")
    module.main(BASE + ["--batch-size", "16", "--activation-checkpointing", "--out", out])
    assert sum(training_forwards) == 2 * 20
    assert records(out) == records(fsdp_one)


def test_bf16_mixed_precision_keeps_fp32_shards(fsdp_one, tmp_path):
    out = str(tmp_path / "run")
    chapter().main(BASE + ["--batch-size", "16", "--mixed-precision", "bf16", "--out", out])
    difference = max_relative_difference(out, fsdp_one)
    assert 0 < difference < 1e-2  # bf16 forward and backward: close to fp32, not equal
    assert all(t.dtype == torch.float32 for t in final_params(out).values())


def test_mixed_precision_replaces_autocast(capsys):
    with pytest.raises(SystemExit):
        chapter().get_args(["--mixed-precision", "bf16", "--amp", "bf16"])
    assert "--mixed-precision bf16 replaces autocast" in capsys.readouterr().err


def test_a_checkpoint_of_another_model_size_is_a_clear_error(fsdp_one, tmp_path):
    out = copy_run(fsdp_one, tmp_path / "run")
    with pytest.raises(ValueError, match=r"does not fit this model .*attn.proj.weight is "
                                         r"\[32, 32\] there and \[48, 48\] here"):
        chapter().main(BASE + ["--batch-size", "16", "--resume", "--n-embd", "48", "--out", out])
    with pytest.raises(ValueError, match=r"does not fit this model .*blocks.1.attn.proj.bias is "
                                         r"missing there"):
        chapter().main(BASE + ["--batch-size", "16", "--resume", "--n-layer", "2", "--out", out])


def test_a_ddp_checkpoint_is_a_clear_error_for_fsdp(plain_one, tmp_path):
    out = copy_run(plain_one, tmp_path / "run")
    with pytest.raises(ValueError, match=r"step_000010 holds state.pt, a chapter 03 \(DDP\) "
                                         r"checkpoint.*tutorial/03_ddp/train.py"):
        chapter().main(BASE + ["--batch-size", "16", "--resume", "--out", out])


def test_an_fsdp_checkpoint_is_not_loaded_by_ddp(fsdp_one, tmp_path):
    """Chapter 03 finds no state.pt in a sharded checkpoint, says so, and stops."""
    out = copy_run(fsdp_one, tmp_path / "run")
    before = sorted(os.listdir(os.path.join(out, "checkpoints", "step_000010")))
    with pytest.warns(UserWarning, match=r"skipping checkpoint .*step_000010: .*state.pt"), \
            pytest.raises(ValueError, match="no checkpoint in .* could be loaded"):
        load_chapter("03").main(BASE + ["--batch-size", "16", "--resume", "--out", out])
    assert sorted(os.listdir(os.path.join(out, "checkpoints", "step_000010"))) == before


def test_chapter_06_matches_reference_bitwise_in_one_process(fsdp_one, tmp_path):
    out = str(tmp_path / "ref")
    chapters.run("06", BASE + ["--batch-size", "16", "--out", out])
    assert_identical_runs(fsdp_one, out)
    assert sorted(os.listdir(os.path.join(out, "checkpoints", "step_000020"))) == \
        [".metadata", "__0_0.distcp", "sha256.json", "trainer.pt"]

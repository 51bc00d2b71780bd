"""FSDP2 for the Trainer (`parallelism="fsdp"`): what chapter 06 teaches, written again.

- `init_process_group`: torchrun's group, or, in one process, a 1-rank gloo/nccl group of its
  own (FSDP shards over a process group even when it has one rank).
- `shard`: `fully_shard` on every repeated block, then on the root, optionally with bf16 mixed
  precision and activation checkpointing; the optimizer, built on the unsharded model, is
  pointed at the sharded parameters (the same groups, in the same order).
- `clip_grad_norm_`: the global norm of gradients that each rank holds a shard of.
- `gathered`: rollouts with a sharded policy. Every forward of a sharded model is a collective
  (its blocks all-gather), so ranks that sample different numbers of tokens would wait on each
  other forever; inside `gathered` each block keeps its weights whole after its first forward,
  so the rest of a generation needs no communication.
- `save_checkpoint`, `load_latest`, `load_state`, `load_shards`: DCP checkpoints
  (`step_XXXXXX/` with a `.metadata` index, one `__RANK_0.distcp` shard file per rank,
  `trainer.pt` and `sha256.json`). DCP reshards on load, so a run may resume with another world
  size when it keeps the global batch: the data position is saved as a global sample count.
- `full_state_dict`: the whole weights on rank 0's CPU, for inference (chapter 06's model.pt).

The frozen reference models of DPO and GRPO stay whole (unsharded) on every rank: they are
never trained, their forwards need no collective, and DPO's `precompute_ref_logps=True` frees
them before training. Nothing here imports a trainer.
"""
import io
import json
import os
import random
import shutil
import warnings
from contextlib import contextmanager

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed._composable import checkpoint as activation_checkpoint
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_state_dict, set_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import (FSDPModule, MixedPrecisionPolicy, fully_shard,
                                    register_fsdp_forward_method)
from torch.distributed.tensor import DTensor

from . import checkpoint as ckpt
from .distributed import all_gather_object, barrier, init_distributed
from .rundir import TMP_PREFIX, fault_point, fsync_dir

SHARDED = ("model", "optimizer")  # in the shard files; trainer.pt holds the rest
# state that a method keeps per rank (GRPO's cached rollouts and sampling streams): it cannot
# move to another world size
PER_RANK_KEYS = ("grpo",)


def init_process_group(device):
    """torchrun's process group, or a 1-rank group of this process (an in-memory store: no port
    is opened). Returns reference.distributed's DistInfo."""
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"parallelism='fsdp' needs a process-group backend for {device.type}: "
                         "gloo serves CPU and nccl CUDA; use device='cpu' or 'cuda'")
    info = init_distributed(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                store=dist.HashStore(), rank=0, world_size=1)
    return info


def check_options(parallelism, mixed_precision, activation_checkpointing, use_amp, amp_dtype):
    """The Trainer's parallelism options, checked before anything starts."""
    if parallelism not in ("ddp", "fsdp"):
        raise ValueError(f"parallelism must be 'ddp' (a whole model per rank) or 'fsdp' (sharded "
                         f"with FSDP2), got {parallelism!r}")
    if mixed_precision not in (None, "off", "bf16"):
        raise ValueError(f"mixed_precision must be 'bf16' or None, got {mixed_precision!r}")
    if parallelism != "fsdp" and (mixed_precision == "bf16" or activation_checkpointing):
        raise ValueError("mixed_precision and activation_checkpointing are options of "
                         "parallelism='fsdp' (under DDP, bf16 is use_amp or amp_dtype='bf16')")
    if mixed_precision == "bf16" and (use_amp or amp_dtype not in (None, "off", "auto")):
        raise ValueError("mixed_precision='bf16' replaces autocast: use it with use_amp=False "
                         "and amp_dtype=None or 'off' (--amp off)")


def blocks_of(model):
    """The repeated layers FSDP shards one by one: the members of each outermost nn.ModuleList
    (TinyGPT's `blocks`, a Hugging Face model's `layers` or `h`)."""
    found, lists = [], []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and \
                not any(name.startswith(outer + ".") for outer in lists):
            lists.append(name)
            found.extend(module)
    return found


def shard(model, optimizer, world_size, mixed_precision=None, activation_checkpointing=False):
    """Shard `model` in place over all `world_size` ranks: each block, in order, then the root
    (embeddings, final norm, head), with FSDP2's default resharding. Every rank built the same
    weights from the same seed; each keeps its 1/world_size of every parameter.

    mixed_precision="bf16": bf16 weights in forward and backward, gradients reduced in fp32, fp32
    shards (and optimizer state); it replaces autocast. `optimizer` was built on the unsharded
    model; its groups are pointed at the sharded parameters, found by name."""
    if optimizer.state:
        raise ValueError("the optimizer has already stepped; FSDP shards the parameters it holds "
                         "state for. Build it fresh on the unsharded model and pass it to the "
                         "Trainer; resume its state from a checkpoint (resume_from)")
    names = {id(p): name for name, p in model.named_parameters()}
    for group in optimizer.param_groups:
        stray = [p for p in group["params"] if id(p) not in names]
        if stray:
            raise ValueError(f"the optimizer holds {len(stray)} parameter(s) that are not the "
                             "model's; build it from model.parameters() (configure_optimizer)")
    device = next(model.parameters()).device
    mesh = init_device_mesh(device.type, (world_size,))
    # bf16 weights make bf16 activations; no input casts, which would copy generate()'s KV cache
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                  cast_forward_inputs=False) \
        if mixed_precision == "bf16" else MixedPrecisionPolicy()
    blocks = blocks_of(model)
    if not blocks:
        warnings.warn("the model has no nn.ModuleList of blocks: FSDP shards it as one unit, "
                      "so every forward gathers all of its weights at once", stacklevel=3)
    for block in blocks:
        if activation_checkpointing:  # backward recomputes what forward would have kept
            activation_checkpoint(block)
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    if callable(getattr(model, "generate", None)):  # generate() gathers as forward() does
        register_fsdp_forward_method(model, "generate")
    sharded = dict(model.named_parameters())
    for group in optimizer.param_groups:
        group["params"] = [sharded[names[id(p)]] for p in group["params"]]
    return model


def local(t):
    """This rank's shard of a DTensor; any other tensor as it is."""
    return t.to_local() if isinstance(t, DTensor) else t


def clip_grad_norm_(params, max_norm=None):
    """The global gradient norm, and, with max_norm, every shard scaled so that it is at most
    max_norm. Each rank sums the squares of its shards, an all-reduce adds the ranks' sums, and
    every rank scales its shards by the same factor, as if the whole gradient were in one
    place."""
    grads = [local(p.grad) for p in params if p.grad is not None]
    squares = torch.stack([g.float().square().sum() for g in grads]).sum()
    if dist.is_initialized():
        dist.all_reduce(squares)
    norm = squares.sqrt()
    if max_norm is not None:
        scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for g in grads:
            g.mul_(scale)
    return norm


def full_state_dict(model):
    """The whole weights as plain tensors on rank 0's CPU, gathered from every rank's shards (a
    collective: call it on every rank; the others get {}): what to save for inference."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                cpu_offload=True))


@contextmanager
def gathered(model):
    """Inside, each FSDP module of `model` keeps its weights whole after its first forward (one
    all-gather per module, in the same order on every rank), so later forwards communicate
    nothing and the ranks may run different numbers of them: a GRPO rollout's generation,
    whose length depends on each rank's samples. On exit the weights are sharded again and
    FSDP2's defaults restored (reshard after forward, except the root). A rank must run at
    least one forward inside if any rank does."""
    if not isinstance(model, FSDPModule):
        yield
        return
    model.set_reshard_after_forward(False)
    try:
        yield
    finally:
        model.set_reshard_after_forward(True)
        model.set_reshard_after_forward(False, recurse=False)  # the root's default
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()


# --- checkpoints ----------------------------------------------------------------------------
def save_checkpoint(checkpoint_dir, step, model, optimizer, state, keep_last=None,
                    batch_size=None, grad_accum_steps=1):
    """checkpoint_dir/step_XXXXXX/, written by every rank: DCP writes each rank's shards of
    the model and optimizer state to its own file, rank 0 adds trainer.pt (`state`, the rest)
    and sha256.json (every file's checksum, each taken by the rank that wrote it). All of it
    goes into a temporary folder that rank 0 renames into place once every rank is done: a
    crash or a full disk mid-save leaves the previous checkpoint the newest complete one.

    trainer.pt adds the data position as sample_in_epoch, the samples of this epoch that all
    ranks together took (an epoch is one permutation, of which each rank takes every
    world_size-th sample, so the count means the same at any world size), and the global batch
    (None, None when the loader does not say its batch_size)."""
    ckpt.check_keep_last(keep_last)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    known = batch_size is not None
    state = dict(state, sample_in_epoch=state["batch_in_epoch"] * world_size * batch_size
                 if known else None,
                 global_batch=world_size * batch_size * grad_accum_steps if known else None)
    final = os.path.join(checkpoint_dir, ckpt.step_dir_name(step))
    tmp = os.path.join(checkpoint_dir, f"{TMP_PREFIX}{ckpt.step_dir_name(step)}")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    barrier()  # the folder exists before any rank writes into it
    try:
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=tmp)
        mine = [name for name in os.listdir(tmp) if name.startswith(f"__{rank}_")]
        if rank == 0:
            buffer = io.BytesIO()
            torch.save(state, buffer)
            write_synced(os.path.join(tmp, "trainer.pt"), buffer.getvalue())
            mine += [".metadata", "trainer.pt"]
            fault_point("save")  # crash tests: killed inside a save
        digests = {name: ckpt.sha256_of(os.path.join(tmp, name)) for name in mine}
    except (OSError, RuntimeError, dcp.CheckpointException) as err:  # most often a full disk
        digests = f"rank {rank}: {type(err).__name__}: {ckpt.first_line(err)}"
    everyone = all_gather_object(digests)  # so that every rank fails together, or none does
    failed = [d for d in everyone if isinstance(d, str)]
    if failed:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = ckpt.list_checkpoints(checkpoint_dir)
        intact = (f"The previous checkpoint, {previous[-1]}, is intact" if previous else
                  "No earlier checkpoint exists")
        raise ckpt.CheckpointError(
            f"could not write the step {step} checkpoint in {checkpoint_dir} ({failed[0]}). Is "
            f"the disk full, or the folder not writable? {intact}: free some space and resume "
            "with --resume (resume_from='latest').")
    if rank == 0:
        digests = dict(sorted(item for d in everyone for item in d.items()))
        write_synced(os.path.join(tmp, "sha256.json"), json.dumps(digests, indent=1).encode())
        fsync_dir(tmp)
        if os.path.exists(final):  # the same step saved again, after a fallback
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(checkpoint_dir)
        if keep_last is not None:
            for old in ckpt.list_checkpoints(checkpoint_dir)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    barrier()  # nobody runs ahead (or reads) before the rename
    return final


def write_synced(path, data):
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def verify(path, required_keys=()):
    """trainer.pt of the checkpoint folder `path`, after every file that sha256.json lists has
    matched its checksum (each rank checks its share, and the ranks agree) and trainer.pt has
    every key of required_keys that it should hold. Raises CheckpointError saying why not."""
    def fail(reason):
        return ckpt.CheckpointError(f"checkpoint {path} cannot be used: {reason}", reason=reason)

    if os.path.exists(os.path.join(path, ckpt.STATE_FILE)):  # not damage: another kind of run
        raise ValueError(f"{path} holds {ckpt.STATE_FILE}, a checkpoint of a DDP run (the whole "
                         "state in one file). parallelism='fsdp' resumes from sharded DCP "
                         "checkpoints (.metadata and a __RANK_0.distcp per rank): resume it with "
                         "parallelism='ddp', or use another out_dir")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    error, state = None, None
    try:
        with open(os.path.join(path, "sha256.json")) as f:
            digests = json.load(f)
        for name in sorted(digests)[rank::world_size]:
            if ckpt.sha256_of(os.path.join(path, name)) != digests[name]:
                raise ValueError(f"the checksum of {name} does not match: the file changed after "
                                 "it was written (a crash mid-write, disk damage or a bad copy)")
        state = torch.load(os.path.join(path, "trainer.pt"), map_location="cpu",
                           weights_only=True)
        missing = [k for k in required_keys if k not in state and k not in SHARDED]
        if missing:
            raise ValueError(f"trainer.pt lacks the key(s) {', '.join(map(repr, missing))}")
    except Exception as err:  # noqa: BLE001 - unreadable for any reason: "try the one before"
        error = str(err) if isinstance(err, ValueError) else \
            f"unreadable ({type(err).__name__}: {ckpt.first_line(err)})"
    errors = [e for e in all_gather_object(error) if e is not None]
    if errors:  # every rank takes the same checkpoint, or none
        raise fail(errors[0])
    state["shards"] = path
    return state


def load_state(path, map_location="cpu", required_keys=()):
    """The checkpoint folder `path`, verified (see `verify`); its shards are read by
    `load_shards`. The signature of reference.checkpoint.load_state."""
    if not os.path.isdir(path):
        path = os.path.dirname(path)  # a file inside the folder
    return verify(path, required_keys)


def load_latest(checkpoint_dir, map_location="cpu", required_keys=()):
    """(path, trainer.pt state) of the newest checkpoint that verifies, or (None, None) when
    there is none; a damaged one is skipped with a warning that says why. The signature of
    reference.checkpoint.load_latest."""
    paths = ckpt.list_checkpoints(checkpoint_dir)
    problems = []
    for path in reversed(paths):
        try:
            return path, verify(path, required_keys)
        except ckpt.CheckpointError as err:
            problems.append(f"{os.path.basename(path)}: {err.reason}")
            warnings.warn(f"skipping checkpoint {path}: {err.reason}", stacklevel=2)
    if problems:
        raise ckpt.CheckpointError(
            f"none of the {len(paths)} checkpoints in {checkpoint_dir} can be used "
            f"({'; '.join(problems)}). Restore a good copy, or start over without --resume "
            "(resume_from=None), which replaces them.")
    return None, None


def load_shards(model, optimizer, state, world_size, rank, batch_size, grad_accum_steps,
                source="checkpoint"):
    """Read the model and optimizer shards of the verified checkpoint `state` in place: each
    rank reads, from whichever files hold them, the slices that make up its shards now. The
    world size may change; the global batch may not, nor may the data position fall mid-batch.
    Returns `state` with this run's batch_in_epoch and this rank's RNG state: restored for the
    same world size; otherwise new streams (seeded with torch.initial_seed() + 1000 * step +
    rank), the same only in distribution."""
    saved = state["world_size"]
    if saved != world_size:
        kept = [k for k in PER_RANK_KEYS if state.get(k) is not None]
        if kept or state.get("sample_in_epoch") is None or batch_size is None:
            why = (f"it keeps {kept} per rank" if kept else
                   "its train_loader has no batch_size, so its position is per rank")
            raise ValueError(f"{source} was written by {saved} process(es), this run has "
                             f"{world_size}, and {why}: resume with --nproc_per_node={saved}")
        global_batch = world_size * batch_size * grad_accum_steps
        if state["global_batch"] != global_batch:  # the schedule and the position count in it
            raise ValueError(
                f"{source} trained on {state['global_batch']} sequences per step ({saved} "
                f"process(es) x batch size x grad_accum_steps), this run on {world_size} x "
                f"{batch_size} x {grad_accum_steps} = {global_batch}: keep the global batch")
        per_batch = world_size * batch_size
        if state["sample_in_epoch"] % per_batch:
            raise ValueError(f"{source} stopped {state['sample_in_epoch']} samples into its "
                             f"epoch, not a whole number of this run's {per_batch} (processes x "
                             "batch size) per batch; pick a batch size that divides it")
    check_fits(state["shards"], model, source)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    sharded = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(sharded, checkpoint_id=state["shards"])  # in place: each rank reads what it holds
    set_state_dict(model, optimizer, model_state_dict=sharded["model"],
                   optim_state_dict=sharded["optimizer"])
    state = dict(state)
    if saved != world_size:
        state["batch_in_epoch"] = state["sample_in_epoch"] // (world_size * batch_size)
        seed = torch.initial_seed() + 1000 * state["step"] + rank
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        state["rng"] = [ckpt.rng_state() if r == rank else None for r in range(world_size)]
    return state


def check_fits(path, model, source):
    """A clear error, before anything is read, when the checkpoint holds another model."""
    index = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    saved = {k[len("model."):]: list(v.size) for k, v in index.items() if k.startswith("model.")}
    here = {k: list(v.shape) for k, v in model.state_dict().items()}
    differ = sorted(k for k in saved.keys() | here.keys() if saved.get(k) != here.get(k))
    if differ:
        raise ValueError(f"{source} does not fit this model (a different model size?): " +
                         "; ".join(f"{k} is {saved.get(k, 'missing')} there and "
                                   f"{here.get(k, 'missing')} here" for k in differ[:3]))


def nonfinite(named_tensors):
    """The names of the tensors holding inf/NaN, over every rank's shards (a collective)."""
    bad = {name for name, t in named_tensors
           if t.is_floating_point() and not torch.isfinite(local(t)).all()}
    return sorted(set().union(*all_gather_object(sorted(bad))))

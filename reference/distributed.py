"""torchrun detection, process-group set-up and teardown, and the few collectives the trainers use.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK for every process it starts; seeing them is all the
configuration DDP needs. Without them everything here is a cheap no-op, so one code path serves
a single process and many.
"""
import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def torchrun_env() -> DistInfo:
    """The rank, world size and local rank torchrun set, or a single process's defaults."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistInfo()
    return DistInfo(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                    int(os.environ.get("LOCAL_RANK", 0)))


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group torchrun prepared: nccl for CUDA, gloo for CPU. Idempotent."""
    info = torchrun_env()
    if not info.enabled or dist.is_initialized():
        return info
    if device.type == "cuda":
        torch.cuda.set_device(info.local_rank)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return info


def teardown(barrier=True):
    """Leave the process group. On success the barrier comes first: under torchrun restarts, a
    rank that destroys its group while another still talks to it leaves that one with a broken
    mesh. After an error there is no barrier, since the other ranks may be gone.

    Whatever still holds the group in a reference cycle (a DDP or FSDP model, kept by a finished
    trainer) is freed first, while the group and the interpreter are alive: freed during
    interpreter shutdown instead, it can abort the process after a run that succeeded
    ("terminate called without an active exception", seen once in a clean-clone `make test`)."""
    if dist.is_available() and dist.is_initialized():
        try:
            gc.collect()
            if barrier:
                dist.barrier()
        finally:
            dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(tensor: torch.Tensor, async_op=False):
    """Sum over every rank, in place; returns the tensor for chaining. With async_op, starts
    the all-reduce and returns its work handle (`.wait()` before reading the tensor), or None
    when there is nothing to wait for (a single process)."""
    if not is_distributed():
        return None if async_op else tensor
    work = dist.all_reduce(tensor, op=dist.ReduceOp.SUM, async_op=async_op)
    return work if async_op else tensor


def barrier():
    if is_distributed():
        dist.barrier()


def all_gather_object(obj) -> list:
    """Every rank's `obj`, in rank order (a list of one outside DDP)."""
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out

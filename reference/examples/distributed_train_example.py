"""The reference trainer under torchrun: one global batch, the same run on 1, 2 or 4 processes.

    python reference/examples/distributed_train_example.py                # one process
    torchrun --standalone --nproc_per_node=4 reference/examples/distributed_train_example.py
    # two machines (run one line on each; the first machine's address as --master_addr):
    torchrun --nnodes=2 --nproc_per_node=1 --node_rank=0 --master_addr=10.0.0.1 \\
        --master_port=29500 reference/examples/distributed_train_example.py
    torchrun --nnodes=2 --nproc_per_node=1 --node_rank=1 --master_addr=10.0.0.1 \\
        --master_port=29500 reference/examples/distributed_train_example.py

The batch is global: every optimizer step trains on --global-batch-size sequences however many
processes share them. Each process takes global / world_size of them, in micro-batches of
--micro-batch-size (default: all of them at once); when a micro-batch is smaller, the rest is
gradient accumulation. One global order of the data is cut into global batches, and the
trainer divides the loss by the token count over every micro-batch and rank, so 1, 2 or 4
processes compute the same mean gradient and log the same losses, up to float rounding (about
1e-7 relative in fp32: the ranks add the same numbers in another order). Training amplifies
such differences after a few dozen steps, so the runs end as equally good models, not
bitwise equal ones. DDP is detected from torchrun's environment; only rank 0 logs and writes
checkpoints, and every rank loads them on --resume.
"""
import argparse
import os
import shutil
import time

import torch
from torch.utils.data import DistributedSampler

from reference import SFTTrainer
from reference.data import (CharTokenizer, SFTCollator, SFTDataset, exact_match,
                            make_addition_splits)
from reference.distributed import teardown, torchrun_env
from reference.model import GPTConfig, TinyGPT
from reference.optimizer import configure_optimizer, warmup_cosine_scheduler


class GlobalBatchSampler(DistributedSampler):
    """This rank's share of every global batch.

    Each epoch is one permutation of the dataset, the same on every rank and for every world
    size, cut into global batches of `global_batch_size`; rank r takes every world_size-th
    index from position r. Read in micro-batches, rank r's part of optimizer step s is
    positions s*G .. (s+1)*G - 1 of the permutation taken with stride world_size, so the ranks
    together train on exactly the global batch one process would. The permutation's tail that
    fills no whole global batch waits for the next epoch, so no step straddles two epochs.
    (A plain DistributedSampler drops a tail that depends on the world size.)"""

    def __init__(self, dataset, global_batch_size, num_replicas, rank, seed=0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed,
                         drop_last=True)
        self.steps_per_epoch = len(dataset) // global_batch_size
        self.total_size = self.steps_per_epoch * global_batch_size
        self.num_samples = self.total_size // num_replicas

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)  # set_epoch reshuffles
        order = torch.randperm(len(self.dataset), generator=g)[:self.total_size]
        return iter(order[self.rank::self.num_replicas].tolist())

    def __len__(self):
        return self.num_samples


def batch_layout(global_batch, micro_batch, world_size, n_train):
    """(per-process batch, micro-batch, accumulation steps), or a ValueError naming the fix."""
    if global_batch < 1 or global_batch > n_train:
        raise ValueError(f"--global-batch-size must be between 1 and the {n_train} training "
                         f"sequences, got {global_batch}")
    if global_batch % world_size:
        raise ValueError(f"--global-batch-size {global_batch} does not split evenly over "
                         f"{world_size} processes; use a multiple of {world_size}, such as "
                         f"{global_batch // world_size * world_size or world_size}")
    per_process = global_batch // world_size
    micro_batch = per_process if micro_batch is None else micro_batch
    if micro_batch < 1 or per_process % micro_batch:
        divisors = [d for d in range(1, per_process + 1) if per_process % d == 0]
        raise ValueError(f"--micro-batch-size {micro_batch} must divide the per-process batch "
                         f"{per_process} (--global-batch-size {global_batch} / {world_size} "
                         f"processes); use one of {divisors}")
    return per_process, micro_batch, per_process // micro_batch


def set_threads(threads, env):
    """CPU threads per process. torchrun sets OMP_NUM_THREADS=1 only when --nproc_per_node > 1,
    so a two-node run with one process per node would use every core per process. The thread
    count changes how fp32 reductions are split, which changes the losses' last digits, which
    800 steps amplify into a different model: one thread per process whenever there are several
    processes, however they were launched, makes two nodes equal --standalone."""
    if threads is None and env.world_size > 1 and "OMP_NUM_THREADS" not in os.environ:
        threads = 1
    if threads is not None:
        torch.set_num_threads(threads)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/example_ddp")
    p.add_argument("--max-steps", type=int, default=800)
    p.add_argument("--global-batch-size", type=int, default=256,
                   help="sequences per optimizer step, summed over every process")
    p.add_argument("--micro-batch-size", "--batch-size", type=int, default=None,
                   help="sequences per forward pass on each process (default: global / "
                        "world_size); smaller means gradient accumulation, same result")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads per process (default: OMP_NUM_THREADS if set, else 1 "
                        "under torchrun with several processes, else all cores)")
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--save-every", type=int, default=200)
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    args = p.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    env = torchrun_env()
    set_threads(args.threads, env)
    torch.manual_seed(0)  # the same initial weights on every rank (DDP also broadcasts rank 0's)

    tok = CharTokenizer()
    train_problems, eval_problems = make_addition_splits(digits=2, n_eval=500, seed=0)
    collate = SFTCollator(tok.pad_id)
    train_set = SFTDataset(train_problems, tok)
    try:
        per_process, micro, accum = batch_layout(args.global_batch_size, args.micro_batch_size,
                                                 env.world_size, len(train_set))
    except ValueError as err:
        p.error(str(err))
    sampler = GlobalBatchSampler(train_set, args.global_batch_size, env.world_size, env.rank)
    # the loader's own generator: starting an epoch draws nothing from the global RNG, which an
    # exact resume relies on
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=micro, sampler=sampler,
                                               drop_last=True, collate_fn=collate,
                                               generator=torch.Generator().manual_seed(0))
    val_loader = torch.utils.data.DataLoader(SFTDataset(eval_problems, tok), batch_size=256,
                                             collate_fn=collate)
    if env.is_main:
        print(f"global batch {args.global_batch_size} = {env.world_size} process(es) x {accum} "
              f"micro-batch(es) x {micro} sequences, {torch.get_num_threads()} thread(s) each")
        checkpoints = os.path.join(args.out, "checkpoints")
        if not args.resume and os.path.isdir(checkpoints):  # a rerun replaces the last run
            print(f"starting fresh: removing the previous run's checkpoints in {checkpoints}")
            shutil.rmtree(checkpoints)

    cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=12, n_layer=2, n_head=4, n_embd=64)
    model = TinyGPT(cfg)
    optimizer = configure_optimizer(model=model, optimizer_type="adamw", lr=5e-3,
                                    weight_decay=0.1)
    trainer = SFTTrainer(
        model=model, optimizer=optimizer, train_loader=train_loader, val_loader=val_loader,
        device="auto", max_epochs=None, max_steps=args.max_steps, grad_accum_steps=accum,
        use_amp=False, max_grad_norm=1.0,
        scheduler=warmup_cosine_scheduler(optimizer, 30, args.max_steps),
        eval_every=args.eval_every,
        # the model's own device; naming `trainer` here would put it in a reference cycle
        eval_fn=lambda m: {"accuracy": exact_match(m, eval_problems, tok,
                                                   device=next(m.parameters()).device)},
        out_dir=args.out, save_every=args.save_every, keep_last=2,
        resume_from="latest" if args.resume else None)
    start = time.perf_counter()
    try:
        history = trainer.train()
    except BaseException:
        teardown(barrier=False)  # the other ranks may be gone: don't wait for them
        raise
    teardown()
    if trainer.dist.is_main:
        evals = [r for r in history if r.get("split") == "eval"]
        result = f"held-out exact match {evals[-1]['accuracy']:.3f}; " if evals else ""
        print(f"{trainer.dist.world_size} process(es), step {trainer.step}: {result}"
              f"{time.perf_counter() - start:.1f} s; metrics in {args.out}/metrics.jsonl")
    return trainer


if __name__ == "__main__":
    main()

"""The reference trainer under torchrun: DDP is detected from the environment, nothing to configure.

    torchrun --standalone --nproc_per_node=4 reference/examples/distributed_train_example.py
    # two machines (run one line on each; the first machine's address as --master_addr):
    torchrun --nnodes=2 --nproc_per_node=1 --node_rank=0 --master_addr=10.0.0.1 --master_port=29500 \\
        reference/examples/distributed_train_example.py
    torchrun --nnodes=2 --nproc_per_node=1 --node_rank=1 --master_addr=10.0.0.1 --master_port=29500 \\
        reference/examples/distributed_train_example.py

Each process trains on its shard of the data (DistributedSampler) with micro-batches of
--batch-size; the loss is normalized by the global token count, so N processes x batch B
train like one process with batch N*B. Only rank 0 logs and writes checkpoints; every rank
loads them on --resume. Also runs as a plain `python` command (one process).
"""
import argparse

import torch

from reference import SFTTrainer
from reference.data import CharTokenizer, SFTCollator, SFTDataset, exact_match, make_addition_splits
from reference.distributed import teardown, torchrun_env
from reference.model import GPTConfig, TinyGPT
from reference.optimizer import configure_optimizer, warmup_cosine_scheduler


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/example_ddp")
    p.add_argument("--max-steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=64, help="micro-batch per process")
    p.add_argument("--resume", action="store_true")
    args = p.parse_args(argv)
    torch.manual_seed(0)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    env = torchrun_env()

    tok = CharTokenizer()
    train_problems, eval_problems = make_addition_splits(digits=2, n_eval=500, seed=0)
    collate = SFTCollator(tok.pad_id)
    train_set = SFTDataset(train_problems, tok)
    sampler = torch.utils.data.DistributedSampler(train_set, num_replicas=env.world_size, rank=env.rank,
                                                  shuffle=True, seed=0, drop_last=True)
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, sampler=sampler,
                                               drop_last=True, collate_fn=collate,
                                               generator=torch.Generator().manual_seed(0))
    val_loader = torch.utils.data.DataLoader(SFTDataset(eval_problems, tok), batch_size=256, collate_fn=collate)

    model = TinyGPT(GPTConfig(vocab_size=tok.vocab_size, block_size=12, n_layer=2, n_head=4, n_embd=64))
    optimizer = configure_optimizer(model=model, optimizer_type="adamw", lr=5e-3, weight_decay=0.1)
    trainer = SFTTrainer(
        model=model, optimizer=optimizer, train_loader=train_loader, val_loader=val_loader,
        device="auto", max_epochs=None, max_steps=args.max_steps, grad_accum_steps=1, use_amp=False,
        max_grad_norm=1.0, scheduler=warmup_cosine_scheduler(optimizer, 30, args.max_steps),
        eval_every=100, eval_fn=lambda m: {"accuracy": exact_match(m, eval_problems, tok, device=trainer.device)},
        out_dir=args.out, save_every=100, resume_from="latest" if args.resume else None)
    try:
        history = trainer.train()
    except BaseException:
        teardown(barrier=False)  # the other ranks may be gone: don't wait for them
        raise
    teardown()
    if trainer.dist.is_main:
        evals = [r for r in history if r.get("split") == "eval"]
        print(f"{trainer.dist.world_size} process(es), step {trainer.step}: held-out exact match "
              f"{evals[-1]['accuracy']:.3f}; metrics in {args.out}/metrics.jsonl")
    return trainer


if __name__ == "__main__":
    main()

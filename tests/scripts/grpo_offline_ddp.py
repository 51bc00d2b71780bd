"""Offline GRPO on fixed grouped data, in one process or under torchrun: 10 steps per config.

Each dataset item is one whole group (num_samples_per_prompt rows), so a DistributedSampler
shuffles and shards groups, never rows. Every run trains on the same groups per step in total
(`--groups-per-step`), however many processes and micro-batches share them. Rank 0 writes each
config's losses, grad norms and final parameters to `--out` (torch.save).

    python tests/scripts/grpo_offline_ddp.py --out one.pt
    torchrun --nproc_per_node=2 tests/scripts/grpo_offline_ddp.py --out two.pt --grad-accum-steps 2
"""
import argparse
import copy

import torch
from torch.utils.data import DataLoader, DistributedSampler

from reference import GRPOTrainer
from reference.distributed import teardown, torchrun_env
from reference.model import GPTConfig, TinyGPT

G, T, VOCAB = 4, 10, 14
CONFIGS = {
    "grpo_two_iterations": dict(loss_type="grpo", num_iterations=2),
    "dapo_batch_scale_kl_two_iterations": dict(loss_type="dapo", scale_rewards="batch", beta=0.1,
                                               num_iterations=2),
    "dr_grpo_no_scale": dict(loss_type="dr_grpo", scale_rewards="none"),
}


def make_groups(n_groups=24, seed=0):
    """Each group: G rows of a shared random prompt, random responses of 1..6 tokens, right-padded,
    and 0/1/2 rewards (so some groups have all-equal rewards)."""
    g = torch.Generator().manual_seed(seed)
    groups = []
    for _ in range(n_groups):
        prompt_len = int(torch.randint(2, 5, (), generator=g))
        ids = torch.randint(2, VOCAB, (G, T), generator=g)
        ids[:, :prompt_len] = ids[0, :prompt_len]
        ends = prompt_len + torch.randint(1, 7, (G, 1), generator=g)
        pos = torch.arange(T)
        groups.append({"input_ids": torch.where(pos < ends, ids, 0),
                       "response_mask": ((pos >= prompt_len) & (pos < ends)).long(),
                       "rewards": torch.randint(0, 3, (G,), generator=g).float()})
    return groups


def collate(groups):
    return {key: torch.cat([grp[key] for grp in groups]) for key in groups[0]}


def train(config, groups, env, args):
    torch.manual_seed(0)
    model = TinyGPT(GPTConfig(vocab_size=VOCAB, block_size=T, n_layer=1, n_head=2, n_embd=16))
    ref = copy.deepcopy(model) if config.get("beta") else None
    if ref is not None:  # a reference that differs from the start, so the KL term is not 0
        with torch.no_grad():
            for p in ref.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    per_rank = args.groups_per_step // (env.world_size * args.grad_accum_steps)
    sampler = DistributedSampler(groups, num_replicas=env.world_size, rank=env.rank, shuffle=True,
                                 seed=0, drop_last=True)
    loader = DataLoader(groups, batch_size=per_rank, sampler=sampler, drop_last=True,
                        collate_fn=collate)
    trainer = GRPOTrainer(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2),
                          train_loader=loader, num_samples_per_prompt=G, device="cpu",
                          ref_model=ref, max_completion_length=T, max_steps=10,
                          grad_accum_steps=args.grad_accum_steps, progress=False, **config)
    history = trainer.train()
    return {"loss": [r["loss"] for r in history], "grad_norm": [r["grad_norm"] for r in history],
            "params": {k: v.clone() for k, v in model.state_dict().items()}}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--groups-per-step", type=int, default=4)
    p.add_argument("--grad-accum-steps", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(1)
    env = torchrun_env()
    groups = make_groups()
    try:
        results = {name: train(config, groups, env, args) for name, config in CONFIGS.items()}
    except BaseException:
        teardown(barrier=False)
        raise
    if env.rank == 0:
        torch.save(results, args.out)
    teardown()


if __name__ == "__main__":
    main()

"""Known bugs for `python -m reference.check`: each one a small text patch to a copy of a
chapter's train.py, and the lesson that check's diagnosis should name.

    python tests/scripts/check_mutants.py [NN ...]

runs check on every mutant (of the chapters given, default all) and prints a table: caught or
not, the lesson named, the stage and the first difference. tests/reference/test_check.py runs
the same mutants and asserts that check catches every one and names the lesson of at least 80%.
"""
import os
import sys
import tempfile
import time
from typing import NamedTuple

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHAPTERS = {"01": "01_loop", "02": "02_amp", "03": "03_ddp", "04": "04_dpo", "05": "05_grpo",
            "06": "06_fsdp"}  # 06 branches off 03: FSDP2 and DCP


class Mutant(NamedTuple):
    chapter: str
    name: str  # the bug, in words
    old: str  # text of tutorial/NN_*/train.py, found exactly once
    new: str  # what replaces it
    lesson: str  # the key of reference.check.LESSONS that the diagnosis should name


CLIP = "grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)"
UNSCALE = "scaler.unscale_(optimizer)  # clip the true gradients, not the loss-scaled ones"
SET_EPOCH = ('        loader.sampler.set_epoch(position["epoch"])  # the shuffle is a function '
             'of (seed, epoch)\n')

MUTANTS = [
    # chapter 01: the plain loop
    Mutant("01", "no label shift: the logits at t scored against the token at t",
           "logits, targets = logits[:, :-1, :], labels[:, 1:]", "targets = labels", "loss"),
    Mutant("01", "the loss's divisor counts every real token, the prompt's too",
           'n = (batch["labels"][:, 1:] != -100).sum()', 'n = batch["attention_mask"][:, 1:].sum()',
           "targets"),
    Mutant("01", "warmup off by one: the first step has lr 0",
           "return (step + 1) / warmup_steps", "return step / warmup_steps", "schedule"),
    Mutant("01", "weight decay on every parameter, biases and LayerNorm included",
           "decay = [p for p in model.parameters() if p.dim() >= 2 and id(p) not in embeddings]\n"
           "    no_decay = [p for p in model.parameters() if p.dim() < 2 or id(p) in embeddings]",
           "decay = [p for p in model.parameters() if id(p) not in embeddings]\n"
           "    no_decay = [p for p in model.parameters() if id(p) in embeddings]", "optimizer"),
    Mutant("01", "no zero_grad: gradients pile up over the steps",
           "        optimizer.zero_grad(set_to_none=True)\n", "", "optimizer"),
    Mutant("01", "a random draw between the seed and the model",
           "    model = TinyGPT(cfg).to(args.device)",
           "    torch.rand(1)  # a stray draw\n    model = TinyGPT(cfg).to(args.device)", "init"),
    # chapter 02: mixed precision, accumulation, clipping
    Mutant("02", "a mean of micro-batch means",
           "scaler.scale(part * (1 / counts[0])).backward()",
           "scaler.scale(part / count_fn(batch)[0] / len(micro)).backward()", "accumulation"),
    Mutant("02", "zero_grad in the micro-batch loop: only the last micro-batch's gradient",
           "        optimizer.zero_grad(set_to_none=True)\n        for batch in micro:\n",
           "        for batch in micro:\n            optimizer.zero_grad(set_to_none=True)\n",
           "accumulation"),
    Mutant("02", "clipping before unscaling", f"        {UNSCALE}\n        {CLIP}\n",
           f"        {CLIP}\n        {UNSCALE}\n", "clipping"),
    Mutant("02", "grad_norm logged after clipping", CLIP,
           CLIP.replace("grad_norm = ", "") + "\n        grad_norm = torch.nn.utils."
           "get_total_norm([p.grad for p in model.parameters() if p.grad is not None])",
           "clipping"),
    Mutant("02", "no clipping", CLIP, CLIP.replace("args.max_grad_norm", "math.inf"), "clipping"),
    # chapter 03: DDP, checkpoints, resume
    Mutant("03", "no set_epoch: every epoch in the first one's order", SET_EPOCH, "",
           "ddp_sampler"),
    Mutant("03", "every rank reads shard 0", "num_replicas=args.world_size, rank=args.rank,",
           "num_replicas=args.world_size, rank=0,", "ddp_sampler"),
    Mutant("03", "no world-size factor: DDP's mean over ranks left as a mean",
           "scaler.scale(part * (args.world_size / counts[0])).backward()",
           "scaler.scale(part * (1 / counts[0])).backward()", "ddp_sum"),
    Mutant("03", "the step's counts not summed over the ranks",
           "counting = dist.all_reduce(counts, async_op=True) if args.world_size > 1 else None",
           "counting = None", "ddp_sum"),
    Mutant("03", "resume forgets the data position (epoch, batch in epoch)",
           "        progress[key] = state[key]\n",
           '        progress[key] = state[key] if key in ("step", "skipped_steps") '
           'else progress[key]\n', "resume_data"),
    Mutant("03", "resume forgets the optimizer state (AdamW's moments)",
           '    optimizer.load_state_dict(state["optimizer"])\n', "", "resume_state"),
    # chapter 04: DPO
    Mutant("04", "sequence log-probs averaged over tokens instead of summed",
           "return torch.where(targets != -100, per_token, 0.0).sum(dim=-1)",
           "return torch.where(targets != -100, per_token, 0.0).sum(dim=-1) / "
           "(targets != -100).sum(dim=-1)", "dpo_logps"),
    Mutant("04", "the policy is its own reference (no frozen copy)",
           "ref_model = copy.deepcopy(model).eval().requires_grad_(False)", "ref_model = model",
           "dpo_reference"),
    Mutant("04", "the DPO loss's sign flipped", "losses = -F.logsigmoid(args.beta * logits)",
           "losses = -F.logsigmoid(-args.beta * logits)", "dpo_loss"),
    Mutant("04", "RPO's NLL summed over the answer instead of averaged per token",
           'nll = -chosen / (batch["chosen_labels"][:, 1:] != -100).sum(dim=1)', "nll = -chosen",
           "dpo_loss"),
    Mutant("04", "the DPO loss averaged over tokens instead of pairs",
           "return torch.tensor(len(labels[0])), sum((side != -100).sum() for side in labels)",
           "n = sum((side != -100).sum() for side in labels)\n    return n, n", "dpo_count"),
    # chapter 05: GRPO
    Mutant("05", "the advantage's sign flipped",
           "return (centered / (grouped.std(dim=1, keepdim=True) + 1e-4)).view(-1)",
           "return (-centered / (grouped.std(dim=1, keepdim=True) + 1e-4)).view(-1)",
           "grpo_advantages"),
    Mutant("05", "the population std (correction 0) in the advantage",
           "(grouped.std(dim=1, keepdim=True) + 1e-4)",
           "(grouped.std(dim=1, keepdim=True, correction=0) + 1e-4)", "grpo_advantages"),
    Mutant("05", "groups strided across prompts instead of G contiguous rows",
           "    grouped = rewards.view(-1, G)\n",
           "    grouped = rewards.view(G, -1).t().contiguous()\n", "grpo_advantages"),
    Mutant("05", "the loss averaged over all tokens, not per completion",
           "losses = torch.where(mask, per_token, 0.0).sum(dim=1) / mask.sum(dim=1).clamp(min=1)",
           "losses = torch.where(mask, per_token, 0.0).sum(dim=1) / mask.sum() * len(mask)",
           "grpo_loss"),
    Mutant("05", "the policy not in the KL term (detached)",
           'd = torch.where(mask, batch["ref_logps"], 0.0) - logps',
           'd = torch.where(mask, batch["ref_logps"], 0.0) - logps.detach()', "grpo_kl"),
    Mutant("05", "no clip of the ratio",
           "clipped = torch.clamp(ratio, 1 - args.clip_eps, 1 + args.clip_eps)",
           "clipped = ratio", "grpo_clip"),
    Mutant("05", "pi_old never kept: the ratio is 1 on reused completions too",
           "if args.num_iterations > 1 else None", "if False else None", "grpo_clip"),
    Mutant("05", "the sampler's RNG not restored on resume",
           '        args.generator.set_state(state["rng"][args.rank]["sampler"])\n', "",
           "grpo_rng"),
    Mutant("05", "every rank samples from the same stream",
           "manual_seed(args.seed + args.rank)", "manual_seed(args.seed)", "grpo_rng"),
    # chapter 06: FSDP2, DCP checkpoints, the global sample position
    Mutant("06", "the clip's norm is each rank's own: its squares never all-reduced",
           "    dist.all_reduce(squares)\n", "", "fsdp_clip"),
    Mutant("06", "the data position counts one rank's samples, not all ranks'",
           "batches = forever(train_loader, progress, args.world_size * args.batch_size)",
           "batches = forever(train_loader, progress, args.batch_size)", "fsdp_position"),
    Mutant("06", "resume dcp.loads the shards but never calls set_state_dict (AdamW starts over)",
           '    set_state_dict(model, optimizer, model_state_dict=sharded["model"],\n'
           '                   optim_state_dict=sharded["optimizer"])\n', "", "fsdp_checkpoint"),
    Mutant("06", "the root left out of fully_shard (embeddings, final norm and head unsharded)",
           "    fully_shard(model, mesh=mesh, mp_policy=policy)\n", "", "fsdp_shard"),
]


def source(chapter):
    with open(os.path.join(ROOT, "tutorial", CHAPTERS[chapter], "train.py")) as f:
        return f.read()


def apply(mutant, folder):
    """Write the chapter's train.py with the mutant's patch to folder/NN_i.py; returns the path.
    Raises ValueError when the patch's old text is not in the file exactly once."""
    text = source(mutant.chapter)
    count = text.count(mutant.old)
    if count != 1:
        raise ValueError(f"mutant {mutant.name!r}: its old text is in tutorial/"
                         f"{CHAPTERS[mutant.chapter]}/train.py {count} times, not once")
    path = os.path.join(folder, f"mutant_{mutant.chapter}_{MUTANTS.index(mutant):02d}.py")
    with open(path, "w") as f:
        f.write(text.replace(mutant.old, mutant.new))
    return path


def main(chapters):
    sys.path.insert(0, ROOT)
    from reference.check import check, close
    rows, named = [], 0
    with tempfile.TemporaryDirectory() as tmp:
        for mutant in MUTANTS:
            if chapters and mutant.chapter not in chapters:
                continue
            start = time.perf_counter()
            result = check(mutant.chapter, apply(mutant, tmp), work=os.path.join(tmp, "work"))
            got = result.diagnosis.lesson if result.diagnosis else ""
            named += got == mutant.lesson
            where = (f"{result.stage.name}: {result.problem or result.report.first}"
                     if result.stage else "")
            rows.append(f"{mutant.chapter} {'caught' if result.status else 'MISSED'} "
                        f"{'named' if got == mutant.lesson else 'OTHER'} "
                        f"{time.perf_counter() - start:5.1f}s  {mutant.name}: expected "
                        f"{mutant.lesson}, got {got or '-'} ({result.status}; {where})")
            print(rows[-1], flush=True)
    close()
    print(f"{named}/{len(rows)} named")


if __name__ == "__main__":
    main(sys.argv[1:])

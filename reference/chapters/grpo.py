"""Chapter 05's experiment with the reference trainers: SFTTrainer to a weak start, then
GRPOTrainer, online, on the model's own samples scored by `reference.rewards`. The same data,
model, random draws, sampling stream (generation_seed = --seed, plus the rank) and output layout
as `tutorial/05_grpo/train.py`: DIR/sft/ holds the SFT phase, DIR/metrics.jsonl and
DIR/checkpoints/ the GRPO phase. With --method dpo it is chapter 04's experiment.

`python -m reference 05 [flags]` calls `chapters.run("05", argv)`, which calls `run_grpo`."""
import copy
import time

from ..data import PromptCollator, PromptDataset, exact_match
from .dpo import run_dpo
from .common import sharded_loader, trainer_options, weak_start, write_summary
from ..grpo import GRPOTrainer
from ..optimizer import configure_optimizer, warmup_cosine_scheduler
from ..rewards import correctness_reward, format_reward


def run_grpo(args):
    if args.method == "dpo":
        return run_dpo(args)
    phase1 = weak_start(args, "05")  # phase 1: SFT to a weak start, in DIR/sft
    model, tok, device, eval_problems, sft = phase1.model, phase1.tok, phase1.device, phase1.eval_problems, phase1.sft
    sft_seconds = phase1.seconds

    # phase 2: GRPO on the model's own samples; evaluated as the SFT phase is (held-out loss, exact match)
    start = time.perf_counter()
    # prompts, left-padded for generation, --batch-size of them per micro-batch (each sampled G times)
    prompts = sharded_loader(PromptDataset(phase1.train_problems, tok), args.batch_size, PromptCollator(tok.pad_id),
                             args.seed)
    rewards, weights = [correctness_reward], [1.0]
    if args.format_reward_weight > 0:
        rewards, weights = rewards + [format_reward], weights + [args.format_reward_weight]
    optimizer = configure_optimizer(model=model, optimizer_type="adamw", lr=args.grpo_lr,
                                    weight_decay=args.weight_decay)
    grpo = GRPOTrainer(
        model=model, optimizer=optimizer, train_loader=prompts, device=device,
        num_samples_per_prompt=args.num_samples_per_prompt, clip_eps=args.clip_eps, reward_fn=rewards,
        reward_weights=weights, tokenizer=tok, ref_model=copy.deepcopy(model) if args.beta > 0 else None,
        beta=args.beta, num_iterations=args.num_iterations, loss_type=args.loss_type, temperature=args.temperature,
        top_k=args.top_k, max_completion_length=args.max_completion_length or args.digits + 2,
        generation_seed=args.seed, max_steps=args.max_steps,
        scheduler=warmup_cosine_scheduler(optimizer, args.grpo_warmup_steps, args.max_steps),
        eval_every=args.eval_every, out_dir=args.out,
        eval_fn=lambda m: {k: v for k, v in sft.evaluate().items() if k in ("loss", "accuracy")},
        **trainer_options(args))
    eval_accuracy_sft = exact_match(model, eval_problems, tok, device=device)  # the starting point
    history = grpo.train()
    grpo_seconds = time.perf_counter() - start
    last_eval = ([r for r in history if r.get("split") == "eval"] or [{}])[-1]
    return write_summary(args, grpo, history, sft_seconds + grpo_seconds,
                         eval_accuracy_sft=eval_accuracy_sft, eval_accuracy_grpo=last_eval.get("accuracy"),
                         sft_steps=args.sft_steps, sft_seconds=sft_seconds, grpo_seconds=grpo_seconds)

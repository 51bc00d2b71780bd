"""Chapter 05's experiment with the reference trainers: SFTTrainer to a weak start, then
GRPOTrainer, online, on the model's own samples scored by `reference.rewards`. The same data,
model, random draws, sampling stream (generation_seed = --seed, plus the rank) and output layout
as `tutorial/05_grpo/train.py`: DIR/sft/ holds the SFT phase, DIR/metrics.jsonl and
DIR/checkpoints/ the GRPO phase. With --method dpo it is chapter 04's experiment.

`python -m reference 05 [flags]` calls `chapters.run("05", argv)`, which calls `run_grpo`."""
import copy
import time

from ..data import PromptCollator, PromptDataset, exact_match, max_answer_tokens
from ..grpo import GRPOTrainer
from ..optimizer import configure_optimizer, warmup_cosine_scheduler
from ..rewards import correctness_reward
from .common import sharded_loader, trainer_options, weak_start, write_summary
from .dpo import run_dpo


def run_grpo(args):
    if args.method == "dpo":
        return run_dpo(args)
    phase1 = weak_start(args, "05")  # phase 1: SFT to a weak start, in DIR/sft
    model, tok, device = phase1.model, phase1.tok, phase1.device
    eval_accuracy_sft = exact_match(model, phase1.eval_problems, tok, device=device)

    # phase 2: GRPO on the model's own samples, judged as phase 1 was (held-out loss, exact match)
    start = time.perf_counter()
    # prompts, left-padded for generation, --batch-size of them per micro-batch (each sampled G
    # times)
    prompts = sharded_loader(PromptDataset(phase1.train_problems, tok), args.batch_size,
                             PromptCollator(tok.pad_id), args.seed)
    optimizer = configure_optimizer(model=model, optimizer_type="adamw", lr=args.grpo_lr,
                                    weight_decay=args.weight_decay)
    grpo = GRPOTrainer(
        model=model, optimizer=optimizer, train_loader=prompts, device=device,
        num_samples_per_prompt=args.num_samples_per_prompt, clip_eps=args.clip_eps,
        reward_fn=correctness_reward, tokenizer=tok, beta=args.grpo_beta,
        ref_model=copy.deepcopy(model) if args.grpo_beta > 0 else None,
        num_iterations=args.num_iterations, temperature=args.temperature,
        max_completion_length=args.max_completion_length or max_answer_tokens(args.digits),
        generation_seed=args.seed, max_steps=args.max_steps, eval_every=args.eval_every,
        scheduler=warmup_cosine_scheduler(optimizer, args.grpo_warmup_steps, args.max_steps),
        out_dir=args.out, eval_fn=phase1.evaluate, **trainer_options(args))
    history = grpo.train()
    seconds = time.perf_counter() - start
    return write_summary(args, grpo, history, phase1.seconds + seconds,
                         from_eval={"eval_accuracy_grpo": "accuracy"},
                         eval_accuracy_sft=eval_accuracy_sft, sft_steps=phase1.sft.step,
                         sft_seconds=phase1.seconds, grpo_seconds=seconds)

"""Chapter 04's experiment with the reference trainers: SFTTrainer to a weak start, then
DPOTrainer against a frozen copy of it. The same data, model, random draws and output layout as
`tutorial/04_dpo/train.py`: DIR/sft/ holds the SFT phase, DIR/metrics.jsonl and DIR/checkpoints/
the DPO phase.

`python -m reference 04 [flags]` calls `chapters.run("04", argv)`, which calls `run_dpo`."""
import copy
import time

import torch

from ..data import PreferenceCollator, PreferenceDataset, exact_match
from ..dpo import DPOTrainer, preference_accuracy
from .common import sharded_loader, trainer_options, weak_start, write_summary
from ..optimizer import configure_optimizer, warmup_cosine_scheduler


def pair_loaders(args, tok, train_problems, eval_problems):
    """Preference pairs on the same problems as the SFT phase: train sharded by a
    DistributedSampler, held-out pairs for the DPO eval loss and preference accuracy."""
    collate = PreferenceCollator(tok.pad_id)
    train_loader = sharded_loader(PreferenceDataset(train_problems, tok, seed=args.seed), args.batch_size, collate,
                                  args.seed)
    val_loader = torch.utils.data.DataLoader(PreferenceDataset(eval_problems, tok, seed=args.seed),
                                             batch_size=256, collate_fn=collate)
    return train_loader, val_loader


def run_dpo(args):
    phase1 = weak_start(args, "04")  # phase 1: SFT to a weak start, in DIR/sft
    model, tok, device, eval_problems = phase1.model, phase1.tok, phase1.device, phase1.eval_problems
    sft_seconds = phase1.seconds

    # phase 2: DPO against a frozen copy of the SFT model
    start = time.perf_counter()
    pairs, val_pairs = pair_loaders(args, tok, phase1.train_problems, eval_problems)
    optimizer = configure_optimizer(model=model, optimizer_type="adamw", lr=args.dpo_lr,
                                    weight_decay=args.weight_decay)
    dpo = DPOTrainer(
        model=model, ref_model=copy.deepcopy(model), optimizer=optimizer, train_loader=pairs,
        val_loader=val_pairs, beta=args.beta, device=device, loss_type=args.loss_type,
        label_smoothing=args.label_smoothing, precompute_ref_logps=args.precompute_ref_logps,
        pad_token_id=tok.pad_id, rpo_alpha=args.rpo_alpha or None, max_steps=args.max_steps,
        scheduler=warmup_cosine_scheduler(optimizer, args.dpo_warmup_steps, args.max_steps),
        eval_every=args.eval_every, out_dir=args.out,
        eval_fn=lambda m: {"accuracy": exact_match(m, eval_problems, tok, device=device),
                           "pref_accuracy": preference_accuracy(m, val_pairs, device=device)},
        **trainer_options(args))
    eval_accuracy_sft = exact_match(model, eval_problems, tok, device=device)  # the starting point
    pref_accuracy_sft = preference_accuracy(model, val_pairs, device=device)
    history = dpo.train()
    dpo_seconds = time.perf_counter() - start
    last_eval = ([r for r in history if r.get("split") == "eval"] or [{}])[-1]
    return write_summary(args, dpo, history, sft_seconds + dpo_seconds,
                         eval_accuracy_sft=eval_accuracy_sft, eval_accuracy_dpo=last_eval.get("accuracy"),
                         pref_accuracy_sft=pref_accuracy_sft, pref_accuracy_dpo=last_eval.get("pref_accuracy"),
                         sft_steps=args.sft_steps, sft_seconds=sft_seconds, dpo_seconds=dpo_seconds)

"""Chapter 04's experiment with the reference trainers: SFTTrainer to a weak start, then
DPOTrainer against a frozen copy of it. The same data, model, random draws and output layout as
`tutorial/04_dpo/train.py`: DIR/sft/ holds the SFT phase, DIR/metrics.jsonl and
DIR/checkpoints/ the DPO phase.

`python -m reference 04 [flags]` calls `chapters.run("04", argv)`, which calls `run_dpo`."""
import copy
import time

import torch

from ..data import PreferenceCollator, PreferenceDataset, exact_match
from ..dpo import DPOTrainer, preference_accuracy
from ..optimizer import configure_optimizer, warmup_cosine_scheduler
from .common import sharded_loader, trainer_options, weak_start, write_summary


def run_dpo(args):
    phase1 = weak_start(args, "04")  # phase 1: SFT to a weak start, in DIR/sft
    model, tok, device = phase1.model, phase1.tok, phase1.device
    eval_accuracy_sft = exact_match(model, phase1.eval_problems, tok, device=device)

    # phase 2: DPO against a frozen copy of the SFT model
    start = time.perf_counter()
    collate = PreferenceCollator(tok.pad_id)
    pairs = sharded_loader(PreferenceDataset(phase1.train_problems, tok, seed=args.seed),
                           args.batch_size, collate, args.seed)
    val_pairs = torch.utils.data.DataLoader(
        PreferenceDataset(phase1.eval_problems, tok, seed=args.seed), batch_size=256,
        collate_fn=collate)
    optimizer = configure_optimizer(model=model, optimizer_type="adamw", lr=args.dpo_lr,
                                    weight_decay=args.weight_decay)

    def pref_accuracy(m):
        return preference_accuracy(m, val_pairs, device=device, pad_token_id=tok.pad_id)

    dpo = DPOTrainer(
        model=model, ref_model=copy.deepcopy(model), optimizer=optimizer, train_loader=pairs,
        val_loader=val_pairs, beta=args.beta, device=device, pad_token_id=tok.pad_id,
        rpo_alpha=args.rpo_alpha or None, max_steps=args.max_steps, eval_every=args.eval_every,
        scheduler=warmup_cosine_scheduler(optimizer, args.dpo_warmup_steps, args.max_steps),
        out_dir=args.out, eval_fn=lambda m: {
            "accuracy": exact_match(m, phase1.eval_problems, tok, device=device),
            "pref_accuracy": pref_accuracy(m)},
        **trainer_options(args))
    pref_accuracy_sft = pref_accuracy(model)
    history = dpo.train()
    seconds = time.perf_counter() - start
    return write_summary(args, dpo, history, phase1.seconds + seconds,
                         from_eval={"eval_accuracy_dpo": "accuracy",
                                    "pref_accuracy_dpo": "pref_accuracy"},
                         eval_accuracy_sft=eval_accuracy_sft, pref_accuracy_sft=pref_accuracy_sft,
                         sft_steps=phase1.sft.step, sft_seconds=phase1.seconds,
                         dpo_seconds=seconds)

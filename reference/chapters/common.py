"""What every chapter's experiment shares: its flags, the SFT loaders and phase, the model, the
output folder's fresh start and summary.json."""
import json
import math
import os
import shutil
import signal
import time
from types import SimpleNamespace

import torch
from torch.utils.data.distributed import DistributedSampler

from ..data import CharTokenizer, SFTCollator, SFTDataset, exact_match, make_addition_splits
from .. import rundir
from ..distributed import torchrun_env
from ..metrics import METRICS_FILE, read_metrics
from ..model import GPTConfig, TinyGPT
from ..optimizer import configure_optimizer, warmup_cosine_scheduler
from ..runtime import resolve_amp_dtype, resolve_device
from ..sft import SFTTrainer, heldout_loss
from .flags import get_args  # noqa: F401 - the chapters' flags, re-exported

def trainer_options(args, crash=True):
    """The Trainer arguments that a chapter's flags stand for; earlier chapters lack the flags.
    crash=False leaves out --crash-at-step (the first phase of chapters 04 and 05). Chapter 06's
    flags (--mixed-precision, --activation-checkpointing) mean FSDP2."""
    fsdp = hasattr(args, "mixed_precision")
    return {"parallelism": "fsdp" if fsdp else "ddp",
            "mixed_precision": getattr(args, "mixed_precision", None),
            "activation_checkpointing": getattr(args, "activation_checkpointing", False),
            "grad_accum_steps": getattr(args, "grad_accum_steps", 1),
            "amp_dtype": getattr(args, "amp", "off"),
            "max_grad_norm": getattr(args, "max_grad_norm", None),
            "save_every": getattr(args, "save_every", None),
            "keep_last": getattr(args, "keep_last", None),
            "resume_from": "latest" if getattr(args, "resume", False) else None,
            "step_callback": crash_at(getattr(args, "crash_at_step", None) if crash else None)}


def crash_at(step):
    """The chapters' --crash-at-step, a fault demo: after that step (and its checkpoint, if any)
    the last rank SIGKILLs itself, on the first attempt only, so a torchrun restart goes on."""
    def crash(trainer):
        first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        if trainer.step == step and first_attempt and \
                trainer.dist.rank == trainer.dist.world_size - 1:
            os.kill(os.getpid(), signal.SIGKILL)  # a hard crash: no cleanup, no goodbye
    return None if step is None else crash


def sft_loaders(args, tok, train_problems, eval_problems, chapter):
    """Chapters 01-02 shuffle with a seeded generator; from 03 on (06 included) a
    DistributedSampler shards the data (with one replica in a single process, so the order is
    the same either way)."""
    collate = SFTCollator(tok.pad_id)
    train_set = SFTDataset(train_problems, tok)
    if chapter >= "03":
        train_loader = sharded_loader(train_set, args.batch_size, collate, args.seed)
    else:
        train_loader = torch.utils.data.DataLoader(
            train_set, batch_size=args.batch_size, shuffle=True, drop_last=True, collate_fn=collate,
            generator=torch.Generator().manual_seed(args.seed))
    val_loader = torch.utils.data.DataLoader(SFTDataset(eval_problems, tok), batch_size=256,
                                             collate_fn=collate)
    return train_loader, val_loader


def sharded_loader(dataset, batch_size, collate, seed):
    """This rank's shard of `dataset`, reshuffled every epoch by a DistributedSampler (one replica
    outside torchrun: the whole dataset). The loader's own generator means that starting an epoch
    draws nothing from the global RNG, which an exact resume relies on."""
    env = torchrun_env()
    sampler = DistributedSampler(dataset, num_replicas=env.world_size, rank=env.rank, shuffle=True,
                                 seed=seed, drop_last=True)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler,
                                       drop_last=True, collate_fn=collate,
                                       generator=torch.Generator().manual_seed(seed))


def weak_start(args, chapter):
    """Phase 1 of chapters 04 and 05: SFT in DIR/sft to a deliberately weak model, stopped at the
    first evaluation whose held-out exact match reaches --sft-target (with --resume, a finished
    phase only loads its end). Both phases' folders start fresh first, and the random draws come
    in the chapter scripts' order. Returns what phase 2 needs, its evaluation included."""
    start_fresh(args, os.path.join(args.out, "sft"), args.out)
    (device, tok, train_problems, eval_problems, train_loader, val_loader, model,
     optimizer) = sft_setup(chapter, args)
    options = trainer_options(args, crash=False)  # --crash-at-step counts phase 2's steps

    def evaluate(m):  # held-out SFT loss and exact match: how phase 2 is judged too
        return {"loss": heldout_loss(m, val_loader, device, resolve_amp_dtype(
                    device, amp_dtype=options["amp_dtype"])),
                "accuracy": exact_match(m, eval_problems, tok, device=device)}

    sft = SFTTrainer(
        model=model, optimizer=optimizer, train_loader=train_loader, device=device,
        max_steps=args.sft_steps, eval_every=args.eval_every, out_dir=os.path.join(args.out, "sft"),
        scheduler=warmup_cosine_scheduler(optimizer, args.warmup_steps, args.sft_steps),
        eval_fn=evaluate, stop_fn=lambda record: record["accuracy"] >= args.sft_target, **options)
    start = time.perf_counter()
    sft.train()
    return SimpleNamespace(sft=sft, model=model, tok=tok, device=device, evaluate=evaluate,
                           train_problems=train_problems, eval_problems=eval_problems,
                           seconds=time.perf_counter() - start)


def sft_setup(chapter, args):
    """What every SFT run builds, with its random draws in the chapter scripts' order: the seed,
    the data and its loaders, then the model and its optimizer."""
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    tok = CharTokenizer()
    train_problems, eval_problems = make_addition_splits(args.digits, args.eval_size,
                                                         seed=args.seed)
    train_loader, val_loader = sft_loaders(args, tok, train_problems, eval_problems, chapter)
    model = build_model(args, tok, device)
    optimizer = configure_optimizer(model=model, optimizer_type="adamw", lr=args.lr,
                                    weight_decay=args.weight_decay)
    return (device, tok, train_problems, eval_problems, train_loader, val_loader, model,
            optimizer)


def build_model(args, tok, device):
    cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=4 * args.digits + 4,
                    n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd)
    return TinyGPT(cfg).to(device)


def start_fresh(args, *outs):
    """Take each of `outs` (default: --out; a two-phase chapter passes both of its phases'
    folders) for this run, and clear what earlier runs left there. Rank 0, the writer, locks
    each folder until write_summary (or the end of the process): a second run on it fails at
    once, naming this one's PID, instead of deleting its files. Under the lock, the half-written
    `.tmp_*` leftovers of killed runs go; then, like the chapter scripts, a run without --resume
    replaces an earlier run's checkpoints."""
    if not torchrun_env().is_main:
        return
    for out in outs or (args.out,):
        rundir.lock_out_dir(out)
        path = os.path.join(out, "checkpoints")
        rundir.remove_stale_temporaries(out, path)
        if not getattr(args, "resume", False) and os.path.isdir(path):
            print(f"starting fresh: removing the previous run's checkpoints in {path}")
            # renamed first, in one atomic step: a kill part-way leaves no half-deleted checkpoint
            # that a later --resume could pick up (the next start removes the .tmp_ folder)
            doomed = os.path.join(out, f"{rundir.TMP_PREFIX}removed_checkpoints_{os.getpid()}")
            os.replace(path, doomed)
            shutil.rmtree(doomed)
        summary = os.path.join(out, "summary.json")
        if not getattr(args, "resume", False) and os.path.exists(summary):
            os.remove(summary)  # the replaced run's: a resume of this one must not report it


def run_sft(chapter, args):
    start_fresh(args)
    (device, tok, train_problems, eval_problems, train_loader, val_loader, model,
     optimizer) = sft_setup(chapter, args)
    scheduler = warmup_cosine_scheduler(optimizer, args.warmup_steps, args.max_steps)
    trainer = SFTTrainer(
        model=model, optimizer=optimizer, train_loader=train_loader, val_loader=val_loader,
        device=device, max_steps=args.max_steps, scheduler=scheduler, eval_every=args.eval_every,
        out_dir=args.out,
        eval_fn=lambda m: {"accuracy": exact_match(m, eval_problems, tok, device=device)},
        **trainer_options(args))
    start = time.perf_counter()
    history = trainer.train()
    return write_summary(args, trainer, history, time.perf_counter() - start)


def write_summary(args, trainer, history, train_seconds, from_eval=None, **extra):
    """summary.json from the last train and eval records (rank 0 only), written whole (a
    temporary file renamed into place); then the run lets go of its folders (start_fresh).
    from_eval maps summary keys to keys of the last eval record; extra adds the rest.

    A resume of a finished run trains nothing: the earlier summary.json stands, or, when a kill
    came between the final checkpoint and this write, it is rebuilt from metrics.jsonl."""
    if not trainer.dist.is_main:
        return None
    try:
        rundir.fault_point("summary")  # crash tests: after the final checkpoint, before this
        path = os.path.join(args.out, "summary.json")
        train = [r for r in history if "split" not in r]
        evals = [r for r in history if r.get("split") == "eval"]
        rebuilt = not train
        if rebuilt:  # resumed from the final checkpoint
            if os.path.exists(path):
                with open(path) as f:
                    earlier = json.load(f)
                if earlier.get("steps") == trainer.step:
                    return earlier
            log = os.path.join(args.out, METRICS_FILE)
            if not os.path.exists(log):
                raise FileNotFoundError(
                    f"the run in {args.out} is finished but has neither summary.json nor "
                    f"{METRICS_FILE} to rebuild it from; run again without --resume")
            train, evals = read_metrics(log, "train"), read_metrics(log, "eval")
            print(f"the run had finished before summary.json was written: rebuilding it from {log}")
        if not math.isfinite(train[-1]["loss"]):
            raise FloatingPointError(
                f"the final loss is {train[-1]['loss']} (step {train[-1]['step']}), not a result: "
                "lower the learning rate (--lr) or use --amp bf16 or off, and run again")
        last_eval = evals[-1] if evals else {}
        summary = {"eval_accuracy": last_eval.get("accuracy"), "eval_loss": last_eval.get("loss"),
                   "final_loss": train[-1]["loss"], "steps": trainer.step,
                   "train_seconds": train_seconds,
                   "parameters": trainer.raw_model.num_parameters(),
                   **{key: last_eval.get(name) for key, name in (from_eval or {}).items()},
                   **extra}
        if rebuilt:  # this process trained nothing: its seconds are not the run's
            summary["rebuilt_from_metrics"] = True
        rundir.atomic_write(path, json.dumps(summary, indent=2))
        accuracy = summary["eval_accuracy"]
        print(f"held-out exact match {accuracy if accuracy is None else format(accuracy, '.3f')} "
              f"after {trainer.step} steps; wrote {args.out}/metrics.jsonl and summary.json")
        return summary
    finally:
        rundir.unlock_under(args.out)

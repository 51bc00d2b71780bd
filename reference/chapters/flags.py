"""Every chapter's flags, stated once per chapter level.

Chapter NN takes the flags of every level up to NN, with the defaults of the latest level that
sets them; a branch takes its parent's levels and its own (chapter 06 is 03 + FSDP: 01-03, 06).
The chapter scripts write the same flags out by hand, for the reader; tests/chapters/
test_flags.py checks each script's parser against this table, so the two cannot drift apart.
"""
import argparse

DEVICES = ["auto", "cpu", "cuda", "mps"]

# level: [(flag, type, default, choices)]; type bool is a store_true switch
LEVELS = {
    "01": [("--out", str, None, None), ("--max-steps", int, 800, None), ("--seed", int, 0, None),
           ("--device", str, "auto", DEVICES), ("--batch-size", int, 256, None),
           ("--lr", float, 5e-3, None), ("--weight-decay", float, 0.1, None),
           ("--warmup-steps", int, 30, None), ("--digits", int, 2, None),
           ("--eval-size", int, 500, None), ("--eval-every", int, 100, None),
           ("--n-layer", int, 2, None), ("--n-head", int, 4, None), ("--n-embd", int, 64, None)],
    "02": [("--grad-accum-steps", int, 1, None),
           ("--amp", str, "auto", ["auto", "off", "bf16", "fp16"]),
           ("--max-grad-norm", float, 1.0, None)],
    "03": [("--save-every", int, 200, None), ("--keep-last", int, 2, None),
           ("--resume", bool, False, None), ("--crash-at-step", int, None, None)],
    "04": [("--sft-steps", int, 1000, None), ("--sft-target", float, 0.4, None),
           ("--beta", float, 0.1, None), ("--dpo-lr", float, 2e-3, None),
           ("--dpo-warmup-steps", int, 10, None), ("--rpo-alpha", float, 1.0, None)],
    "05": [("--method", str, "grpo", ["grpo", "dpo"]), ("--num-samples-per-prompt", int, 8, None),
           ("--clip-eps", float, 0.2, None), ("--num-iterations", int, 1, None),
           ("--temperature", float, 1.0, None), ("--max-completion-length", int, None, None),
           ("--grpo-lr", float, 2e-3, None), ("--grpo-warmup-steps", int, 10, None),
           ("--grpo-beta", float, 0.0, None)],
    "06": [("--mixed-precision", str, "off", ["off", "bf16"]),
           ("--activation-checkpointing", bool, False, None)],
}
PARENTS = {"06": "03"}  # a branch: chapter 06 builds on chapter 03, not on 05
# defaults that a later level changes
DEFAULTS = {
    "04": {"--max-steps": 150, "--batch-size": 64, "--eval-every": 20},
    "05": {"--max-steps": None},  # by --method: 400 of GRPO, 150 of DPO
}
AT_LEAST_ONE = ("max_steps", "batch_size", "eval_every", "eval_size", "grad_accum_steps",
                "save_every", "keep_last", "sft_steps", "num_iterations")


def levels(chapter):
    """The levels chapter `chapter` stands on, in order: every one up to it, or, for a branch,
    its parent's and its own."""
    if chapter in PARENTS:
        return levels(PARENTS[chapter]) + [chapter]
    return [level for level in sorted(LEVELS) if level <= chapter and level not in PARENTS]


def flags(chapter):
    """[(flag, type, default, choices)] of chapter `chapter`, in the order the levels add them.
    --out defaults to runs/reference_NN, beside the chapter script's runs/NN_name."""
    defaults = {"--out": f"runs/reference_{chapter}"}
    for level in levels(chapter):
        defaults.update(DEFAULTS.get(level, {}))
    return [(flag, kind, defaults.get(flag, default), choices)
            for level in levels(chapter) for flag, kind, default, choices in LEVELS[level]]


def parser(chapter):
    p = argparse.ArgumentParser(prog=f"python -m reference {chapter}",
                                description=f"Chapter {chapter}'s experiment, run by the "
                                            "reference trainers.")
    for flag, kind, default, choices in flags(chapter):
        if kind is bool:
            p.add_argument(flag, action="store_true")
        else:
            p.add_argument(flag, type=None if kind is str else kind, default=default,
                           choices=choices)
    return p


def get_args(chapter, argv=None):
    """The flags of tutorial/<chapter>/train.py, with the same names, defaults and checks."""
    p, stands_on = parser(chapter), levels(chapter)
    args = p.parse_args(argv)
    if "05" in stands_on and args.max_steps is None:
        args.max_steps = 150 if args.method == "dpo" else 400
    for name in AT_LEAST_ONE:
        if getattr(args, name, 1) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.lr <= 0 or args.weight_decay < 0 or args.warmup_steps < 0:
        p.error("need --lr > 0, --weight-decay >= 0 and --warmup-steps >= 0")
    if getattr(args, "max_grad_norm", 1.0) <= 0:
        p.error("--max-grad-norm must be > 0")
    if "04" in stands_on and (args.beta <= 0 or args.dpo_lr <= 0 or args.rpo_alpha < 0):
        p.error("need --beta > 0, --dpo-lr > 0 and --rpo-alpha >= 0")
    if "05" in stands_on and args.method == "grpo":
        if args.num_samples_per_prompt < 2:
            p.error("--num-samples-per-prompt must be >= 2: a completion's advantage is its "
                    "reward relative to the others of its group")
        if args.grpo_beta < 0 or args.grpo_lr <= 0 or args.clip_eps < 0 or args.temperature <= 0:
            p.error("need --grpo-beta >= 0, --grpo-lr > 0, --clip-eps >= 0 and --temperature > 0")
        if (args.max_completion_length or 1) < 1:
            p.error("--max-completion-length must be >= 1")
    if "06" in stands_on and args.mixed_precision == "bf16" and args.amp not in ("auto", "off"):
        p.error("--mixed-precision bf16 replaces autocast: use it with --amp off")
    return args

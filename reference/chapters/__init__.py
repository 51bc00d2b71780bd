"""Each chapter's experiment, built from the reference package: the same data, model, seed and
flags as `tutorial/NN/train.py`, so the two runs can be compared number for number.

`python -m reference NN [flags]` calls `run(NN, argv)`."""
from .. import rundir
from ..distributed import teardown
from .common import get_args, run_sft
from .dpo import run_dpo
from .grpo import run_grpo

CHAPTERS = ("01", "02", "03", "04", "05", "06")
__all__ = ["CHAPTERS", "get_args", "run"]


def run(chapter, argv=None):
    """Run chapter `chapter`'s experiment; returns the summary (None on ranks other than 0)."""
    args = get_args(chapter, argv)
    try:
        if chapter == "05":
            summary = run_grpo(args)
        elif chapter == "04":
            summary = run_dpo(args)
        else:  # 01-03, and 06: chapter 03 under FSDP2
            summary = run_sft(chapter, args)
    except BaseException:
        rundir.unlock_under(args.out)  # an in-process run that failed lets go of its folders
        teardown(barrier=False)
        raise
    teardown()
    return summary

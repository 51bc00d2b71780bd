"""Verifiable rewards for the arithmetic task: a program checks the answer, no reward model.

Each reward function has TRL's signature, `reward_fn(prompts, completions, **batch) -> list[float]`,
one float per completion:
- `prompts[i]` is the prompt text that `completions[i]` answers ("07+05="); with several samples
  per prompt, the prompt is repeated once per sample.
- `completions[i]` is the decoded completion, `CharTokenizer.decode`: the text up to the first end
  token, padding dropped. Text alone cannot tell "46<eos>" from a "46" cut off by the length
  limit, so the trainer also passes `ended=[bool, ...]` (True where the completion emitted the
  end token); `format_reward` needs it, `correctness_reward` ignores it.
Anything else in `batch` is ignored, so any reward function can be given the whole batch.
"""
import math
import re

PROMPT = re.compile(r"(\d+)\+(\d+)=")
INTEGER = re.compile(r"0|[1-9][0-9]*")  # a non-negative integer as Python's str() writes it


def parse_prompt(prompt):
    """(a, b) from "a+b="; zero-padded operands ("07+05=") are how the task writes them."""
    match = PROMPT.fullmatch(prompt)
    if match is None:
        raise ValueError(f"prompt {prompt!r} is not an addition prompt like '12+34='")
    return int(match.group(1)), int(match.group(2))


def _check_lengths(name, **lists):
    lengths = {key: len(value) for key, value in lists.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"{name} got lists of different lengths {lengths}; pass one prompt "
                         "(repeated per sample) and one flag per completion")


def correctness_reward(prompts, completions, **batch):
    """1.0 where the completion is exactly the sum (e.g. "12" for "07+05="), else 0.0."""
    _check_lengths("correctness_reward", prompts=prompts, completions=completions)
    rewards = []
    for prompt, completion in zip(prompts, completions):
        a, b = parse_prompt(prompt)
        rewards.append(1.0 if completion == str(a + b) else 0.0)
    return rewards


def format_reward(prompts, completions, ended=None, **batch):
    """1.0 where the completion is a well-formed answer, else 0.0.

    Well-formed: digits only, no leading zero (except "0" itself), and the completion ended with
    the end token rather than being cut off - a model that never stops is not answering. Whether
    the digits are the right sum is `correctness_reward`'s job."""
    if ended is None:
        raise ValueError("format_reward needs ended=[bool per completion] (did the completion emit "
                         "the end token?); the trainer passes it with the batch")
    _check_lengths("format_reward", prompts=prompts, completions=completions, ended=ended)
    return [1.0 if done and INTEGER.fullmatch(completion) else 0.0
            for completion, done in zip(completions, ended)]


def check_rewards(rewards, n, name):
    """The rewards as a list of n floats, or a ValueError that names the reward function."""
    try:
        rewards = [float(r) for r in rewards]
    except (TypeError, ValueError):
        raise ValueError(f"reward function {name} returned {rewards!r}; it must return a list of "
                         f"floats, one per completion") from None
    if len(rewards) != n:
        raise ValueError(f"reward function {name} returned {len(rewards)} rewards for {n} "
                         f"completions; it must return one float per completion, in order")
    bad = [i for i, r in enumerate(rewards) if not math.isfinite(r)]
    if bad:
        raise ValueError(f"reward function {name} returned {rewards[bad[0]]} for completion "
                         f"{bad[0]} ({len(bad)} non-finite in all); return a finite number, "
                         "e.g. 0.0 for a completion it cannot score")
    return rewards

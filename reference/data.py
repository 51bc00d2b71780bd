"""The arithmetic task every chapter trains on: n-digit addition, one character per token.

A problem is `Problem(a, b, digits)`. Its prompt writes both operands with `digits` digits
("12+34=", "07+05="), so each digit sits at a fixed position; its completion is the sum as
written ("46", "12", "198") followed by the end token, so completions differ in length.
Everything is generated from a seed, so nothing is downloaded.
"""
import random
from typing import NamedTuple

import torch

PAD, EOS = "<pad>", "<eos>"


class CharTokenizer:
    """One token per character: padding, end-of-sequence, the ten digits, '+' and '='."""

    def __init__(self, chars="0123456789+="):
        self.itos = [PAD, EOS] + list(chars)
        self.stoi = {s: i for i, s in enumerate(self.itos)}
        self.pad_id, self.eos_id = self.stoi[PAD], self.stoi[EOS]

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError as err:
            raise ValueError(f"character {err.args[0]!r} is not in the tokenizer's vocabulary "
                             f"{''.join(self.itos[2:])!r}") from None

    def decode(self, ids) -> str:
        """Text up to the first end token; padding is dropped."""
        chars = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i != self.pad_id:
                chars.append(self.itos[i])
        return "".join(chars)


class Problem(NamedTuple):
    a: int
    b: int
    digits: int

    @property
    def prompt(self) -> str:
        return f"{self.a:0{self.digits}d}+{self.b:0{self.digits}d}="

    @property
    def answer(self) -> str:
        return str(self.a + self.b)


def make_addition_splits(digits=2, n_eval=500, n_train=None, seed=0):
    """Disjoint (train, eval) lists of Problems with 0 <= a, b < 10**digits.

    Every pair is drawn at most once, so no eval problem is ever trained on. For 1-3 digits the
    whole space is enumerated and shuffled; `n_train=None` takes every pair not held out, up to
    200,000 (4 digits and more have 10**8 pairs and up: a sample, not all of them)."""
    if digits < 1:
        raise ValueError(f"digits must be >= 1, got {digits}")
    size = 10 ** digits
    space = size * size
    if n_train is None:
        n_train = min(space - n_eval, 200_000)
    rng = random.Random(seed)
    want = n_eval + n_train
    if n_eval < 1 or want > space:
        raise ValueError(f"n_eval={n_eval} and n_train={n_train} do not fit in the {space} "
                         f"distinct {digits}-digit problems")
    if space <= 10 ** 6:
        codes = list(range(space))
        rng.shuffle(codes)
        codes = codes[:want]
    else:
        codes = rng.sample(range(space), want)
    problems = [Problem(*divmod(c, size), digits) for c in codes]
    return problems[n_eval:], problems[:n_eval]


class SFTDataset(torch.utils.data.Dataset):
    """Each item: the prompt and completion token ids, and labels that train the completion only.
    Items are tokenized once, up front, so a training step never waits on string handling."""

    def __init__(self, problems, tokenizer: CharTokenizer):
        if len(problems) == 0:
            raise ValueError("SFTDataset got an empty list of problems; "
                             "make the train split larger")
        self.problems, self.tok = list(problems), tokenizer
        self.items = [self.encode(p) for p in self.problems]

    def encode(self, problem):
        prompt = self.tok.encode(problem.prompt)
        completion = self.tok.encode(problem.answer) + [self.tok.eos_id]
        return {"input_ids": torch.tensor(prompt + completion),
                "labels": torch.tensor([-100] * len(prompt) + completion)}

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


class SFTCollator:
    """Right-pads a list of items into `input_ids`, `labels` and `attention_mask` tensors.

    Labels are -100 on prompt and padding positions, so those tokens are never trained on."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, items):
        ids = [torch.as_tensor(it["input_ids"]) for it in items]
        pad = torch.nn.utils.rnn.pad_sequence
        mask = pad([torch.ones_like(x) for x in ids], batch_first=True, padding_value=0)
        return {"input_ids": pad(ids, batch_first=True, padding_value=self.pad_id),
                "labels": pad([torch.as_tensor(it["labels"]) for it in items], batch_first=True,
                              padding_value=-100),
                "attention_mask": mask}


def left_pad(sequences, pad_id):
    """Left-pad lists of token ids into (input_ids, attention_mask), as generation needs."""
    T = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), T), dtype=torch.long)
    for row, s in enumerate(sequences):
        if len(s):
            ids[row, T - len(s):] = torch.tensor(s)
            mask[row, T - len(s):] = 1
    return ids, mask


def max_answer_tokens(digits: int) -> int:
    """The longest completion of a `digits`-digit sum, end token included."""
    return digits + 2


@torch.no_grad()
def exact_match(model, problems, tokenizer: CharTokenizer, batch_size=256, device="cpu"):
    """Fraction of problems whose greedy completion is exactly the right sum."""
    if len(problems) == 0:
        raise ValueError("exact_match got no problems")
    was_training = model.training
    model.eval()
    digits = max(p.digits for p in problems)
    correct = 0
    for start in range(0, len(problems), batch_size):
        chunk = problems[start:start + batch_size]
        ids, mask = left_pad([tokenizer.encode(p.prompt) for p in chunk], tokenizer.pad_id)
        out = model.generate(ids.to(device), mask.to(device),
                             max_new_tokens=max_answer_tokens(digits),
                             eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
        for p, row in zip(chunk, out.tolist()):
            correct += row.count(tokenizer.eos_id) > 0 and tokenizer.decode(row) == p.answer
    model.train(was_training)
    return correct / len(problems)


# --- Preference data ------------------------------------------------------------------------
# DPO needs pairs: the right sum (chosen) and a wrong one (rejected). The wrong answers are the
# mistakes a half-trained model makes, so the preference has something to teach.

def rejected_answer(problem: Problem, rng: random.Random) -> str:
    """A plausible wrong answer: the sum with its carries dropped (56+78 -> "24"), or with one
    digit off by one (134 -> "144"). Never the right answer, never a leading zero."""
    answer = problem.answer
    no_carry, place, a, b = 0, 1, problem.a, problem.b
    while a or b:
        no_carry += ((a % 10 + b % 10) % 10) * place
        a, b, place = a // 10, b // 10, place * 10
    no_carry = str(no_carry)
    # a no-carry sum that lost two or more digits (55+55 -> "0" for 110) is not plausible
    if rng.random() < 0.5 and no_carry != answer and abs(len(no_carry) - len(answer)) <= 1:
        return no_carry
    candidates = []
    for i, digit in enumerate(answer):
        for changed in (int(digit) - 1, int(digit) + 1):
            if 0 <= changed <= 9 and not (i == 0 and changed == 0 and len(answer) > 1):
                candidates.append(answer[:i] + str(changed) + answer[i + 1:])
    return rng.choice(candidates)


def _prompt_and_completion(tokenizer: CharTokenizer, prompt: str, answer: str):
    """input_ids and labels of prompt + answer + end token, labelling only the completion."""
    prompt_ids = tokenizer.encode(prompt)
    completion = tokenizer.encode(answer) + [tokenizer.eos_id]
    return prompt_ids + completion, [-100] * len(prompt_ids) + completion


class PreferenceDataset(torch.utils.data.Dataset):
    """Each item: the same prompt completed with the right sum (chosen) and a wrong one (rejected).

    The wrong answers are drawn once, here, from `random.Random(seed)`: every epoch, every rank
    and every resumed run then sees the same pairs."""

    def __init__(self, problems, tokenizer: CharTokenizer, seed=0):
        if len(problems) == 0:
            raise ValueError("PreferenceDataset got an empty list of problems; "
                             "make the train split larger")
        self.problems, self.tok = list(problems), tokenizer
        rng = random.Random(seed)
        self.rejected = [rejected_answer(p, rng) for p in self.problems]

    def __len__(self):
        return len(self.problems)

    def __getitem__(self, i):
        p = self.problems[i]
        chosen_ids, chosen_labels = _prompt_and_completion(self.tok, p.prompt, p.answer)
        rejected_ids, rejected_labels = _prompt_and_completion(self.tok, p.prompt, self.rejected[i])
        return {"chosen_input_ids": chosen_ids, "chosen_labels": chosen_labels,
                "rejected_input_ids": rejected_ids, "rejected_labels": rejected_labels}


class PreferenceCollator:
    """Right-pads the chosen and the rejected halves separately, each as `SFTCollator` does:
    `{chosen,rejected}_{input_ids,labels,attention_mask}`. The halves may differ in width."""

    def __init__(self, pad_id: int):
        self.sft = SFTCollator(pad_id)

    def __call__(self, items):
        batch = {}
        for side in ("chosen", "rejected"):
            half = self.sft([{"input_ids": it[f"{side}_input_ids"], "labels": it[f"{side}_labels"]}
                             for it in items])
            batch.update({f"{side}_{key}": value for key, value in half.items()})
        return batch


# --- Prompts, for GRPO ----------------------------------------------------------------------

class PromptDataset(torch.utils.data.Dataset):
    """Each item: a Problem's prompt as token ids and as text, and the Problem itself."""

    def __init__(self, problems, tokenizer):
        if len(problems) == 0:
            raise ValueError("PromptDataset got an empty list of problems; "
                             "make the train split larger")
        self.problems = list(problems)
        self.prompt_ids = [tokenizer.encode(p.prompt) for p in self.problems]

    def __len__(self):
        return len(self.problems)

    def __getitem__(self, i):
        return {"prompt_ids": self.prompt_ids[i], "prompt": self.problems[i].prompt,
                "problem": self.problems[i]}


class PromptCollator:
    """Left-pads prompts for generation: `prompt_input_ids`, `prompt_attention_mask` [B, P], plus
    `prompts` (list of str) and `problems` (list of Problem) for the reward functions.

    The default collate would try to stack the Problems; this keeps them as plain lists."""

    def __init__(self, pad_id):
        self.pad_id = pad_id

    def __call__(self, items):
        ids, mask = left_pad([it["prompt_ids"] for it in items], self.pad_id)
        return {"prompt_input_ids": ids, "prompt_attention_mask": mask,
                "prompts": [it["prompt"] for it in items],
                "problems": [it["problem"] for it in items]}

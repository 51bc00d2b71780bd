"""GRPO on a Hugging Face causal LM with its own tokenizer: sums with a verifiable reward.

    python reference/examples/hf_grpo_example.py                  # a tiny random model, any CPU
    python reference/examples/hf_grpo_example.py --model PATH     # a model you downloaded
    torchrun --standalone --nproc_per_node=2 reference/examples/hf_grpo_example.py

Without --model the model and tokenizer are built from a config (random weights, nothing is
downloaded): the command runs anywhere, and tests and CI run it that way. With --model PATH,
both come from a local directory holding a causal LM and its tokenizer (for example one
fetched with `huggingface-cli download Qwen/Qwen2.5-0.5B-Instruct --local-dir PATH`); this
script never downloads anything itself.

The task is generated from --seed: "a+b=" with operands of 1 to --max-digits digits, so the
prompts differ in length and every batch is left-padded. A completion earns 1 when it starts
with the right sum (`correct_sum`), and up to 0.2 more for its form (`number_format`: it starts
with a number, and the number is all there is). A random model learns the form within 50 steps
and no sums; a real one learns both. The README's "Hugging Face models" section says what to
change for a real model on a GPU.
"""
import argparse
import json
import os
import random
import re
import shutil
import time

import torch
from torch.utils.data import DataLoader, DistributedSampler

from reference import GRPOTrainer, configure_optimizer
from reference.distributed import teardown, torchrun_env
from reference.rollout import sampler_for, special_ids

# --- the task: sums of numbers of different lengths, scored by checking the answer ---------


def make_problems(n, max_digits, seed):
    """n (a, b) pairs whose operands have 1 to max_digits digits each, drawn from `seed`."""
    rng = random.Random(seed)

    def number():
        digits = rng.randint(1, max_digits)
        return rng.randrange(0 if digits == 1 else 10 ** (digits - 1), 10 ** digits)

    return [(number(), number()) for _ in range(n)]


def prompt_text(tokenizer, a, b, chat):
    """The prompt for a + b: plain "a+b=", or a question in the model's chat template (an
    instruction-tuned model answers questions, and its template marks where the answer goes)."""
    if not chat:
        return f"{a}+{b}="
    messages = [{"role": "user", "content": f"What is {a}+{b}? Reply with the number only."}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def leading_number(text):
    match = re.match(r"\s*(-?\d+)", text)
    return int(match.group(1)) if match else None


def correct_sum(prompts, completions, answers, **batch):
    """1 when the completion starts with the right sum: checked, not judged."""
    return [float(leading_number(c) == a) for c, a in zip(completions, answers)]


def number_format(prompts, completions, ended, **batch):
    """Partial credit for the answer's form: 0.5 for starting with a number, 0.5 more when the
    number is all there is and the end token closes it. A random model earns some of it by
    chance, so it has something to learn from before it gets any sum right."""
    return [0.5 * (leading_number(c) is not None)
            + 0.5 * bool(e and re.fullmatch(r"\s*-?\d+\s*", c))
            for c, e in zip(completions, ended)]


class PromptCollator:
    """Tokenizes prompts with the model's own tokenizer, left-padded for generation; keeps the
    answers for the reward functions."""

    def __init__(self, tokenizer, chat):
        self.tokenizer, self.chat = tokenizer, chat

    def __call__(self, pairs):
        texts = [prompt_text(self.tokenizer, a, b, self.chat) for a, b in pairs]
        # a chat template already holds the special tokens the model expects
        enc = self.tokenizer(texts, padding=True, return_tensors="pt",
                             add_special_tokens=not self.chat)
        return {"prompt_input_ids": enc["input_ids"],
                "prompt_attention_mask": enc["attention_mask"],
                "prompts": texts, "answers": [a + b for a, b in pairs]}


@torch.no_grad()
def accuracy(model, pairs, collate, tokenizer, device, max_new_tokens, batch_size=64):
    """The fraction of held-out sums whose greedy completion starts with the right number."""
    eos_id, pad_id = special_ids(tokenizer)
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(pairs), batch_size):
        batch = collate(pairs[start:start + batch_size])
        out = sampler_for(model)(batch["prompt_input_ids"].to(device),
                                 batch["prompt_attention_mask"].to(device),
                                 max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=eos_id, pad_token_id=pad_id)
        for row, answer in zip(out.tolist(), batch["answers"]):
            text = tokenizer.decode(row[:row.index(eos_id)] if eos_id in row else row)
            correct += leading_number(text) == answer
    model.train(was_training)
    return correct / len(pairs)


# --- the model: a local checkpoint, or a tiny random one built from a config ----------------

CHARS = "0123456789+-=?.:, \nabcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def char_tokenizer():
    """A one-character-per-token Hugging Face tokenizer, built in code (nothing downloaded)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<unk>", *CHARS])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()  # join characters back without spaces
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>")


def tiny_model(tokenizer, arch="qwen2", context=64):
    """A random model of Qwen2.5-0.5B's architecture (or Llama's, or GPT-2's), a few hundred
    thousand weights: it trains in seconds on a CPU and learns nothing about sums."""
    from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
                              Qwen2Config, Qwen2ForCausalLM)
    ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.eos_token_id,
               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if arch == "gpt2":
        return GPT2LMHeadModel(GPT2Config(n_positions=context, n_embd=64, n_layer=2, n_head=4,
                                          **ids))
    cfg = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=context, tie_word_embeddings=True,
               **ids)
    return LlamaForCausalLM(LlamaConfig(**cfg)) if arch == "llama" else Qwen2ForCausalLM(
        Qwen2Config(**cfg))


def load(args):
    """(model, tokenizer): from --model's directory, or tiny and random from a config."""
    if args.model is None:
        tokenizer = char_tokenizer()
        model = tiny_model(tokenizer, args.arch)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        model = AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True)
        # fp32 weights, whatever the checkpoint's dtype: --amp bf16 computes in bf16 while AdamW
        # updates fp32 weights (bf16 weights would round away most small updates)
        model = model.float()
        tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    if tokenizer.pad_token is None:  # GPT-2 and Llama tokenizers have none: padding is masked
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # generation continues from the prompt's last token
    if args.chat and tokenizer.chat_template is None:
        raise ValueError(f"--chat asks for the tokenizer's chat template, but {args.model} has "
                         "none; drop --chat, or use an instruction-tuned model")
    return model, tokenizer


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None,
                   help="a local directory with a causal LM and its tokenizer (default: a tiny "
                        "random model built from a config)")
    p.add_argument("--arch", default="qwen2", choices=["qwen2", "llama", "gpt2"],
                   help="the random model's architecture, without --model")
    p.add_argument("--chat", action="store_true",
                   help="wrap each prompt in the tokenizer's chat template (instruct models)")
    p.add_argument("--out", default="runs/hf_grpo")
    p.add_argument("--max-steps", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=8, help="prompts per micro-batch, per process")
    p.add_argument("--grad-accum-steps", type=int, default=1)
    p.add_argument("--num-samples-per-prompt", type=int, default=8)
    p.add_argument("--max-completion-length", type=int, default=8)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=5e-3,
                   help="right for the tiny random model; about 1e-6 for a real one")
    p.add_argument("--beta", type=float, default=0.0, help="KL penalty towards the start model")
    p.add_argument("--max-digits", type=int, default=3)
    p.add_argument("--amp", default="auto", choices=["auto", "off", "bf16", "fp16"],
                   help="auto: bf16 autocast on CUDA, fp32 on a CPU")
    p.add_argument("--device", default="auto")
    p.add_argument("--eval-every", type=int, default=None)
    p.add_argument("--eval-size", type=int, default=64)
    p.add_argument("--save-every", type=int, default=None)
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="CPU threads per process")
    args = p.parse_args(argv)
    env = torchrun_env()
    if args.threads is not None or (env.world_size > 1 and "OMP_NUM_THREADS" not in os.environ):
        torch.set_num_threads(args.threads or 1)  # several processes on one CPU: one thread each
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model, tokenizer = load(args)

    train = make_problems(4096, args.max_digits, args.seed)
    held_out = make_problems(args.eval_size, args.max_digits, args.seed + 1)
    collate = PromptCollator(tokenizer, args.chat)
    # each rank takes its own prompts; a prompt's whole group is sampled on one rank
    sampler = DistributedSampler(train, num_replicas=env.world_size, rank=env.rank, shuffle=True,
                                 seed=args.seed, drop_last=True)
    loader = DataLoader(train, batch_size=args.batch_size, sampler=sampler, drop_last=True,
                        collate_fn=collate, generator=torch.Generator().manual_seed(args.seed))
    checkpoints = os.path.join(args.out, "checkpoints")
    if env.is_main and not args.resume and os.path.isdir(checkpoints):
        shutil.rmtree(checkpoints)  # a rerun replaces the last run

    ref_model = None
    if args.beta > 0:
        import copy
        ref_model = copy.deepcopy(model)
    optimizer = configure_optimizer(model=model, optimizer_type="adamw", lr=args.lr,
                                    weight_decay=0.0)
    trainer = GRPOTrainer(
        model=model, optimizer=optimizer, train_loader=loader, device=args.device,
        max_epochs=None, max_steps=args.max_steps, grad_accum_steps=args.grad_accum_steps,
        amp_dtype=args.amp, num_samples_per_prompt=args.num_samples_per_prompt,
        reward_fn=[correct_sum, number_format], reward_weights=[1.0, 0.2], tokenizer=tokenizer,
        ref_model=ref_model, beta=args.beta, temperature=args.temperature,
        max_completion_length=args.max_completion_length, generation_seed=args.seed,
        eval_every=args.eval_every or args.max_steps,
        # the model's own device; naming `trainer` here would put it in a reference cycle
        eval_fn=lambda m: {"accuracy": accuracy(m, held_out, collate, tokenizer,
                                                next(m.parameters()).device,
                                                args.max_completion_length)},
        out_dir=args.out, save_every=args.save_every, keep_last=2,
        resume_from="latest" if args.resume else None, progress=False)
    start = time.perf_counter()
    try:
        history = trainer.train()
    except BaseException:
        teardown(barrier=False)  # the other ranks may be gone: don't wait for them
        raise
    teardown()
    train_records = [r for r in history if r.get("split") != "eval"]
    evals = [r for r in history if r.get("split") == "eval"]
    summary = {"steps": trainer.step, "processes": env.world_size,
               "first_reward": train_records[0]["reward"],
               "last_reward": train_records[-1]["reward"],
               "eval_accuracy": evals[-1]["accuracy"] if evals else None,
               "train_seconds": time.perf_counter() - start}
    if env.is_main:
        with open(os.path.join(args.out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        print(f"{env.world_size} process(es), step {trainer.step}: reward "
              f"{summary['first_reward']:.3f} -> {summary['last_reward']:.3f}, held-out accuracy "
              f"{summary['eval_accuracy']}, {summary['train_seconds']:.1f} s; metrics in "
              f"{args.out}/metrics.jsonl")
    return summary


if __name__ == "__main__":
    main()

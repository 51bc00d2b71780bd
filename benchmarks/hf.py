"""Hugging Face sampling: `reference.rollout.sample` with and without the model's KV cache.

`bench_hf_kv_cache()` returns {"hf_kv_cache_speedup": uncached time / cached time,
"hf_kv_cache_same_tokens": bool}: a tiny Llama-style model built from a config (random weights,
nothing downloaded) continues 64 left-padded prompts of mixed lengths by 64 greedy tokens, so
both ways must give the same tokens. `python benchmarks/hf.py` prints the figures.
"""
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: no downloads

import torch  # noqa: E402

from reference.data import CharTokenizer, left_pad  # noqa: E402
from reference.rollout import sample  # noqa: E402
from timing import median_time  # noqa: E402  (benchmarks/, beside this file)


def tiny_llama(vocab_size, context, seed=0):
    """A Llama-style model (rotary positions, grouped-query attention, SwiGLU) of ~0.4M weights."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=128, intermediate_size=256,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=context)
    return LlamaForCausalLM(cfg).eval()


def bench_hf_kv_cache(repeats=5, new_tokens=64, batch=64):
    """Uncached over cached greedy sampling of `new_tokens` tokens, and whether the tokens agree."""
    tok = CharTokenizer()
    # prompts of 4, 6 and 8 tokens ("3+4=", "12+34=", "123+456="): left padding in every batch
    prompts = [f"{i % 10 ** (1 + i % 3)}+{(7 * i) % 10 ** (1 + i % 3)}=" for i in range(batch)]
    ids, mask = left_pad([tok.encode(p) for p in prompts], tok.pad_id)
    model = tiny_llama(tok.vocab_size, ids.shape[1] + new_tokens)

    def run(use_cache):
        return sample(model, ids, mask, max_new_tokens=new_tokens, do_sample=False,
                      pad_token_id=tok.pad_id, use_cache=use_cache)

    same = torch.equal(run(True), run(False))
    cached = median_time(lambda: run(True), repeats)
    uncached = median_time(lambda: run(False), repeats)
    return {"hf_kv_cache_speedup": uncached / cached, "hf_kv_cache_same_tokens": same}


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    print(json.dumps(bench_hf_kv_cache(), indent=2))

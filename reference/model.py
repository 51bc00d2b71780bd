"""TinyGPT: the small causal language model every chapter trains.

A pre-norm decoder-only transformer in the spirit of nanoGPT, small enough to train on a
laptop CPU in seconds. It is the bench the trainers stand on, not the lesson, so it stays short:
`model(input_ids, attention_mask=None)` returns logits `[B, T, V]`, and `generate()` samples
with a KV cache from left-padded prompts.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .logprobs import positions_from_mask


@dataclass
class GPTConfig:
    vocab_size: int = 16
    block_size: int = 32   # the longest sequence (prompt + completion) the model accepts
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64
    dropout: float = 0.0


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        assert cfg.n_embd % cfg.n_head == 0, "n_embd must be divisible by n_head"
        self.n_head = cfg.n_head
        # no bias: a key bias adds the same score to every key of a query, which softmax ignores,
        # so its gradient is pure rounding noise that Adam would blow up to full-size steps
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=False)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.dropout = cfg.dropout

    def forward(self, x, attn_mask=None, cache=None):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if cache is not None:  # generation: append this step's keys and values to the cache
            if "k" in cache:
                k = torch.cat([cache["k"], k], dim=2)
                v = torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k, v
        dropout_p = self.dropout if self.training else 0.0
        if attn_mask is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
        return self.proj(y.transpose(1, 2).contiguous().view(B, T, C))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.n_embd, 4 * cfg.n_embd), nn.GELU(), nn.Linear(4 * cfg.n_embd, cfg.n_embd)
        )
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, attn_mask=None, cache=None):
        x = x + self.drop(self.attn(self.ln_1(x), attn_mask, cache))
        return x + self.drop(self.mlp(self.ln_2(x)))


class TinyGPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, input_ids, attention_mask=None):
        """Logits [B, T, V]. `attention_mask` [B, T] (1 = token, 0 = padding) may be omitted for
        right-padded batches: causal attention already keeps real tokens from seeing the padding
        that follows them. Left-padded batches need it, for positions and for the keys."""
        T = input_ids.shape[1]
        if T > self.config.block_size:
            raise ValueError(
                f"input_ids has length {T} but the model's block_size is {self.config.block_size}; "
                "use shorter sequences or build the model with a larger block_size"
            )
        if attention_mask is None or _is_right_padded(attention_mask):
            # causal attention alone is exact for every real token here, and much faster
            positions = torch.arange(T, device=input_ids.device).unsqueeze(0)
            return self._run(input_ids, positions, None, None)
        positions, attn_mask = _positions_and_mask(attention_mask)
        return self._run(input_ids, positions, attn_mask, None)

    def _run(self, input_ids, positions, attn_mask, caches):
        x = self.drop(self.wte(input_ids) + self.wpe(positions))
        for i, block in enumerate(self.blocks):
            x = block(x, attn_mask, None if caches is None else caches[i])
        return self.lm_head(self.ln_f(x))

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, max_new_tokens=8, temperature=1.0,
                 top_k=None, do_sample=False, eos_token_id=None, pad_token_id=0,
                 use_cache=True, generator=None):
        """Continue left-padded prompts. Returns the new tokens [B, max_new_tokens]; after a
        row's first `eos_token_id` the rest of that row is `pad_token_id`.

        Greedy when `do_sample=False`; otherwise samples from softmax(logits / temperature),
        restricted to the `top_k` most likely tokens when given. `use_cache=False` recomputes the
        whole sequence every step (slow; kept to test and benchmark the cache against)."""
        B, P = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if P + max_new_tokens > self.config.block_size:
            raise ValueError(
                f"prompt length {P} + max_new_tokens {max_new_tokens} exceeds block_size "
                f"{self.config.block_size}; shorten the prompt or lower max_new_tokens"
            )
        mask = attention_mask.long()
        seq = input_ids
        caches = [dict() for _ in self.blocks] if use_cache else None
        finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        out = []
        for t in range(max_new_tokens):
            positions, attn_mask = _positions_and_mask(mask)
            if caches is not None and t > 0:  # the cache holds the past: feed only the newest token
                logits = self._run(seq[:, -1:], positions[:, -1:], attn_mask[:, :, -1:, :], caches)
            else:
                if caches is not None:
                    caches = [dict() for _ in self.blocks]
                logits = self._run(seq, positions, attn_mask, caches)
            next_tok = next_token(logits[:, -1, :], do_sample, temperature, top_k, generator)
            next_tok, finished = end_rows(next_tok, finished, eos_token_id, pad_token_id)
            out.append(next_tok)
            seq = torch.cat([seq, next_tok[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            if eos_token_id is not None and bool(finished.all()):
                break
        return new_tokens(out, max_new_tokens, pad_token_id)


def next_token(logits, do_sample=False, temperature=1.0, top_k=None, generator=None):
    """One token per row from the last position's logits [B, V]: the argmax (greedy), or a sample
    from softmax(logits / temperature) restricted to the `top_k` most likely tokens."""
    logits = logits.float()
    if not do_sample:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator).squeeze(1)


def end_rows(tokens, finished, eos_token_id, pad_token_id):
    """The end-token rule every sampler here follows (TinyGPT's generate and
    `reference.rollout.sample`): a row that has ended gets `pad_token_id`, and a row ends at its
    first `eos_token_id`. Returns (tokens [B], finished [B])."""
    tokens = torch.where(finished, torch.full_like(tokens, pad_token_id), tokens)
    if eos_token_id is not None:
        finished = finished | (tokens == eos_token_id)
    return tokens, finished


def new_tokens(steps, max_new_tokens, pad_token_id):
    """The tokens of each step, [B] each, as [B, max_new_tokens]: a loop that stopped because
    every row had ended is padded to the fixed width."""
    tokens = torch.stack(steps, dim=1)
    if tokens.shape[1] < max_new_tokens:
        fill = tokens.new_full((tokens.shape[0], max_new_tokens - tokens.shape[1]), pad_token_id)
        tokens = torch.cat([tokens, fill], dim=1)
    return tokens


def _is_right_padded(attention_mask):
    """True when every row is real tokens then padding (1...1 0...0): no left padding, no holes."""
    return bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all())


def _positions_and_mask(attention_mask):
    """Positions that skip left padding, and a boolean [B, 1, T, T] causal mask that also hides
    padded keys. Each query may always see itself, so no row of the softmax is empty."""
    mask = attention_mask.bool()
    T = mask.shape[1]
    positions = positions_from_mask(attention_mask)
    causal = torch.ones(T, T, dtype=torch.bool, device=mask.device).tril()
    eye = torch.eye(T, dtype=torch.bool, device=mask.device)
    attn_mask = (causal & mask[:, None, None, :]) | eye
    return positions, attn_mask

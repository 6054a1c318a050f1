"""Analytic FLOP counts (multiply-add = 2 FLOPs; matrix products and attention only).

Layer norms, GELU, softmax, embeddings and biases are left out: they are O(C) per token, under
1% of a block at GPT-2 shapes. With C = n_embd, V = vocab_size, S = number of keys attended:

    block(S)       = 24 C^2 + 4 S C       c_attn 6C^2, attn.c_proj 2C^2, mlp 16C^2; QK^T and AV 2SC each
    head           = 2 C V                 ln_f(h) @ lm_head^T
    kv_layer       = 4 C^2                 K and V columns of c_attn for one skipped layer

A full-depth forward of a T-token prompt from an empty cache that predicts P tokens costs
``sum_{t=1..T} n_layer * block(t) + P * head``  =  ``n_layer * (24 C^2 T + 2 C T (T+1)) + 2 C V P``.
"""
from __future__ import annotations

from .config import GPT2Config


def block_flops(config: GPT2Config, n_keys):
    """FLOPs of one block for one token attending ``n_keys`` keys (int or int array)."""
    C = config.n_embd
    return 24 * C * C + 4 * n_keys * C


def head_flops(config: GPT2Config) -> int:
    """FLOPs of the LM head for one token."""
    return 2 * config.n_embd * config.vocab_size


def kv_layer_flops(config: GPT2Config) -> int:
    """FLOPs of propagating one token's K/V to one skipped layer."""
    return 4 * config.n_embd * config.n_embd


def full_forward_flops(config: GPT2Config, n_tokens: int, n_predicted: int, start: int = 0) -> int:
    """Full-depth FLOPs for tokens at positions start..start+n_tokens-1, predicting n_predicted."""
    C, L = config.n_embd, config.n_layer
    keys = sum(range(start + 1, start + n_tokens + 1))
    return L * (24 * C * C * n_tokens + 4 * C * keys) + n_predicted * head_flops(config)

"""KV propagation for skipped layers (ADEPT's decoupled propagation, CALM's state copying).

A token that exits at layer k still needs keys and values at every layer l > k, because later
tokens attend to it there. ADEPT (arXiv 2601.03700) fills them from the exit state h_k alone:

    K_l, V_l = K/V columns of  ln_1_l(h_k) @ W_attn_l + b_attn_l          for every l > k

The layers are *decoupled*: none depends on another, so the LayerNorm statistics are computed once,
each layer's ln_1 affine is applied to the same normalised state, and all layers' K/V come out of
one batched contraction over stacked weights. ``propagate_kv_loop`` is the layer-by-layer twin.
"""
from __future__ import annotations

import numpy as np

from .. import nn


def propagate_kv(model, h: np.ndarray, layers: np.ndarray) -> np.ndarray:
    """Batched, decoupled K/V of states ``h`` for the given blocks.

    h [N, C] float32 exit states; ``layers`` [M] 0-based block indices (block l+1).
    Returns kv [M, 2, H, N, D] float32, ready for ``cache.kv[layers][..., positions, :]``.
    Cost: 4 C^2 FLOPs per token per layer (the Q columns are never computed).
    """
    cfg = model.config
    g, b, w_kv, b_kv = model.stacked_kv                                # [L,C] [L,C] [L,C,2C] [L,2C]
    n = nn.normalize(h, cfg.layer_norm_epsilon)                        # [N, C], once for all layers
    a = n[None] * g[layers][:, None, :] + b[layers][:, None, :]       # [M, N, C]
    kv = np.matmul(a, w_kv[layers]) + b_kv[layers][:, None, :]       # [M, N, 2C], one batched product
    return _to_cache_layout(kv, cfg)


def propagate_kv_loop(model, h: np.ndarray, layers: np.ndarray) -> np.ndarray:
    """Reference twin of ``propagate_kv``: one layer at a time, full LayerNorm each time."""
    cfg, C = model.config, model.config.n_embd
    out = []
    for l in layers:
        blk = model.params.h[l]
        a = nn.layer_norm(h, blk.ln_1_g, blk.ln_1_b, cfg.layer_norm_epsilon)      # [N, C]
        out.append(a @ blk.c_attn_w[:, C:] + blk.c_attn_b[C:])                    # [N, 2C]
    return _to_cache_layout(np.stack(out) if out else np.zeros((0, len(h), 2 * C), np.float32), cfg)


def propagate_kv_mapped(model, h_in: np.ndarray, layers: np.ndarray) -> np.ndarray:
    """Like ``propagate_kv`` but from per-layer inputs h_in [M, N, C] (a learned mapper's output
    for each target layer), so the LayerNorm statistics differ per layer."""
    cfg = model.config
    g, b, w_kv, b_kv = model.stacked_kv
    a = nn.normalize(h_in, cfg.layer_norm_epsilon) * g[layers][:, None, :] + b[layers][:, None, :]
    kv = np.matmul(a, w_kv[layers]) + b_kv[layers][:, None, :]
    return _to_cache_layout(kv, cfg)


def _to_cache_layout(kv: np.ndarray, cfg) -> np.ndarray:
    """[M, N, 2C] -> [M, 2, H, N, D]."""
    M, N, _ = kv.shape
    return kv.reshape(M, N, 2, cfg.n_head, cfg.head_dim).transpose(0, 2, 3, 1, 4)


def write_propagated(cache, layers: np.ndarray, positions: np.ndarray, kv: np.ndarray) -> None:
    """Store kv [M, 2, H, N, D] at ``positions`` [N] of blocks ``layers`` [M]."""
    for i, l in enumerate(layers):
        cache.kv[l][:, :, positions] = kv[i]

"""KV propagation for skipped layers (ADEPT's decoupled propagation, CALM's state copying).

A token that exits at layer k still needs keys and values at every layer l > k, because later
tokens attend to it there. ADEPT (arXiv 2601.03700) fills them from the exit state h_k alone:

    K_l, V_l = K/V columns of  ln_1_l(h_k) @ W_attn_l + b_attn_l          for every l > k

The layers are *decoupled*: none depends on another, so the LayerNorm statistics are computed once,
each layer's ln_1 affine is applied to the same normalised state, and all layers' K/V come out of
one batched contraction over stacked weights. ``propagate_kv_loop`` is the layer-by-layer twin.

Since everything after the normalisation is affine, the engine goes one step further
(``StackedKV``): ln_1's affine, the K/V columns of ``c_attn`` and, with ADEPT's calibration, the
learned K/V map of each (exit layer, skipped block) pair are folded at load time into one matrix
per exit layer k, so all skipped layers' K/V of a token are ``normalize(h_k) @ A_k + d_k``: one
product, 4 C^2 FLOPs per token per skipped layer whether the map is learned or the identity.
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


def propagate_kv_mapped(model, n_in: np.ndarray, layers: np.ndarray) -> np.ndarray:
    """Like ``propagate_kv`` but from per-layer *normalised* inputs n_in [M, N, C] (a learned
    mapper's estimate of each target block's normalised input, ``AdeptParams.kv_map``): ln_1's
    affine and the K/V columns of c_attn only. The unfused reference of ``StackedKV`` with maps."""
    g, b, w_kv, b_kv = model.stacked_kv
    a = n_in * g[layers][:, None, :] + b[layers][:, None, :]
    kv = np.matmul(a, w_kv[layers]) + b_kv[layers][:, None, :]
    return _to_cache_layout(kv, model.config)


class StackedKV:
    """K/V of the skipped blocks of exited tokens as one affine map per exit layer (engine path).

    For exit layer k (1 <= k < n_layer; blocks k+1..n_layer skipped, 0-based indices k..L-1) and
    n = normalize(h_k) [N, C]: ``kv = n @ A_k + d_k`` with A_k [C, (L-k) 2C], d_k [(L-k) 2C], the
    columns of block index l at (l-k) 2C .. (l-k+1) 2C (K then V, heads in order). Without maps
    A_k stacks ``diag(ln_1 g_l) W_kv_l`` (exactly ``propagate_kv`` up to float rounding); with
    ``maps`` (an ``AdeptParams``) block l > k reads the mapped input n (I + U V) + c of its pair,
    giving ``(I + U V) diag(g_l) W_kv_l`` (exactly ``propagate_kv_mapped(kv_map(...))``). Folded in
    float64 once per exit layer on first use (about 0.3 MB per skipped layer at n_embd 192).
    """

    def __init__(self, model, maps=None):
        self.model, self.config, self.maps = model, model.config, maps
        L, C = self.config.n_layer, self.config.n_embd
        # identity: one [C, L 2C] matrix whose column block k.. serves every exit layer k
        self._all = np.empty((C, L * 2 * C), np.float32)
        self._dall = np.empty(L * 2 * C, np.float32)
        for l in range(L):
            self._all[:, l * 2 * C:(l + 1) * 2 * C], self._dall[l * 2 * C:(l + 1) * 2 * C] = self._layer(l)
        self._folded: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _layer(self, l: int) -> tuple[np.ndarray, np.ndarray]:
        """Block index l's ``diag(g) W_kv`` [C, 2C] and ``b W_kv + b_kv`` [2C], in float64."""
        g, b, w_kv, b_kv = (a[l].astype(np.float64) for a in self.model.stacked_kv)
        return g[:, None] * w_kv, b @ w_kv + b_kv

    def weights(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(A_k [C, (L-k) 2C] float32, d_k [(L-k) 2C] float32) for exit layer k."""
        if self.maps is None:
            j = 2 * self.config.n_embd * k
            return self._all[:, j:], self._dall[j:]
        if k not in self._folded:
            from .adept import pair_index
            L = self.config.n_layer
            A, d = [], []
            for l in range(k, L):
                gw, dl = self._layer(l)
                if l > k:
                    p = pair_index(k, l, L)
                    u, v, c = (self.maps.kv_u[p].astype(np.float64), self.maps.kv_v[p].astype(np.float64),
                               self.maps.kv_c[p].astype(np.float64))
                    gw, dl = gw + u @ (v @ gw), dl + c @ gw
                A.append(gw)
                d.append(dl)
            self._folded[k] = (np.ascontiguousarray(np.concatenate(A, axis=1), dtype=np.float32),
                               np.concatenate(d).astype(np.float32))
        return self._folded[k]

    def propagate(self, h: np.ndarray, k: int, layer: int | None = None) -> np.ndarray:
        """K/V of states h [N, C] that exited at layer k, for every skipped block (``layer`` None)
        or only block index ``layer`` (lazy fill): [N, M, 2C] float32, M = L-k or 1."""
        A, d = self.weights(k)
        n = nn.normalize(h, self.config.layer_norm_epsilon)              # [N, C]
        if layer is not None:
            j = 2 * self.config.n_embd * (layer - k)
            A, d = A[:, j:j + 2 * self.config.n_embd], d[j:j + 2 * self.config.n_embd]
        return (n @ A + d).reshape(len(h), -1, 2 * self.config.n_embd)   # [N, M, 2C]


def _to_cache_layout(kv: np.ndarray, cfg) -> np.ndarray:
    """[M, N, 2C] -> [M, 2, H, N, D]."""
    M, N, _ = kv.shape
    return kv.reshape(M, N, 2, cfg.n_head, cfg.head_dim).transpose(0, 2, 3, 1, 4)


def write_propagated(cache, layers: np.ndarray, positions: np.ndarray, kv: np.ndarray) -> None:
    """Store kv [M, 2, H, N, D] at ``positions`` [N] of blocks ``layers`` [M]."""
    for i, l in enumerate(layers):
        cache.kv[l][:, :, positions] = kv[i]


def write_stacked(cache, layers: np.ndarray, positions: np.ndarray, kv: np.ndarray) -> None:
    """Store ``StackedKV.propagate``'s kv [N, M, 2C] at ``positions`` [N] of blocks ``layers`` [M]
    in one indexed assignment."""
    cfg = cache.kv.shape
    N, M = kv.shape[:2]
    cache.kv[np.asarray(layers)[:, None], :, :, np.asarray(positions)[None, :]] = \
        kv.reshape(N, M, 2, cfg[2], cfg[4]).transpose(1, 0, 2, 3, 4)     # [M, N, 2, H, D]

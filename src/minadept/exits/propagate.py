"""K/V propagation for skipped layers (ADEPT's decoupled propagation, CALM's state copying).

Layers are numbered 1..n_layer. A token that exits at layer k still needs keys and values at every
block l = k+1..n_layer, because later tokens attend to it there. ADEPT (arXiv 2601.03700) fills
them from the exit state h_k alone:

    K_l, V_l = K/V columns of  ln_1_l(h_k) @ W_attn_l + b_attn_l          for every l > k

The layers are *decoupled*: none depends on another, so the LayerNorm statistics are computed once,
each layer's ln_1 affine is applied to the same normalised state, and all layers' K/V come out of
one batched contraction over stacked weights (``propagate_kv``, the operation as taught;
``propagate_kv_loop`` is its layer-by-layer twin, the engine's ``--kv propagate-loop``).

Everything after the normalisation is affine, so the engine goes one step further (``StackedKV``):
ln_1's affine, the K/V columns of ``c_attn`` and, with ADEPT's calibration, the learned K/V map of
each (exit layer, skipped block) pair are folded into one matrix per exit layer k, so all skipped
layers' K/V of a token are ``normalize(h_k) @ A_k + d_k``: one product, 4 C^2 FLOPs per token per
skipped layer whether the map is learned or the identity.

Every function returns K/V in the cache's layout, [M, 2, H, N, D] for M consecutive blocks and N
tokens, and ``write_propagated`` stores it.
"""
from __future__ import annotations

import numpy as np

from ..reference import layer_norm, normalize


def propagate_kv(model, h: np.ndarray, exit_layer: int) -> np.ndarray:
    """Batched, decoupled K/V of states h [N, C] float32 that exited at ``exit_layer`` k, for
    blocks k+1..n_layer: [n_layer-k, 2, H, N, D] float32. Cost: 4 C^2 FLOPs per token per block
    (the Q columns are never computed)."""
    g, b, w_kv, b_kv = (a[exit_layer:] for a in model.stacked_kv)     # [M,C] [M,C] [M,C,2C] [M,2C]
    n = normalize(h, model.config.layer_norm_epsilon)                   # [N, C], once for all blocks
    a = n[None] * g[:, None, :] + b[:, None, :]                         # [M, N, C]
    return _cache_layout(np.matmul(a, w_kv) + b_kv[:, None, :], model.config)   # one batched product


def propagate_kv_loop(model, h: np.ndarray, exit_layer: int) -> np.ndarray:
    """``propagate_kv`` one block at a time, a full LayerNorm each time (its reference twin)."""
    cfg, C = model.config, model.config.n_embd
    out = [layer_norm(h, blk.ln_1_g, blk.ln_1_b, cfg.layer_norm_epsilon) @ blk.c_attn_w[:, C:] + blk.c_attn_b[C:]
           for blk in model.params.h[exit_layer:]]                                  # each [N, 2C]
    return _cache_layout(np.stack(out) if out else np.zeros((0, len(h), 2 * C), np.float32), cfg)


def propagate_kv_mapped(model, n_in: np.ndarray, exit_layer: int) -> np.ndarray:
    """Like ``propagate_kv`` from per-block *normalised* inputs n_in [M, N, C] of blocks
    k+1..n_layer (a learned map's estimate, ``AdeptParams.kv_map``): ln_1's affine and the K/V
    columns of c_attn only. The unfolded reference of ``StackedKV`` with maps."""
    g, b, w_kv, b_kv = (a[exit_layer:] for a in model.stacked_kv)
    a = n_in * g[:, None, :] + b[:, None, :]
    return _cache_layout(np.matmul(a, w_kv) + b_kv[:, None, :], model.config)


class StackedKV:
    """K/V of the skipped blocks of exited tokens as one affine map per exit layer (engine form).

    For exit layer k and n = normalize(h_k) [N, C]: ``kv = n @ A_k + d_k`` with A_k [C, (L-k) 2C]
    and d_k [(L-k) 2C], the columns of block l (k < l <= L) at (l-k-1) 2C .. (l-k) 2C (K then V,
    heads in order). Without maps A_k stacks ``diag(ln_1 g_l) W_kv_l`` (``propagate_kv`` up to
    float rounding); with ``maps`` (an ``AdeptParams``) block l > k+1 reads the mapped input
    n (I + U V) + c of its pair, giving ``(I + U V) diag(g_l) W_kv_l`` (``propagate_kv_mapped`` of
    ``kv_map``). Folded in float64 once per exit layer on first use.
    """

    def __init__(self, model, maps=None):
        self.model, self.config, self.maps = model, model.config, maps
        L, C2 = self.config.n_layer, 2 * self.config.n_embd
        # identity maps: one [C, L 2C] matrix whose columns from block k+1 on serve exit layer k
        self._all = np.empty((self.config.n_embd, L * C2), np.float32)
        self._dall = np.empty(L * C2, np.float32)
        for blk in range(1, L + 1):
            cols = slice((blk - 1) * C2, blk * C2)
            self._all[:, cols], self._dall[cols] = self._block(blk)
        self._folded: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _block(self, blk: int) -> tuple[np.ndarray, np.ndarray]:
        """Block ``blk``'s ``diag(g) W_kv`` [C, 2C] and ``b W_kv + b_kv`` [2C], in float64."""
        g, b, w_kv, b_kv = (a[blk - 1].astype(np.float64) for a in self.model.stacked_kv)
        return g[:, None] * w_kv, b @ w_kv + b_kv

    def weights(self, exit_layer: int) -> tuple[np.ndarray, np.ndarray]:
        """(A_k [C, (L-k) 2C] float32, d_k [(L-k) 2C] float32) for exit layer k."""
        k = exit_layer
        if self.maps is None:
            j = 2 * self.config.n_embd * k
            return self._all[:, j:], self._dall[j:]
        if k not in self._folded:
            from .adept import pair_index
            L, A, d = self.config.n_layer, [], []
            for blk in range(k + 1, L + 1):
                gw, dl = self._block(blk)
                if blk > k + 1:                 # block k+1 reads h_k itself
                    p = pair_index(k, blk, L)
                    u, v, c = (self.maps.kv_u[p].astype(np.float64), self.maps.kv_v[p].astype(np.float64),
                               self.maps.kv_c[p].astype(np.float64))
                    gw, dl = gw + u @ (v @ gw), dl + c @ gw
                A.append(gw)
                d.append(dl)
            self._folded[k] = (np.ascontiguousarray(np.concatenate(A, axis=1), dtype=np.float32),
                               np.concatenate(d).astype(np.float32))
        return self._folded[k]

    def propagate(self, h: np.ndarray, exit_layer: int, block: int | None = None) -> np.ndarray:
        """K/V of states h [N, C] that exited at ``exit_layer`` k, for blocks k+1..n_layer
        ([L-k, 2, H, N, D]) or only block ``block`` (lazy fill; [1, 2, H, N, D])."""
        C2 = 2 * self.config.n_embd
        A, d = self.weights(exit_layer)
        if block is not None:
            cols = slice((block - exit_layer - 1) * C2, (block - exit_layer) * C2)
            A, d = A[:, cols], d[cols]
        n = normalize(h, self.config.layer_norm_epsilon)                     # [N, C]
        kv = (n @ A + d).reshape(len(h), -1, C2).transpose(1, 0, 2)          # [M, N, 2C]
        return _cache_layout(kv, self.config)

    def propagate_block(self, h: np.ndarray, exit_layers: np.ndarray, block: int) -> np.ndarray:
        """Block ``block``'s K/V [1, 2, H, N, D] of states h [N, C] that exited at ``exit_layers``
        [N] (each < block): one product when the maps are the identity (block l's weights do
        not depend on the exit layer), one per exit layer with learned maps."""
        if self.maps is None:
            return self.propagate(h, block - 1, block)
        out = np.empty((1, 2, self.config.n_head, len(h), self.config.head_dim), np.float32)
        for k in np.unique(exit_layers):
            sel = np.flatnonzero(exit_layers == k)
            out[:, :, :, sel] = self.propagate(h[sel], int(k), block)
        return out


def _cache_layout(kv: np.ndarray, cfg) -> np.ndarray:
    """[M, N, 2C] -> [M, 2, H, N, D]."""
    M, N, _ = kv.shape
    return kv.reshape(M, N, 2, cfg.n_head, cfg.head_dim).transpose(0, 2, 3, 1, 4)


def write_propagated(cache, first_block: int, positions: np.ndarray, kv: np.ndarray) -> None:
    """Store kv [M, 2, H, N, D] of blocks first_block..first_block+M-1 at ``positions`` [N], in one
    indexed assignment."""
    cache.kv[first_block - 1:first_block - 1 + len(kv), :, :, np.asarray(positions)] = kv

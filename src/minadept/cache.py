"""The KV cache: one preallocated array for all layers, one length, and (for lazy fill) a record
of which entries are still pending."""
from __future__ import annotations

import numpy as np

from .config import GPT2Config


class KVCache:
    """Keys and values of every layer for positions ``0..length-1``.

    ``kv`` [n_layer, 2, n_head, n_ctx, head_dim] float32 (index 0 = K, 1 = V; layer index 0 is
    block 1). ``length`` is the number of positions filled, the same for every layer.

    Lazy fill (ADEPT engine): a position that exited at layer k may leave layers > k *pending*:
    ``pending[l, p]`` is True while layer l+1's K/V of position p is not computed yet, and
    ``exit_state[p]`` [n_embd] holds the hidden state it is computed from. Pending entries are
    filled before any token attends at that layer, so readers never see them.
    """

    def __init__(self, config: GPT2Config, n_ctx: int | None = None):
        n_ctx = config.n_positions if n_ctx is None else n_ctx
        self.n_ctx = n_ctx
        self.kv = np.zeros((config.n_layer, 2, config.n_head, n_ctx, config.head_dim), dtype=np.float32)
        self.pending = np.zeros((config.n_layer, n_ctx), dtype=bool)
        self.exit_state = np.zeros((n_ctx, config.n_embd), dtype=np.float32)
        self.exit_at = np.zeros(n_ctx, dtype=np.int64)       # exit layer of each pending position
        self.length = 0

    def keys(self, layer: int, end: int) -> np.ndarray:
        """K of block ``layer`` (0-based) for positions < end: [n_head, end, head_dim] (a view)."""
        return self.kv[layer, 0, :, :end]

    def values(self, layer: int, end: int) -> np.ndarray:
        """V of block ``layer`` (0-based) for positions < end: [n_head, end, head_dim] (a view)."""
        return self.kv[layer, 1, :, :end]

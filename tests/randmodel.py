"""Random GPT-2 models built directly in NumPy (no torch), for engine invariant tests."""
from __future__ import annotations

import numpy as np

from minadept.checkpoint import Block, Params
from minadept.config import GPT2Config
from minadept.model import Model


def random_model(n_layer=4, n_head=2, n_embd=32, vocab_size=97, n_positions=64, seed=0,
                 scale=0.2) -> Model:
    """A GPT-2 with random float32 weights. ``scale`` large enough that layers differ visibly."""
    cfg = GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=vocab_size,
                     n_positions=n_positions)
    rng = np.random.default_rng(seed)
    C = n_embd

    def w(*shape, s=scale):
        return (rng.standard_normal(shape) * s).astype(np.float32)

    blocks = tuple(Block(
        ln_1_g=1 + w(C, s=0.1), ln_1_b=w(C, s=0.1), c_attn_w=w(C, 3 * C), c_attn_b=w(3 * C, s=0.05),
        attn_c_proj_w=w(C, C), attn_c_proj_b=w(C, s=0.05), ln_2_g=1 + w(C, s=0.1), ln_2_b=w(C, s=0.1),
        c_fc_w=w(C, 4 * C), c_fc_b=w(4 * C, s=0.05), mlp_c_proj_w=w(4 * C, C, s=scale / 2),
        mlp_c_proj_b=w(C, s=0.05)) for _ in range(n_layer))
    wte = w(vocab_size, C, s=0.5)
    params = Params(wte=wte, wpe=w(n_positions, C, s=0.1), h=blocks, ln_f_g=1 + w(C, s=0.1),
                    ln_f_b=w(C, s=0.1), lm_head=wte)
    return Model(config=cfg, params=params)

"""The fused single-token decode step (fast backend): ``Engine.forward`` for one token with
``model.decode_plan``, the compiled ``DecodePlan`` that runs a whole block in one call (layer
norms, the four matrix-vector products, the K/V write, attention over the cache, GELU) and the LM
head as one BLAS product.

Its own loop over the same step interface as the engine's layer loop: the same exit decisions
(``Policy.decide`` on an ``ExitState``), the same propagation and lazy fill (``Engine._propagate``,
``Engine.fill_pending``) and the same accounting. ``tests/test_fused.py`` checks it against the
NumPy layer loop.
"""
from __future__ import annotations

import numpy as np

from .cache import KVCache
from .exits.policies import ExitState
from .flops import block_flops, full_forward_flops


def decode_one(engine, token: int, cache: KVCache, step: int, plan):
    """``engine.forward([token], cache, step=step)`` through ``plan``; returns a ForwardResult."""
    from .engine import ForwardResult
    cfg, L, p = engine.config, engine.config.n_layer, cache.length
    x, x_prev = np.empty(cfg.n_embd, np.float32), np.empty(cfg.n_embd, np.float32)
    h, h_prev = x.reshape(1, -1), x_prev.reshape(1, -1)                 # [1, C] views
    plan.embed(token, p, x)
    checking = engine._checking(step)
    first = engine.policy.min_exit_layer if checking else L
    exit_layer, check_logits, prop_f = L, None, 0
    # no checks before block `first`: those blocks in one call (lazy fill must run before each)
    start = 0 if engine.fill == "lazy" else max(0, min(first, L) - 1)
    plan.blocks_range(0, start, x, cache.kv, p)
    for layer in range(start + 1, L + 1):
        if engine.fill == "lazy":
            prop_f += engine.fill_pending(cache, layer, p + 1)
        plan.block(layer - 1, x, x_prev, cache.kv, p)
        if layer >= L or layer < first:
            continue
        state = ExitState(layer=layer, h=h, h_prev=h_prev, q=plan.q, k=plan.k, v=plan.v,
                          positions=np.array([p]), step=step,
                          predict=lambda hh, _l=layer: predict_one(engine, plan, hh, _l))
        mask, logits = engine.policy.decide(state)
        if mask[0]:
            exit_layer = layer
            check_logits = None if logits is None else logits[0]
            prop_f += engine._propagate(cache, h.copy(), np.array([p]), layer)
            break
    cache.length = p + 1
    exit_layers = np.array([exit_layer])
    if check_logits is None:
        logits, head_f = predict_one(engine, plan, h, exit_layer), engine._head_cost(exit_layers)
    else:
        logits, head_f = check_logits[None], np.zeros(1, dtype=np.int64)
    return ForwardResult(logits=logits, exit_layers=exit_layers,
                         block_flops=np.array([exit_layer * block_flops(cfg, p + 1)], dtype=np.int64),
                         check_flops=engine._check_flops(exit_layers, checking), head_flops=head_f,
                         propagation_flops=prop_f, full_flops=full_forward_flops(cfg, 1, 1, start=p))


def predict_one(engine, plan, h: np.ndarray, layer: int) -> np.ndarray:
    """``Engine.predict`` for one state h [1, C] through the fused LM head -> [1, V]."""
    if engine.exit_mapper is not None and layer < engine.config.n_layer:
        h = engine.exit_mapper(layer, h)
    logits = np.empty((1, engine.config.vocab_size), np.float32)
    plan.head(np.ascontiguousarray(h[0], dtype=np.float32), logits[0])
    return logits

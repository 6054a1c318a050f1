"""The fused single-token decode step (fast backend): ``Engine.forward`` for one token with
``model.decode_plan``, the compiled ``DecodePlan`` that runs a whole block in one call (layer
norms, the four matrix-vector products, the K/V write, attention over the cache, GELU) and the LM
head as one BLAS product.

Its own loop over the same step interface as the engine's layer loop: the same exit decisions
(``Policy.decide`` on an ``ExitState``), the same propagation and lazy fill (``Engine._propagate``,
``Engine.fill_pending``) and the same accounting. ``tests/test_fused.py`` checks it against the
NumPy layer loop.

Under ADEPT's learned exits (``Adept`` policy, ``--kv propagate``, eager fill) the whole step is
one compiled call instead, ``DecodePlan.step_adept`` with the engine's ``ExitPlan``
(``adept_exit_plan``): the gate after every block, the propagation of an exiting token's K/V and
the exit map run in C, so a Continue costs no Python between blocks.
"""
from __future__ import annotations

import math

import numpy as np

from . import backend
from .cache import KVCache
from .exits.policies import ExitState
from .flops import block_flops, full_forward_flops, kv_layer_flops


def decode_one(engine, token: int, cache: KVCache, step: int, plan):
    """``engine.forward([token], cache, step=step)`` through ``plan``; returns a ForwardResult."""
    from .engine import ForwardResult
    checking = engine._checking(step)
    ep = engine.exit_plan if checking else None
    if ep is not None:
        return _decode_compiled(engine, token, cache, step, plan, ep)
    return _decode_loop(engine, token, cache, step, plan, checking)


def _decode_compiled(engine, token: int, cache: KVCache, step: int, plan, ep):
    """``decode_one`` as one ``DecodePlan.step_adept`` call (ADEPT, eager propagation)."""
    from .engine import ForwardResult
    cfg, L, p = engine.config, engine.config.n_layer, cache.length
    tau = engine.policy.schedule(step)                 # < 1 here: the engine is checking
    cut = math.log(tau / (1.0 - tau)) if tau > 0.0 else -math.inf
    logits = np.empty((1, cfg.vocab_size), np.float32)
    k = plan.step_adept(ep, token, p, cache.kv, engine.policy.min_exit_layer, cut, logits[0])
    cache.length = p + 1
    exit_layers = np.array([k])
    prop_f = (L - k) * (kv_layer_flops(cfg) + engine.kv_map_flops)
    return ForwardResult(logits=logits, exit_layers=exit_layers,
                         block_flops=np.array([k * block_flops(cfg, p + 1)], dtype=np.int64),
                         check_flops=engine._check_flops(exit_layers, True), head_flops=engine._head_cost(exit_layers),
                         propagation_flops=int(prop_f), full_flops=full_forward_flops(cfg, 1, 1, start=p))


def adept_exit_plan(engine):
    """The ``ExitPlan`` of an engine whose exits the compiled step runs (an ``Adept`` policy,
    ``--kv propagate``, eager fill, the exit map of an ``AdeptParams`` or none), built once with
    the folded propagation weights of every exit layer from min_exit_layer; else None."""
    from .exits.adept import AdeptParams
    from .exits.policies import Adept
    D, pol, cfg = backend._load_decode(), engine.policy, engine.config
    if D is None or not isinstance(pol, Adept) or engine.kv != "propagate" or engine.fill != "eager":
        return None
    mapper = engine.exit_mapper
    if mapper is None:
        ew = eb = None
    elif getattr(mapper, "__func__", None) is AdeptParams.exit_map:
        ew, eb = mapper.__self__.exit_w, mapper.__self__.exit_b
    else:
        return None
    L = cfg.n_layer
    A, d = [None] * (L - 1), [None] * (L - 1)
    for k in range(max(1, pol.min_exit_layer), L):
        A[k - 1], d[k - 1] = engine.stacked.weights(k)
    return D.ExitPlan(L, cfg.n_embd, pol.params.policy_w, pol.params.policy_b, ew, eb, A, d)


def _decode_loop(engine, token: int, cache: KVCache, step: int, plan, checking: bool):
    """``decode_one`` block by block, the policy decided in Python after each block."""
    from .engine import ForwardResult
    cfg, L, p = engine.config, engine.config.n_layer, cache.length
    x, x_prev = np.empty(cfg.n_embd, np.float32), np.empty(cfg.n_embd, np.float32)
    h, h_prev = x.reshape(1, -1), x_prev.reshape(1, -1)                 # [1, C] views
    plan.embed(token, p, x)
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

"""Hypothesis strategies and builders shared by the property tests: random model shapes (head
sizes that are not a multiple of 4, e.g. n_embd 36 with 4 heads), random learned ADEPT parameters
(mappers and policy with small random values and the shapes of ``AdeptParams``' docstring), and
float32 kernel inputs that mix special values (ties, zeros, denormals, +-inf) drawn as values."""
from __future__ import annotations

import functools

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from minadept.exits.adept import AdeptParams, n_pairs

from randmodel import random_model

#: head sizes: 9 (n_embd 36, 4 heads) and other sizes that are not multiples of 4
HEAD_SIZES = [1, 3, 5, 8, 9]
VOCAB = 53


@functools.lru_cache(maxsize=64)
def cached_model(n_layer: int, n_head: int, head_dim: int, seed: int = 0, n_positions: int = 40):
    return random_model(n_layer=n_layer, n_head=n_head, n_embd=n_head * head_dim, vocab_size=VOCAB,
                        n_positions=n_positions, seed=seed)


#: (n_layer, n_head, head_dim, model seed)
model_shapes = st.tuples(st.integers(2, 4), st.integers(1, 4), st.sampled_from(HEAD_SIZES), st.integers(0, 3))


def random_adept(config, seed: int, *, rank: int = 2, threshold: float = 0.5) -> AdeptParams:
    """Random but well-formed learned parameters: exit maps near the identity, low-rank K/V maps,
    a policy whose logits spread over a few units."""
    rng = np.random.default_rng(seed)
    L, C = config.n_layer, config.n_embd
    P = n_pairs(L)

    def w(*shape, s=0.1):
        return (rng.standard_normal(shape) * s).astype(np.float32)
    exit_w = (np.eye(C, dtype=np.float32)[None] + w(L - 1, C, C, s=0.3 / np.sqrt(C))).astype(np.float32)
    return AdeptParams(exit_w=exit_w, exit_b=w(L - 1, C), kv_u=w(P, C, rank, s=0.3), kv_v=w(P, rank, C, s=0.3),
                       kv_c=w(P, C), policy_w=w(L - 1, C + 2, s=0.5), policy_b=w(L - 1, s=1.0),
                       threshold=threshold)


TINY32 = float(np.finfo(np.float32).tiny)
DENORMALS = [1e-40, -1e-40, 1.4e-45, -1.4e-45, 3e-39]
FINITE_SPECIALS = [float(np.float32(v)) for v in [0.0, -0.0, 1.0, -1.0, 0.5, TINY32, -TINY32] + DENORMALS]


def special_floats(lo=-1e4, hi=1e4, *, infs=(), extra=()):
    """float32 values: ordinary ones (subnormals allowed) or, often, a special value; a small
    pool of repeated values makes ties likely."""
    lo, hi = float(np.float32(lo)), float(np.float32(hi))
    ordinary = st.floats(lo, hi, width=32, allow_subnormal=True, allow_nan=False, allow_infinity=False)
    return st.one_of(ordinary, st.sampled_from(FINITE_SPECIALS + list(infs) + list(extra)),
                     st.sampled_from([2.0, -3.0, 7.25]))


def special_arrays(shape, **kw):
    return hnp.arrays(np.float32, shape, elements=special_floats(**kw))

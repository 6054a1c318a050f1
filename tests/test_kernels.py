"""Issue 6: every Cython kernel equals its NumPy twin (rtol 1e-5 + atol 1e-6, float32) over random
shapes, masks and extreme but finite values; the backend switch behaves.

The kernels accumulate in double, so the twins are evaluated on the same float32 inputs in double
precision and rounded to float32: at |x| ~ 1e4 two float32 summation orders differ by more than
1e-5, which says nothing about either kernel."""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minadept import backend
from minadept import reference as R
from minadept.errors import MinadeptError
from minadept.exits.policies import cosine_rows, softmax_top2_numpy

K = backend._load_fast()
needs_fast = pytest.mark.skipif(K is None, reason="minadept._kernels or minadept._decode is not built")

EXAMPLES = int(os.environ.get("MINADEPT_KERNEL_EXAMPLES", "200"))   # CI profile: >= 200 per kernel
SETTINGS = settings(max_examples=EXAMPLES, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def close(got, want, what=""):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6,
                               err_msg=f"{what}: max |diff| {np.abs(got - want).max() if got.size else 0}")


@st.composite
def arrays(draw, shape, scale=None):
    """float32 arrays with values up to |x| <= 1e4 (scale drawn per example)."""
    s = draw(st.sampled_from([1e-3, 1.0, 30.0, 1e4])) if scale is None else scale
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, size=shape) * s
    return x.astype(np.float32)


@needs_fast
@SETTINGS
@given(data=st.data(), n=st.integers(0, 6), c=st.integers(1, 200))
def test_layer_norm(data, n, c):
    x = data.draw(arrays((n, c)))
    g, b = data.draw(arrays((c,), 2.0)), data.draw(arrays((c,), 2.0))
    want = R.layer_norm(x.astype(np.float64), g.astype(np.float64), b.astype(np.float64), 1e-5)
    close(K.layer_norm(x, g, b, 1e-5), want.astype(np.float32), "layer_norm")


@needs_fast
@SETTINGS
@given(data=st.data(), n=st.integers(0, 6), m=st.integers(1, 300))
def test_gelu_tanh(data, n, m):
    x = data.draw(arrays((n, m)))
    close(K.gelu_tanh(x), R.gelu_tanh(x.astype(np.float64)).astype(np.float32), "gelu_tanh")


@needs_fast
@SETTINGS
@given(data=st.data(), H=st.integers(1, 12), D=st.sampled_from([1, 8, 32, 64]),
       S=st.integers(1, 1024), frac=st.floats(0, 1), kind=st.sampled_from(["decode", "subset", "full"]))
def test_attention(data, H, D, S, frac, kind):
    """Decode (one query at the last position), an arbitrary active subset (including empty),
    and every position; k/v are strided cache slices like the engine passes."""
    seed = data.draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    if kind == "decode":
        pos = np.array([S - 1])
    elif kind == "full":
        pos = np.arange(min(S, 64))
        S = len(pos)
    else:
        pos = np.flatnonzero(rng.random(min(S, 64)) < frac)
        S = max(S if len(pos) == 0 else int(pos.max()) + 1, 1)
    T = len(pos)
    scale = data.draw(st.sampled_from([0.1, 1.0, 10.0, 100.0]))    # 100: scores near/beyond -1e4
    cache = (rng.standard_normal((2, H, S + 5, D)) * scale).astype(np.float32)
    k, v = cache[0, :, :S], cache[1, :, :S]
    q = (rng.standard_normal((H, T, D)) * scale).astype(np.float32)
    got = K.attention(q, k, v, pos.astype(np.int64))
    want = R.attention(q, k, v, pos, dtype=np.float64)
    assert got.shape == (H, T, D)
    close(got, want, f"attention H={H} T={T} S={S} D={D}")


@needs_fast
@SETTINGS
@given(data=st.data(), H=st.integers(1, 6), T=st.integers(1, 40), S=st.integers(1, 300),
       scale=st.sampled_from([0.01, 0.125, 1.0]))
def test_causal_softmax(data, H, T, S, scale):
    """The prefill attention's masked softmax (between the two BLAS products), in place, for
    any query positions (an arbitrary active subset: sorted, possibly beyond S - 1)."""
    scores = data.draw(arrays((H, T, S)))
    seed = data.draw(st.integers(0, 2**32 - 1))
    q_pos = np.sort(np.random.default_rng(seed).integers(0, S + 3, T)).astype(np.int64)
    want = R.causal_softmax(scores.astype(np.float64), q_pos, scale).astype(np.float32)
    got = K.causal_softmax(scores.copy(), q_pos, scale)
    close(got, want, f"causal_softmax H={H} T={T} S={S}")


@needs_fast
@SETTINGS
@given(data=st.data(), n=st.integers(0, 5), V=st.integers(2, 3000))
def test_softmax_top2(data, n, V):
    logits = data.draw(arrays((n, V)))
    p1, m = K.softmax_top2(logits)
    want1, want_m = softmax_top2_numpy(logits.astype(np.float64)) if n else (np.zeros(0), np.zeros(0))
    close(p1, want1.astype(np.float32), "top-1")
    close(m, want_m.astype(np.float32), "top-1 minus top-2")


@needs_fast
@SETTINGS
@given(data=st.data(), n=st.integers(0, 6), c=st.integers(1, 300))
def test_cosine_rows(data, n, c):
    a, b = data.draw(arrays((n, c))), data.draw(arrays((n, c)))
    if n:
        b[0] = a[0] * 3                                   # parallel rows: cosine exactly 1 after clip
    close(K.cosine_rows(a, b), cosine_rows(a.astype(np.float64), b.astype(np.float64)).astype(np.float32), "cosine")


@needs_fast
@SETTINGS
@given(data=st.data(), n=st.integers(0, 8), c=st.integers(1, 300))
def test_adept_logit(data, n, c):
    """The learned exit policy's gating check (the ``adept`` policy's) vs its float64 twin."""
    from minadept.exits.adept import adept_logit_numpy
    h, hp = data.draw(arrays((n, c))), data.draw(arrays((n, c)))
    w = data.draw(arrays((c + 2,), scale=data.draw(st.sampled_from([1e-2, 1.0, 10.0]))))
    b = data.draw(st.floats(-20, 20))
    if n > 1:
        hp[1] = 0.0                                       # a zero row: cosine 0 by convention
    close(K.adept_logit(h, hp, w, b, 1e-5), adept_logit_numpy(h, hp, w, b), "adept_logit")


@needs_fast
def test_kernels_reject_mismatched_shapes():
    """Shapes the NumPy twins would reject or broadcast are errors, never reads out of bounds."""
    f = np.float32
    with pytest.raises(ValueError, match="attention"):
        K.attention(np.ones((2, 1, 4), f), np.ones((2, 3000, 4), f), np.ones((2, 1, 4), f), np.array([2999]))
    with pytest.raises(ValueError, match="attention"):
        K.attention(np.ones((8, 1, 4), f), np.ones((1, 3, 4), f), np.ones((1, 3, 4), f), np.array([2]))
    with pytest.raises(ValueError, match="attention"):
        K.attention(np.ones((2, 2, 4), f), np.ones((2, 3, 4), f), np.ones((2, 3, 4), f), np.array([2]))
    with pytest.raises(ValueError, match="layer_norm"):
        K.layer_norm(np.ones((4, 100), f), np.ones(1, f), np.zeros(1, f), 1e-5)
    with pytest.raises(ValueError, match="causal_softmax"):
        K.causal_softmax(np.ones((1, 10, 10), f), np.array([9]), 1.0)
    with pytest.raises(ValueError, match="cosine_rows"):
        K.cosine_rows(np.ones((200, 64), f), np.ones((1, 1), f))


@needs_fast
def test_kernels_at_the_float_limits():
    """Beyond |x| ~ 1e32 (GELU's cube overflows), at +-inf, NaN and all-equal rows: the kernels
    give what their twins give in double."""
    x = np.array([[-3e38, 3e38, -np.inf, np.inf, np.nan, -1e20, 1e20, -88.0, -104.0]], np.float32)
    with np.errstate(all="ignore"):
        want = R.gelu_tanh(x.astype(np.float64)).astype(np.float32)
    np.testing.assert_array_equal(K.gelu_tanh(x), want)
    lowest = np.full((1, 5), np.finfo(np.float32).min, np.float32)
    p1, m = K.softmax_top2(lowest)
    assert p1[0] == np.float32(0.2) and m[0] == 0
    p1, _ = K.softmax_top2(np.full((1, 5), -np.inf, np.float32))
    assert np.isnan(p1[0])                                # as the twin: exp(-inf - -inf) is NaN
    a = np.array([[np.nan, 1.0]], np.float32)
    assert np.isnan(K.cosine_rows(a, a)[0])


@needs_fast
def test_backend_switch(monkeypatch):
    monkeypatch.setenv("MINADEPT_BACKEND", "numpy")
    assert backend.select()[0] == "numpy"
    monkeypatch.setenv("MINADEPT_BACKEND", "fast")
    assert backend.select()[0] == "fast"
    monkeypatch.setenv("MINADEPT_BACKEND", "turbo")
    with pytest.raises(MinadeptError, match="MINADEPT_BACKEND"):
        backend.select()


def test_extension_is_built_where_a_compiler_exists():
    """The build treats the extension as optional (a machine without a C compiler still installs);
    this keeps a failed build from passing unnoticed: with a compiler, it must have been built.
    Set MINADEPT_NO_EXT=1 for the tests too when installing without it on purpose."""
    if os.environ.get("MINADEPT_NO_EXT"):
        pytest.skip("MINADEPT_NO_EXT is set: built without the extension on purpose")
    if not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler here")
    missing = backend.fast_missing()                  # minadept._kernels and minadept._decode
    assert not missing, f"a C compiler is present but {' and '.join(missing)} is not built"
    assert backend._load_fast() is not None


def test_fast_without_extension_is_an_error(monkeypatch):
    monkeypatch.setattr(backend, "_load_fast", lambda: None)
    monkeypatch.setenv("MINADEPT_BACKEND", "fast")
    with pytest.raises(MinadeptError, match="not built"):
        backend.select()
    monkeypatch.setenv("MINADEPT_BACKEND", "auto")
    assert backend.select() == ("numpy", None)


# ----------------------------------------------------------------------------- special values as drawn values

from strategies import special_arrays, special_floats  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402

INF = [float("inf"), float("-inf")]
SMALL = settings(max_examples=max(10, EXAMPLES // 2), deadline=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def same(got, want, what):
    """Equal to the float64 twin (rtol 1e-5, atol 1e-6); NaN where the twin gives NaN; infinities
    of the same sign."""
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, equal_nan=True,
                               err_msg=f"{what}: got {got!r} want {want!r}")


@needs_fast
@SMALL
@given(x=hnp.arrays(np.float32, st.tuples(st.integers(0, 4), st.integers(1, 40)),
                    elements=special_floats(-1e30, 1e30, infs=INF)))
def test_gelu_tanh_special_values(x):
    """Denormals (GELU(x) ~ x/2), signed zeros, ties, +-inf (the kernel contract: what the twin
    gives in double)."""
    with np.errstate(all="ignore"):
        want = R.gelu_tanh(x.astype(np.float64)).astype(np.float32)
    same(K.gelu_tanh(x), want, "gelu_tanh")


@needs_fast
@SMALL
@given(data=st.data(), n=st.integers(1, 4), c=st.integers(1, 40))
def test_layer_norm_special_values(data, n, c):
    """Finite inputs with denormals, zeros and all-equal rows (variance 0: the output is b)."""
    x = data.draw(special_arrays((n, c), lo=-1e3, hi=1e3))
    if data.draw(st.booleans(), label="constant row"):
        x[0] = x[0, 0]
    g, b = data.draw(special_arrays((c,), lo=-2, hi=2)), data.draw(special_arrays((c,), lo=-2, hi=2))
    want = R.layer_norm(x.astype(np.float64), g.astype(np.float64), b.astype(np.float64), 1e-5)
    got = K.layer_norm(x, g, b, 1e-5)
    same(got, want.astype(np.float32), "layer_norm")
    if x[0].min() == x[0].max():
        np.testing.assert_allclose(got[0], b, rtol=0, atol=1e-6)


@needs_fast
@SMALL
@given(data=st.data(), n=st.integers(1, 4), V=st.integers(2, 60))
def test_softmax_top2_special_values(data, n, V):
    """Ties at the top (margin exactly 0), denormals, -inf logits (probability 0) and a +inf."""
    logits = data.draw(hnp.arrays(np.float32, (n, V), elements=special_floats(-80, 80, infs=INF[1:])))
    if data.draw(st.booleans(), label="tie at the top"):
        logits[0, :2] = logits[0].max()
    assume_finite_max = np.isfinite(logits.max(-1)).all()
    with np.errstate(all="ignore"):
        w1, wm = softmax_top2_numpy(logits.astype(np.float64))
    p1, m = K.softmax_top2(logits)
    same(p1, w1.astype(np.float32), "top-1")
    same(m, wm.astype(np.float32), "margin")
    if assume_finite_max:
        top = np.sort(logits, -1)
        tied = top[:, -1] == top[:, -2]
        assert (m[tied] == 0).all(), "tied top logits must give margin 0"


@needs_fast
@SMALL
@given(data=st.data(), H=st.integers(1, 3), T=st.integers(1, 6), S=st.integers(1, 12),
       scale=st.sampled_from([0.125, 1.0]))
def test_causal_softmax_special_values(data, H, T, S, scale):
    """Scores with ties, denormals and -inf (a key masked out by the caller) among finite ones."""
    scores = data.draw(hnp.arrays(np.float32, (H, T, S), elements=special_floats(-1e3, 1e3, infs=INF[1:])))
    scores[..., 0] = data.draw(special_floats(-10, 10))        # position 0 is always visible and finite
    q_pos = np.sort(data.draw(hnp.arrays(np.int64, T, elements=st.integers(0, S + 2))))
    with np.errstate(all="ignore"):
        want = R.causal_softmax(scores.astype(np.float64), q_pos, scale).astype(np.float32)
    got = K.causal_softmax(scores.copy(), q_pos, scale)
    same(got, want, "causal_softmax")
    np.testing.assert_allclose(got.sum(-1), 1.0, rtol=0, atol=1e-5)   # each row is a distribution


@needs_fast
@SMALL
@given(data=st.data(), n=st.integers(1, 4), c=st.integers(1, 40))
def test_cosine_and_adept_logit_special_values(data, n, c):
    """Denormal, zero and tied rows: cosine in [-1, 1] and equal to the twin (a zero row gives 0)."""
    from minadept.exits.adept import adept_logit_numpy
    a, b = data.draw(special_arrays((n, c), lo=-1e3, hi=1e3)), data.draw(special_arrays((n, c), lo=-1e3, hi=1e3))
    with np.errstate(all="ignore"):
        want = cosine_rows(a.astype(np.float64), b.astype(np.float64)).astype(np.float32)
    got = K.cosine_rows(a, b)
    same(got, want, "cosine_rows")
    assert (np.abs(got) <= 1).all()
    w = data.draw(special_arrays((c + 2,), lo=-3, hi=3))
    bias = data.draw(special_floats(-5, 5))
    with np.errstate(all="ignore"):
        want = adept_logit_numpy(a, b, w, bias)
    same(K.adept_logit(a, b, w, bias, 1e-5), want, "adept_logit")


@needs_fast
@SMALL
@given(data=st.data(), H=st.integers(1, 3), D=st.sampled_from([1, 3, 5, 9]), S=st.integers(1, 10))
def test_attention_special_values(data, H, D, S):
    """q, k, v with denormals, zeros and tied keys (equal scores: the average of their values)."""
    q = data.draw(special_arrays((H, 1, D), lo=-30, hi=30))
    k = data.draw(special_arrays((H, S, D), lo=-30, hi=30))
    v = data.draw(special_arrays((H, S, D), lo=-30, hi=30))
    pos = np.array([S - 1])
    got = K.attention(q, k, v, pos)
    want = R.attention(q, k, v, pos, dtype=np.float64)
    same(got, want, "attention")
    kt = np.repeat(k[:, :1], S, axis=1)                    # every key tied: uniform weights
    np.testing.assert_allclose(K.attention(q, kt, v, pos), v.astype(np.float64).mean(1, keepdims=True),
                               rtol=1e-5, atol=1e-5)


@needs_fast
def test_cosine_rows_tiny_norm_product():
    """Rows of norms 1 and 1.2e-38 in the same direction: cosine 1 in the kernel and its twin."""
    a, b = np.array([[1.0]], np.float32), np.array([[np.finfo(np.float32).tiny]], np.float32)
    assert cosine_rows(a, b)[0] == 1.0
    same(K.cosine_rows(a, b), cosine_rows(a.astype(np.float64), b.astype(np.float64)).astype(np.float32),
         "cosine_rows")

"""Half-precision weights (``--dtype float16|bfloat16``, ``halfprec``).

1. The half-precision kernels (``_kernels.half_gemv``, ``half_matmul``, ``half_to_float32``)
   against a float64 NumPy twin on the same half-precision weights, shapes and values drawn by
   hypothesis. Tolerance, and why: the conversions are exact and every product and sum is float32,
   so the only error is float32 rounding in a sum of K terms (then + beta y). The classical bound
   for recursive summation, |fl(sum) - sum| <= gamma_n sum |terms| with gamma_n = n u / (1 - n u),
   u = 2^-24, n = K + 3 (the products, the adds, the beta step), is rigorous whatever the order of
   the sums; products that land among float32 subnormals add at most 2^-149 each. So the test
   asserts |got - want| <= 1.01 (K + 3) u (sum_k |w_nk x_k| + |beta y_n|) + (K + 3) 2^-149, per
   output n: never flaky, and tight enough that dropping one term is caught. The kernels keep W
   [out, in] (``halfprec``); ``half_matmul``'s rows are bit-identical to ``half_gemv``'s.
   The conversions are checked exhaustively (all 65536 bit patterns).
2. The fused decode step and the engine on a half-precision model (fast backend) against the
   NumPy layer loop on the same weights rounded to half then upcast (``Model.with_dtype(...,
   keep_half=False)``): the same tokens, exits and FLOPs, logits and cache at float32 level
   (``test_fused.close``), for every policy, ADEPT's compiled step and both prefill paths.
3. The embedded model with float16 / bfloat16 against float32: logits within stated bounds and
   greedy runs that agree (or part only at a measured near-tie).
4. Loading: an fp16 checkpoint read with --dtype float16 keeps the file's float16 values (no
   float32 copy); weights beyond the float16 range are a one-line error naming the tensor.
5. The CLI: ``--dtype`` on the model-loading commands, a bad value, the JSON summary, dumps,
   ``eval`` and ``info`` record the dtype.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from minadept import Model, backend, halfprec
from minadept import model as M
from minadept.engine import Engine
from minadept.errors import MinadeptError

from helpers import TEXT, cli_env, run_cli, write_checkpoint
from randmodel import random_model
from test_cli_errors import assert_one_line_error
from test_engine import PROMPT, run
from test_fused import POLICIES, _adept_run, _same_runs, close, on_backend

K = backend._load_fast()
D = backend._load_decode()
needs_fast = pytest.mark.skipif(K is None or D is None, reason="minadept._kernels or minadept._decode is not built")
HALF = ["float16", "bfloat16"]
U = 2.0 ** -24
SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# ----------------------------------------------------------------------------- 1. kernels


def half_values(bits: np.ndarray, dtype: str) -> np.ndarray:
    """Exact float64 values of half-precision bit patterns (NumPy's own conversions)."""
    if dtype == "float16":
        return bits.view(np.float16).astype(np.float64)
    return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def half_bits(shape, dtype):
    """Finite bit patterns of ``dtype``, uniform over patterns, so every exponent appears:
    zeros, subnormals, float16 up to 65504, bfloat16 up to ~1.6e4 (sums stay finite)."""
    top = 0x7BFF if dtype == "float16" else 0x467F
    return hnp.arrays(np.uint16, shape, elements=st.integers(0, top) | st.integers(0x8000, 0x8000 + top))


def f32(shape, lim=64.0):
    return hnp.arrays(np.float32, shape, elements=st.floats(-lim, lim, width=32, allow_subnormal=True))


def gemv_bound(x64, w64, beta, y64):
    """The rigorous float32 error bound of the module docstring, per output; w64 [out, in]."""
    n = w64.shape[1] + 3
    mag = np.abs(w64) @ np.abs(x64) + np.abs(beta * y64)
    return 1.01 * n * U * mag + n * 2.0 ** -149


@needs_fast
@SETTINGS
@given(data=st.data(), k=st.integers(0, 70), n=st.integers(1, 300), dtype=st.sampled_from(HALF),
       beta=st.sampled_from([0.0, 1.0, -0.5]), threads=st.sampled_from([1, 2]))
def test_half_gemv_equals_float64_twin(data, k, n, dtype, beta, threads):
    """y = W x + beta y (``x @ W.T``) with W [out, in] float16/bfloat16 equals its float64 twin on
    the same W within the float32 summation bound, on one thread and split over two (split_min
    0); beta 0 never reads y (it holds NaN)."""
    bits = data.draw(half_bits((n, k), dtype), label="W bits")
    x = data.draw(f32(k), label="x")
    y0 = data.draw(f32(n), label="y") if beta else np.full(n, np.nan, np.float32)
    y = y0.copy()
    K.half_gemv(bits, halfprec.KINDS[dtype], x, y, beta, threads, 0)
    w64, x64, y64 = half_values(bits, dtype), x.astype(np.float64), np.nan_to_num(y0.astype(np.float64))
    want = w64 @ x64 + beta * y64
    err = np.abs(y.astype(np.float64) - want)
    bound = gemv_bound(x64, w64, beta, y64)
    assert (err <= bound).all(), f"worst column {int(np.argmax(err - bound))}: |d| {err.max():.3g} > {bound[np.argmax(err - bound)]:.3g}"


@needs_fast
@SETTINGS
@given(data=st.data(), r=st.integers(0, 20), k=st.integers(1, 40), n=st.integers(1, 200), dtype=st.sampled_from(HALF),
       threads=st.sampled_from([1, 2]))
def test_half_matmul_equals_float64_twin(data, r, k, n, dtype, threads):
    """X [R, K] @ W.T for a few rows (the short-prefill kernel) within the same bound per entry,
    on one thread and with the outputs split over two; and every row bit-identical to
    ``half_gemv`` of that row (one summation order for both kernels, stated in half.h)."""
    bits = data.draw(half_bits((n, k), dtype), label="W bits")
    X = data.draw(f32((r, k)), label="X")
    got = K.half_matmul(X, bits, halfprec.KINDS[dtype], threads, 0)
    w64 = half_values(bits, dtype)
    for i in range(r):
        x64 = X[i].astype(np.float64)
        err = np.abs(got[i].astype(np.float64) - w64 @ x64)
        assert (err <= gemv_bound(x64, w64, 0.0, np.zeros(n))).all(), f"row {i}"
        y = np.empty(n, np.float32)
        K.half_gemv(bits, halfprec.KINDS[dtype], X[i], y, 0.0, 1)
        assert np.array_equal(got[i].view(np.uint32), y.view(np.uint32)), f"row {i} differs from half_gemv"


@needs_fast
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("k, n, threads", [(64 * 3 + 16 + 5, 4096 + 65, 2), (64, 4096, 1), (3, 8199, 2),
                                            (768, 50, 2)])
def test_half_gemv_split_changes_no_bit(dtype, k, n, threads):
    """Sums with whole 64-blocks, 16-blocks and a scalar tail, outputs split over two threads in
    shares of 16 rows (and one share past the end): every output is one thread's dot product in
    the same order, so the split changes no bit."""
    rng = np.random.default_rng(k * n)
    w = (rng.standard_normal((n, k)) * 0.5).astype(np.float32)
    bits = halfprec.round_bits("w", w, dtype)
    x = rng.standard_normal(k).astype(np.float32)
    y1, y2 = np.empty(n, np.float32), np.empty(n, np.float32)
    K.half_gemv(bits, halfprec.KINDS[dtype], x, y1, 0.0, 1)
    K.half_gemv(bits, halfprec.KINDS[dtype], x, y2, 0.0, threads, 0)
    w64, x64 = half_values(bits, dtype), x.astype(np.float64)
    assert np.array_equal(y1, y2)
    assert (np.abs(y1 - w64 @ x64) <= gemv_bound(x64, w64, 0.0, np.zeros(n))).all()


@needs_fast
def test_kernel_arguments_are_checked():
    """A kind or thread count that is not an integer is a TypeError (never truncated: 2.7 is not
    bfloat16), None is not an empty array, and y may not share memory with x (it is written
    while x is read)."""
    w = np.array([[0x3C00, 0x4000], [0x4200, 0x4400]], np.uint16)          # float16 1, 2, 3, 4
    x, y = np.ones(2, np.float32), np.zeros(2, np.float32)
    for bad in (2.7, 1.0, "1", True):
        with pytest.raises(TypeError, match="kind must be an integer"):
            K.half_gemv(w, bad, x, y)
        with pytest.raises(TypeError, match="kind must be an integer"):
            K.half_matmul(x[None], w, bad)
    with pytest.raises(TypeError, match="threads must be an integer"):
        K.half_gemv(w, 1, x, y, 0.0, 1.5)
    with pytest.raises(TypeError):
        K.half_gemv(None, 1, x, y)
    with pytest.raises(TypeError):
        K.half_to_float32([1, 2], 1)
    xy = np.ones(2, np.float32)
    with pytest.raises(ValueError, match="share memory"):
        K.half_gemv(w, 1, xy, xy)
    K.half_gemv(w, np.int64(1), x, y)
    assert y.tolist() == [3.0, 7.0]


@pytest.mark.parametrize("be", ["numpy", "fast"])
def test_half_matrix_scalar_index_is_a_scalar(be):
    """``m[i, j]`` of a HalfMatrix is the value as a float32 scalar on both backends."""
    if be == "fast" and K is None:
        pytest.skip("the compiled kernels are not built")
    m = halfprec.HalfMatrix(np.array([[0x3C00, 0x4000]], np.uint16), "float16")
    with on_backend(be):
        v = m[0, 1]
    assert np.ndim(v) == 0 and v == 2.0 and np.asarray(v).dtype == np.float32


@needs_fast
def test_conversions_are_exact_for_every_bit_pattern():
    """All 65536 patterns: the compiled float16 conversion equals NumPy's (NaN stays NaN; F16C
    quiets signalling NaNs, which finite weights never hold), the portable one (the path of a
    build without F16C) equals it bit for bit, bfloat16 is the 16-bit shift."""
    allbits = np.arange(65536, dtype=np.uint16)
    want = allbits.view(np.float16).astype(np.float32)
    nan = np.isnan(want)
    got = K.half_to_float32(allbits, 1)
    assert np.array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32)) and np.isnan(got[nan]).all()
    assert np.array_equal(K.f16_to_float32_portable(allbits).view(np.uint32), want.view(np.uint32))
    bf = K.half_to_float32(allbits.reshape(256, 256), 2)
    assert np.array_equal(bf.reshape(-1).view(np.uint32), allbits.astype(np.uint32) << 16)
    assert K.HALF_CONVERSION in ("f16c", "scalar") and D.HALF_CONVERSION == K.HALF_CONVERSION


def test_rounding_is_to_nearest_even():
    """``round_bits``: float16 as NumPy's cast; bfloat16 to nearest, ties to even (the bits just
    above a tie round up, a tie to the even pattern), exactly as ml_dtypes rounds."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(10000).astype(np.float32) * 10.0 ** rng.integers(-6, 4, 10000),
                        np.array([1 + 2 ** -8, 1 + 3 * 2 ** -8, 1 + 2 ** -8 + 2 ** -20, 0.0, -0.0], np.float32)])
    assert np.array_equal(halfprec.round_bits("x", x, "float16"), x.astype(np.float16).view(np.uint16))
    assert np.array_equal(halfprec.round_bits("x", x, "bfloat16"), x.astype(ml_dtypes.bfloat16).view(np.uint16))


# ----------------------------------------------------------------------------- 2. fused step and engine

MODEL = random_model(n_layer=4, seed=1)
TWINS = {dt: (MODEL.with_dtype(dt, keep_half=True), MODEL.with_dtype(dt, keep_half=False)) for dt in HALF}


@needs_fast
@pytest.mark.parametrize("dtype", HALF)
def test_half_model_holds_its_matrices_in_half_precision(dtype):
    """The four matrices of every block and wte, which is also the (tied) LM head, are
    HalfMatrix, read by the plan in place (wte's rows for the embedding, its [V, C] bits as the
    head's [out, in]); everything else is float32."""
    half, twin = TWINS[dtype]
    for b, tb in zip(half.params.h, twin.params.h):
        for f in ("ln_1_g", "ln_1_b", "c_attn_b", "attn_c_proj_b", "ln_2_g", "ln_2_b", "c_fc_b", "mlp_c_proj_b"):
            assert getattr(b, f).dtype == np.float32
        for f in halfprec.MATRIX_FIELDS:
            m = getattr(b, f)
            assert isinstance(m, halfprec.HalfMatrix) and m.dtype == dtype and m.bits.dtype == np.uint16
            assert m.kernel_bits.flags.c_contiguous and m.kernel_bits.shape == m.shape[::-1]   # [out, in]
            assert np.array_equal(np.asarray(m), getattr(tb, f))
    head = half.lm_head_t
    assert isinstance(head, halfprec.HalfMatrix) and head.kernel_bits.flags.c_contiguous
    assert head.kernel_bits.shape == (half.config.vocab_size, half.config.n_embd)
    wte = half.params.wte
    assert isinstance(wte, halfprec.HalfMatrix) and half.params.lm_head is wte
    assert wte.bits.flags.c_contiguous and np.shares_memory(head.kernel_bits, wte.bits)
    assert np.array_equal(np.asarray(wte), twin.params.wte) and half.params.wpe.dtype == np.float32
    assert np.array_equal(np.asarray(half.lm_head_t), twin.lm_head_t)
    assert half.decode_plan.wkind == halfprec.KINDS[dtype] and half.n_params == MODEL.n_params


@needs_fast
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), H=st.integers(1, 5), Dh=st.sampled_from([2, 3, 8, 9, 16]), n_ctx=st.integers(1, 30),
       L=st.integers(1, 3), seed=st.integers(0, 999), split=st.booleans(), dtype=st.sampled_from(HALF))
def test_fused_block_with_half_weights_equals_numpy_block(data, H, Dh, n_ctx, L, seed, split, dtype):
    """One fused block on float16/bfloat16 weights = ``qkv`` + ``write_kv`` + ``block_rest`` on the
    NumPy backend over the same weights rounded then upcast; also the LM head. ``split``: every
    product split over the OpenMP threads."""
    m = random_model(n_layer=L, n_head=H, n_embd=H * Dh, vocab_size=67, n_positions=n_ctx, seed=seed)
    half, twin = m.with_dtype(dtype, keep_half=True), m.with_dtype(dtype, keep_half=False)
    plan = half.decode_plan
    if split:
        plan.split_min, plan.attn_split_min = 1, 1
    rng = np.random.default_rng(seed)
    pos, l = data.draw(st.integers(0, n_ctx - 1)), data.draw(st.integers(0, L - 1))
    kv = rng.standard_normal((L, 2, H, n_ctx, Dh)).astype(np.float32)
    x = rng.standard_normal(H * Dh).astype(np.float32)
    with on_backend("numpy"):
        want_kv, blk = kv.copy(), twin.params.h[l]
        q, k, v = M.qkv(blk, x[None], twin.config)
        M.write_kv(want_kv[l], np.array([pos]), k, v)
        want = M.block_rest(blk, x[None], q, want_kv[l, 0, :, :pos + 1], want_kv[l, 1, :, :pos + 1],
                            np.array([pos]), twin.config)[0]
        want_logits = M.lm_head(twin, M.final_norm(twin.params, x[None], twin.config))[0]
    got, prev = x.copy(), np.empty_like(x)
    plan.block(l, got, prev, kv, pos)
    close(got, want, f"block {dtype}")
    close(kv, want_kv, "K/V written")
    logits = np.empty(67, np.float32)
    plan.head(x, logits)
    close(logits, want_logits, "head")


@needs_fast
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("fill", ["eager", "lazy"])
@pytest.mark.parametrize("name", list(POLICIES))
def test_engine_on_half_weights_equals_numpy_layer_loop(name, fill, dtype):
    """Generation with half-precision weights on the fast backend (prefill of 20 tokens through
    upcast BLAS products, its LM head row through ``half_matmul``, decode through the fused step)
    against the NumPy layer loop on the
    rounded-then-upcast twin: identical tokens, exits and FLOPs; logits and caches to float32 level."""
    half, twin = TWINS[dtype]
    with on_backend("numpy"):
        want = run(Engine(twin, POLICIES[name](), fill=fill), PROMPT, n_new=10)
    with on_backend("fast"):
        got = run(Engine(half, POLICIES[name](), fill=fill), PROMPT, n_new=10)
    _same_runs(want, got, 1 if name != "none" else 0)


@needs_fast
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("tau, mappers", [(0.6, True), (0.9, False)])
def test_compiled_adept_step_on_half_weights_equals_layer_loop(dtype, tau, mappers):
    """ADEPT in one compiled call (``step_adept``) with half-precision block matrices and LM head
    (its exit and K/V maps stay float32) against the NumPy layer loop on the twin; an 8-token
    prompt, so prefill runs the few-rows kernel (``half_matmul``)."""
    from strategies import random_adept
    m = random_model(n_layer=6, n_head=4, n_embd=32, vocab_size=97, n_positions=64, seed=4)
    params = random_adept(m.config, 11)
    half, twin = m.with_dtype(dtype, keep_half=True), m.with_dtype(dtype, keep_half=False)
    prompt = PROMPT[:8] % 97
    _, want = _adept_run("numpy", twin, params, tau, 1, mappers, prompt, n_new=30)
    eng, got = _adept_run("fast", half, params, tau, 1, mappers, prompt, n_new=30)
    assert eng.exit_plan is not None
    _same_runs(want, got, 1)
    assert len({int(r.exit_layers[0]) for r in got[3][1:]}) >= 2


@pytest.mark.parametrize("be", ["numpy", "fast"])
@pytest.mark.parametrize("rows", [1, 16, 17, 40])
def test_backend_matmul_of_a_half_matrix(be, rows):
    """``backend.matmul`` with a HalfMatrix equals the float32 product with the upcast matrix
    through every route: the few-rows kernel (fast, <= 16 rows), one upcast (NumPy backend), the
    upcast by panels of 8192 columns (a matrix wider than that, > 16 rows)."""
    if be == "fast" and K is None:
        pytest.skip("the compiled kernels are not built")
    rng = np.random.default_rng(rows)
    w32 = rng.standard_normal((24, 20000)).astype(np.float32)
    w = halfprec.weight("w", w32, "float16", keep=True)                # stored [out, in], as the kernels read
    x = rng.standard_normal((rows, 24)).astype(np.float32)
    with on_backend(be):
        got = backend.matmul(x, w)
        other = backend.matmul(x, halfprec.HalfMatrix(halfprec.round_bits("w", w32, "float16"), "float16"))
    w64 = np.asarray(w).astype(np.float64)
    assert got.dtype == np.float32 and got.shape == (rows, 20000)
    for i in range(rows):        # the summation bound holds for any order of the sums (BLAS's too)
        x64 = x[i].astype(np.float64)
        assert (np.abs(got[i] - x64 @ w64) <= gemv_bound(x64, w64.T, 0.0, 0.0)).all(), f"row {i}"
        # a HalfMatrix stored [in, out] (not the kernels' layout) takes the upcast route, as exact
        assert (np.abs(other[i] - x64 @ w64) <= gemv_bound(x64, w64.T, 0.0, 0.0)).all(), f"row {i}"


def test_numpy_backend_upcasts_at_load():
    """On the NumPy backend a half-precision model holds float32 arrays of the rounded values and
    says so; ``with_dtype`` checks its input."""
    with on_backend("numpy"):
        m = MODEL.with_dtype("float16")
        assert m.describe_dtype() == "dtype float16 weights, computed in float32 on the NumPy backend"
    assert not m.keeps_half and m.params.h[0].c_fc_w.dtype == np.float32
    assert np.array_equal(m.params.h[0].c_fc_w, MODEL.params.h[0].c_fc_w.astype(np.float16).astype(np.float32))
    if K is not None:                   # the upcast twin run on the fast backend does not claim NumPy
        with on_backend("fast"):
            assert m.describe_dtype() == "dtype float16 weights, upcast to float32 at load (computed in float32)"
    assert m.dtype_info() == {"dtype": "float16", "weights_in_memory": "float32", "half_conversion": None}
    with pytest.raises(MinadeptError, match="float32 model"):
        m.with_dtype("bfloat16")
    with pytest.raises(MinadeptError, match="dtype must be one of"):
        MODEL.with_dtype("float8")


# ----------------------------------------------------------------------------- 3. the embedded model

#: |logit(dtype) - logit(float32)| of the embedded model, measured at most 0.0068 (float16) and
#: 0.058 (bfloat16) over 1000 tokens of ../shared/corpus/valid.txt (top-1 agreement 100% and
#: 99.7%, perplexity +0.001% and +0.007%); the bounds leave a factor of ~3. A weight rounded to
#: float16 moves by at most 2^-11 of itself (bfloat16 2^-8): the logit errors scale with that ratio.
LOGIT_BOUND = {"float16": 0.02, "bfloat16": 0.15}
STORY = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the park "
         "with her dog, Max. One day, Lily saw a big red ball under a tree. She ran to get it, but "
         "a bird flew down and took it away. Lily was sad, but Max barked and chased the bird. ")


@pytest.fixture(scope="module")
def embedded():
    return Model.load()


@pytest.mark.parametrize("dtype", HALF)
def test_embedded_logits_within_bound(embedded, dtype):
    """Every logit of every position of a story and of helpers.TEXT, float16/bfloat16 against
    float32 (the backend of the process), within LOGIT_BOUND; and the top-1 token agrees wherever
    float32's top-2 gap exceeds twice the bound."""
    half = Model.load(dtype=dtype)
    ids = embedded.tokenizer.encode(STORY + TEXT)
    a = Engine(embedded).forward(ids, Engine(embedded).new_cache(), all_logits=True).logits
    b = Engine(half).forward(ids, Engine(half).new_cache(), all_logits=True).logits
    d = np.abs(a - b).max()
    assert d <= LOGIT_BOUND[dtype], f"max |d logit| {d:.4g}"
    top2 = np.sort(a, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2 * LOGIT_BOUND[dtype]
    assert (a.argmax(1) == b.argmax(1))[clear].all()


def greedy(model, exit="none", n=100, prompt="Once upon a time", gates=None):
    """Tokens, exit layers and logits of a greedy run (the README's first command with exit="adept").
    ``gates``: a list that receives, per generated token, the ADEPT gate logits its pass computed
    (the NumPy backend's layer loop; the compiled step computes them in C)."""
    from minadept.exits import adept as A
    from minadept.generate import generate
    from minadept.sampling import SamplingSettings
    from minadept.settings import EngineSettings, build_engine
    eng, cur, real = build_engine(model, EngineSettings(exit=exit)), [], A.AdeptParams.logit

    def recorded(self, k, h, h_prev):
        z = real(self, k, h, h_prev)
        cur.append(float(z[-1]))
        return z
    out = ([], [], [])
    try:
        if gates is not None:
            A.AdeptParams.logit = recorded
        for s in generate(eng, model.tokenizer.encode(prompt), max_new_tokens=n,
                          sampling=SamplingSettings(temperature=0), rng=np.random.default_rng(0)):
            for lst, v in zip(out, (s.token, int(s.result.exit_layers[-1]), s.result.logits[-1])):
                lst.append(v)
            if gates is not None:
                gates.append(list(cur))
                cur.clear()
    finally:
        A.AdeptParams.logit = real
    return out


def first_difference(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


@pytest.mark.parametrize("dtype", HALF)
def test_embedded_greedy_agrees_over_a_long_run(embedded, dtype):
    """300 greedy tokens at full depth: the same as float32, or the first difference is at a
    near-tie of float32's logits (top-2 gap within twice the logit bound)."""
    t32, _, l32 = greedy(embedded, n=300)
    th, _, _ = greedy(Model.load(dtype=dtype), n=300)
    i = first_difference(t32, th)
    if i is not None:
        top2 = np.sort(l32[i])[-2:]
        assert top2[1] - top2[0] <= 2 * LOGIT_BOUND[dtype], f"step {i}: tokens part without a near-tie"


#: How close to tau a gate of the float32 run must be to explain a different exit: 1e-3 for
#: float16 (its gates' P(Exit) moved by at most 1.9e-4 over the run below), 1e-2 for bfloat16
#: (at most 1.4e-3).
GATE_BOUND = {"float16": 1e-3, "bfloat16": 1e-2}


@pytest.mark.parametrize("dtype", HALF)
def test_readme_adept_run_is_the_same_or_parts_at_a_near_tie(embedded, dtype):
    """The README's first command (``--exit adept``, greedy), 100 tokens: the half-precision run
    gives float32's tokens and exit layers, or parts at a measured near-tie at that token:
    float32's top-2 logit gap within twice the logit bound, or one of its gates' P(Exit) within
    GATE_BOUND of tau (float32 run on the NumPy backend, its gates recorded). Measured on the
    stage-3 model: float16 and bfloat16 both give the same 100 tokens and exits (the nearest gate
    of the run, P 0.970497 against tau 0.97, moves by less than 1e-6 in float16; the largest gate
    move is 1.9e-4 in float16, 1.4e-3 in bfloat16)."""
    t16, e16, _ = greedy(Model.load(dtype=dtype), exit="adept")
    gates = []
    with on_backend("numpy"):
        t32, e32, l32 = greedy(embedded, exit="adept", gates=gates)
    assert len(gates) == len(t32) and any(gates), "no gate was recorded"
    i = first_difference(list(zip(t32, e32)), list(zip(t16, e16)))
    if i is not None:
        tau = json.loads((embedded.path / "adept.json").read_text())["threshold"]
        near_gate = min((abs(1 / (1 + math.exp(-z)) - tau) for z in gates[i]), default=1.0)
        top2 = np.sort(l32[i])[-2:]
        assert top2[1] - top2[0] <= 2 * LOGIT_BOUND[dtype] or near_gate < GATE_BOUND[dtype], \
            f"token {i}: {dtype} parts from float32 without a near-tie (top-2 gap {top2[1] - top2[0]:.4g}, gate {near_gate:.3g})"


# ----------------------------------------------------------------------------- 4. loading


@needs_fast
def test_fp16_checkpoint_loads_without_a_float32_copy(tmp_path, monkeypatch):
    """An fp16 safetensors checkpoint with --dtype float16 on the fast backend: the blocks'
    matrices hold the file's bit patterns unchanged, transposed once into the kernels' [out, in]
    layout (a float16 copy, never float32); wte, the embedding and the tied LM head, is the
    file's array itself."""
    from minadept import checkpoint
    from helpers import TINY
    write_checkpoint(tmp_path / "m", shape=TINY, variant="fp16", seed=2)
    read = {}
    real = checkpoint.read_tensors
    monkeypatch.setattr(checkpoint, "read_tensors", lambda d: read.setdefault("t", real(d)))
    with on_backend("fast"):
        m = Model.load(tmp_path / "m", dtype="float16")
    t = read["t"]
    for i, b in enumerate(m.params.h):
        for field, name in (("c_attn_w", "attn.c_attn.weight"), ("c_fc_w", "mlp.c_fc.weight"),
                            ("attn_c_proj_w", "attn.c_proj.weight"), ("mlp_c_proj_w", "mlp.c_proj.weight")):
            src = t[f"h.{i}.{name}"]
            m_ = getattr(b, field)
            assert src.dtype == np.float16 and m_.bits.dtype == np.uint16 and m_.kernel_bits.flags.c_contiguous
            assert np.array_equal(m_.bits, src.view(np.uint16))
    wte = m.params.wte                      # the embedding and the tied head: the file's array itself
    assert isinstance(wte, halfprec.HalfMatrix) and np.shares_memory(wte.bits, t["wte.weight"])
    assert m.lm_head_t.bits.dtype == np.uint16 and np.shares_memory(m.lm_head_t.kernel_bits, t["wte.weight"])
    assert np.array_equal(np.asarray(m.lm_head_t), t["wte.weight"].astype(np.float32).T)


@pytest.fixture(scope="module")
def too_big(tmp_path_factory):
    """A tiny checkpoint whose h.1.mlp.c_fc.weight holds 70000 (beyond float16, fine in bfloat16)."""
    from helpers import TINY
    from safetensors.numpy import save_file
    d = tmp_path_factory.mktemp("too-big")
    t = write_checkpoint(d, shape=TINY, seed=3)
    t["transformer.h.1.mlp.c_fc.weight"][5, 7] = -70000.0
    (d / "model.safetensors").unlink()
    save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})
    return d


@pytest.mark.parametrize("be", ["numpy", "fast"])
def test_weights_beyond_float16_are_an_error_naming_the_tensor(too_big, be):
    if be == "fast" and K is None:
        pytest.skip("the compiled kernels are not built")
    with on_backend(be):
        with pytest.raises(MinadeptError, match=r"h\.1\.mlp\.c_fc\.weight.*float16 range.*70000"):
            Model.load(too_big, dtype="float16")
        assert Model.load(too_big, dtype="bfloat16").dtype == "bfloat16"
    big = MODEL.params.wte.copy()
    big[3, 4] = 1e5
    from dataclasses import replace
    tied = M.Model(config=MODEL.config, params=replace(MODEL.params, wte=big, lm_head=big))
    with pytest.raises(MinadeptError, match=r"tensor wte\.weight has values outside the float16 range"):
        tied.with_dtype("float16")


def test_cli_out_of_range_is_one_line(too_big):
    r = run_cli("generate", "Hello", "--model", too_big, "--dtype", "float16", "--max-new-tokens", "2")
    assert r.returncode == 1
    assert_one_line_error(r, "h.1.mlp.c_fc.weight", "float16 range")


# ----------------------------------------------------------------------------- 5. the command line


@pytest.mark.parametrize("cmd", [["generate", "Hi"], ["eval", "--text", "x.txt"], ["dump", "--prompt", "a", "--out", "o.npz"],
                                 ["info"], ["calibrate", "--text", "x.txt"], ["classify", "good"]])
def test_bad_dtype_value_is_one_line(cmd):
    r = run_cli(*cmd, "--dtype", "half")
    assert r.returncode == 2
    assert_one_line_error(r, "--dtype", "invalid choice", "'half'", "float16", "bfloat16")


@pytest.mark.parametrize("be", ["fast", "numpy"])
def test_json_summary_records_the_dtype(be):
    if be == "fast" and K is None:
        pytest.skip("the compiled kernels are not built")
    r = run_cli("generate", "Once upon a time", "--dtype", "float16", "--temperature", "0", "--max-new-tokens", "5",
                "--json", env=cli_env(MINADEPT_BACKEND=be))
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stderr.splitlines()[-1])
    assert s["dtype"] == "float16"
    if be == "fast":
        assert s["weights_in_memory"] == "float16" and s["half_conversion"] == K.HALF_CONVERSION
    else:
        assert s["weights_in_memory"] == "float32" and s["half_conversion"] is None
    r = run_cli("generate", "Once upon a time", "--dtype", "bfloat16", "--max-new-tokens", "3", env=cli_env(MINADEPT_BACKEND=be))
    line = r.stderr.splitlines()[-1]
    assert ("computed in float32 on the NumPy backend" in line) == (be == "numpy") and "dtype bfloat16" in line
    r = run_cli("generate", "Once", "--max-new-tokens", "2", "--json")
    s = json.loads(r.stderr.splitlines()[-1])
    assert (s["dtype"], s["weights_in_memory"], s["half_conversion"]) == ("float32", "float32", None)


def test_dump_eval_and_info_record_the_dtype(tmp_path):
    out = tmp_path / "d.npz"
    r = run_cli("dump", "--prompt", "Once upon a time", "--out", out, "--dtype", "bfloat16")
    assert r.returncode == 0, r.stderr
    assert json.loads(str(np.load(out)["policy"]))["dtype"] == "bfloat16"
    r = run_cli("dump", "--prompt", "a", "--out", out, "--engine", "transformers", "--dtype", "float16")
    assert_one_line_error(r, "--dtype", "transformers")
    text = tmp_path / "t.txt"
    text.write_text(STORY)
    r = run_cli("eval", "--text", text, "--dtype", "float16", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.splitlines()[-1])["dtype"] == "float16"
    r = run_cli("eval", "--text", text, "--dtype", "bfloat16", "--sweep", "--json")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("dtype bfloat16 weights") and json.loads(lines[-1])["dtype"] == "bfloat16"
    r = run_cli("info", "--dtype", "float16")
    assert r.returncode == 0 and "half precision: float16 conversion" in r.stdout and "--dtype float16: dtype float16" in r.stdout
    if K is not None:
        assert f"float16 conversion {K.HALF_CONVERSION}" in r.stdout

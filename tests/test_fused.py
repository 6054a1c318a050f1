"""Issue 6: the fused single-token decode step (``minadept._decode.DecodePlan``) equals its NumPy
twin, one block at a time (hypothesis, random shapes, positions and caches) and as the engine's
single-token path (same exits, FLOPs, cache and tokens as the NumPy layer loop, every policy and
K/V fill). Its BLAS products are float32 like NumPy's, summed in another order, so outputs are
compared at the float32 level, not bit for bit: rtol 1e-5 plus an absolute 1e-5 times the
largest value of the array (a float32 sum's rounding scales with its terms, not its result)."""
from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minadept import backend
from minadept import model as M
from minadept.engine import Engine
from minadept.exits.policies import Confidence, Constant, Fixed, Margin, NoExit, Saturation

from randmodel import random_model
from test_engine import PROMPT, RandomExit, run
from test_kernels import SETTINGS

K = backend._load_decode()
pytestmark = pytest.mark.skipif(K is None, reason="minadept._kernels or minadept._decode is not built")


@contextmanager
def on_backend(name):
    """Run the body on backend ``name``, then restore the previous selection."""
    saved = backend._state
    backend.use(name)
    try:
        yield
    finally:
        backend._state = saved


def close(got, want, what):
    scale = max(1.0, float(np.abs(want).max())) if np.size(want) else 1.0
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * scale,
                               err_msg=f"{what}: max |diff| {np.abs(got - want).max()}")


@SETTINGS
@given(data=st.data(), H=st.integers(1, 6), D=st.sampled_from([1, 3, 5, 8, 9, 16, 32]),
       n_ctx=st.integers(1, 40), L=st.integers(1, 3), seed=st.integers(0, 2**32 - 1), split=st.booleans())
def test_block_equals_numpy_block(data, H, D, n_ctx, L, seed, split):
    """One fused block = ``qkv`` + ``write_kv`` + ``block_rest`` (NumPy backend) at any position
    of a random cache: the residual stream, the K/V written and the q|k|v left for exit checks.
    ``split``: every product and the attention heads split over the OpenMP threads (the path of
    models beyond 64 MB)."""
    m = random_model(n_layer=L, n_head=H, n_embd=H * D, vocab_size=11, n_positions=n_ctx, seed=seed % 1000)
    plan = m.decode_plan
    if split:
        plan.split_min, plan.attn_split_min = 1, 1
    rng = np.random.default_rng(seed)
    pos = data.draw(st.integers(0, n_ctx - 1))
    l = data.draw(st.integers(0, L - 1))
    kv = rng.standard_normal((L, 2, H, n_ctx, D)).astype(np.float32)
    x = rng.standard_normal(H * D).astype(np.float32)
    with on_backend("numpy"):
        want_kv = kv.copy()
        blk = m.params.h[l]
        q, k, v = M.qkv(blk, x[None], m.config)
        M.write_kv(want_kv[l], np.array([pos]), k, v)
        want = M.block_rest(blk, x[None], q, want_kv[l, 0, :, :pos + 1], want_kv[l, 1, :, :pos + 1],
                            np.array([pos]), m.config)[0]
    got, prev = x.copy(), np.empty_like(x)
    plan.block(l, got, prev, kv, pos)
    assert np.array_equal(prev, x)
    close(got, want, f"block H={H} D={D} pos={pos}")
    close(kv, want_kv, "K/V written")
    close(plan.q, q, "q")
    close(plan.k, k, "k")
    close(plan.v, v, "v")


@SETTINGS
@given(H=st.integers(1, 4), D=st.sampled_from([1, 3, 8, 9, 32]), V=st.integers(1, 300), seed=st.integers(0, 999),
       split=st.booleans())
def test_head_and_embed_equal_numpy(H, D, V, seed, split):
    m = random_model(n_layer=1, n_head=H, n_embd=H * D, vocab_size=V, n_positions=8, seed=seed)
    if split:
        m.decode_plan.split_min = 1
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(H * D).astype(np.float32) * 3
    logits = np.empty(V, np.float32)
    m.decode_plan.head(x, logits)
    with on_backend("numpy"):
        want = M.lm_head(m, M.final_norm(m.params, x[None], m.config))[0]
    close(logits, want, "head")
    tok, pos = int(rng.integers(V)), int(rng.integers(8))
    e = np.empty(H * D, np.float32)
    m.decode_plan.embed(tok, pos, e)
    assert np.array_equal(e, M.embed(m.params, np.array([tok]), np.array([pos]))[0])


MODEL = random_model(n_layer=4, seed=1)
POLICIES = {"none": NoExit, "fixed 2": lambda: Fixed(2), "random": lambda: RandomExit(0.3, 1),
            "confidence": lambda: Confidence(Constant(0.5)), "margin": lambda: Margin(Constant(0.4)),
            "saturation": lambda: Saturation(Constant(0.6))}


@pytest.mark.parametrize("fill", ["eager", "lazy"])
@pytest.mark.parametrize("name", list(POLICIES))
def test_engine_single_token_path_equals_layer_loop(name, fill):
    """Generation on the fast backend (single tokens through the fused step) against the NumPy
    backend (the layer loop): identical tokens, exit layers and FLOPs; logits and caches equal
    to float32 level."""
    out = {}
    for b in ("numpy", "fast"):
        with on_backend(b):
            out[b] = run(Engine(MODEL, POLICIES[name](), fill=fill), PROMPT, n_new=10)
    (ta, la, ca, ra), (tb, lb, cb, rb) = out["numpy"], out["fast"]
    assert ta == tb
    for a, b in zip(ra, rb):
        assert np.array_equal(a.exit_layers, b.exit_layers)
        for f in ("block_flops", "check_flops", "head_flops"):
            assert np.array_equal(getattr(a, f), getattr(b, f)), f
        assert (a.propagation_flops, a.full_flops) == (b.propagation_flops, b.full_flops)
    close(lb, la, "logits")
    close(cb.kv, ca.kv, "KV cache")
    assert np.array_equal(cb.pending, ca.pending) and cb.length == ca.length


def test_fused_path_is_taken_and_blas_threads_restored(monkeypatch):
    """The fast backend's decode goes through the plan, inside ``single_threaded_blas``, and
    every BLAS library gets its thread count back."""
    from threadpoolctl import threadpool_info
    import minadept.fused as F
    calls = []
    eng = Engine(MODEL)
    real = F.decode_one
    monkeypatch.setattr(F, "decode_one", lambda *a: calls.append(1) or real(*a))
    with on_backend("fast"):
        before = [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]
        run(eng, PROMPT, n_new=3)
        after = [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]
    assert len(calls) == 3 and before == after


def test_plan_rejects_a_mismatched_cache():
    plan = MODEL.decode_plan
    x, prev = np.zeros(MODEL.config.n_embd, np.float32), np.zeros(MODEL.config.n_embd, np.float32)
    bad = np.zeros((3, 2, MODEL.config.n_head, 8, MODEL.config.head_dim), np.float32)
    with pytest.raises(ValueError, match="KV cache"):
        plan.block(0, x, prev, bad, 0)
    good = np.zeros((4, 2, MODEL.config.n_head, 8, MODEL.config.head_dim), np.float32)
    with pytest.raises(ValueError, match="position"):
        plan.block(0, x, prev, good, 8)


def test_threads_sharing_a_model_get_their_own_results():
    """Two threads generating on one model (one DecodePlan): each gets what it gets alone."""
    import threading
    m = random_model(n_layer=4, n_head=4, n_embd=64, vocab_size=97, n_positions=64, seed=3)
    prompts = [PROMPT[:5], PROMPT[5:12]]
    with on_backend("fast"):
        alone = [run(Engine(m, RandomExit(0.3, 2)), p, n_new=40)[0] for p in prompts]
        for _ in range(3):
            out = [None, None]
            threads = [threading.Thread(target=lambda i=i: out.__setitem__(
                i, run(Engine(m, RandomExit(0.3, 2)), prompts[i], n_new=40)[0])) for i in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert out == alone


def test_min_exit_layer_zero_runs_like_one():
    """A policy with min_exit_layer 0 (the CLI refuses it; the API does not) checks from block 1
    on both backends."""
    out = {}
    for b in ("numpy", "fast"):
        with on_backend(b):
            out[b] = run(Engine(MODEL, Saturation(Constant(0.6), min_exit_layer=0)), PROMPT, n_new=8)
    assert out["numpy"][0] == out["fast"][0]
    assert [r.exit_layers.tolist() for r in out["numpy"][3]] == [r.exit_layers.tolist() for r in out["fast"][3]]
    # "like one": the same tokens, exits, check FLOPs and logits as min_exit_layer 1
    for b in ("numpy", "fast"):
        with on_backend(b):
            one = run(Engine(MODEL, Saturation(Constant(0.6), min_exit_layer=1)), PROMPT, n_new=8)
        assert one[0] == out[b][0]
        for a, c in zip(one[3], out[b][3]):
            assert np.array_equal(a.exit_layers, c.exit_layers)
        np.testing.assert_array_equal(one[1], out[b][1])
    assert any((r.exit_layers == 1).any() for r in out["numpy"][3]), "no exit at layer 1: min 0 untested"


def test_min_exit_layer_zero_counts_checks_like_one():
    """Checks run after blocks 1.. whatever min_exit_layer below 1 says: the same checks, the same FLOPs."""
    out = {m: run(Engine(MODEL, Saturation(Constant(0.6), min_exit_layer=m)), PROMPT, n_new=2)[3] for m in (0, 1)}
    for a, c in zip(out[0], out[1]):
        np.testing.assert_array_equal(a.check_flops, c.check_flops)


from hypothesis import HealthCheck, assume, settings  # noqa: E402

from strategies import VOCAB, cached_model, model_shapes, random_adept  # noqa: E402


@settings(deadline=None, max_examples=10, suppress_health_check=[HealthCheck.too_slow])
@given(shape=model_shapes, data=st.data())
def test_single_token_path_equals_layer_loop_wide(shape, data):
    """The fused decode step against the NumPy layer loop over random shapes (head sizes 1, 3, 5,
    8, 9), min_exit_layer, fills and random learned mappers: same tokens, exits and FLOPs."""
    n_layer, n_head, head_dim, mseed = shape
    # n_embd < 8 (e.g. 2): a layer norm over 2 numbers amplifies float32 rounding beyond the
    # 1e-5 comparison of two summation orders; the engine tests keep those shapes (one backend)
    assume(n_head * head_dim >= 8)
    model = cached_model(n_layer, n_head, head_dim, mseed)
    m_min = data.draw(st.integers(1, n_layer), label="min_exit_layer")
    fill = data.draw(st.sampled_from(["eager", "lazy"]), label="fill")
    mappers = data.draw(st.booleans(), label="mappers")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    params = random_adept(model.config, seed)
    prompt = np.random.default_rng(seed).integers(0, VOCAB, data.draw(st.integers(1, 10), label="T"))
    out = {}
    for b in ("numpy", "fast"):
        pol = RandomExit(0.35, seed)
        pol.min_exit_layer = m_min
        with on_backend(b):
            out[b] = run(Engine(model, pol, fill=fill, exit_mapper=params.exit_map if mappers else None,
                                kv_maps=params if mappers else None), prompt, n_new=6)
    (ta, la, ca, ra), (tb, lb, cb, rb) = out["numpy"], out["fast"]
    assert ta == tb
    for a, b in zip(ra, rb):
        assert np.array_equal(a.exit_layers, b.exit_layers)
        assert (a.exit_layers >= m_min).all()
        assert np.array_equal(a.check_flops, b.check_flops) and a.propagation_flops == b.propagation_flops
    close(lb, la, "logits")
    close(cb.kv, ca.kv, "KV cache")


# ----------------------------------------------------------------------------- ADEPT in one compiled call

def _adept_run(backend_name, model, params, tau, m_min, mappers, prompt, n_new=6, schedule=None):
    from minadept.exits.adept import adept_engine
    from minadept.exits.policies import Adept
    pol = Adept(schedule or Constant(tau), params, min_exit_layer=m_min)
    with on_backend(backend_name):
        eng = adept_engine(model, pol, params, exit_map=mappers, kv_map=mappers)
        return eng, run(eng, prompt, n_new=n_new)


def _same_runs(a_run, b_run, m_min):
    (ta, la, ca, ra), (tb, lb, cb, rb) = a_run, b_run
    assert ta == tb
    for a, b in zip(ra, rb):
        assert np.array_equal(a.exit_layers, b.exit_layers), (a.exit_layers, b.exit_layers)
        assert (a.exit_layers >= max(1, m_min)).all()
        for f in ("block_flops", "check_flops", "head_flops"):
            assert np.array_equal(getattr(a, f), getattr(b, f)), f
        assert (a.propagation_flops, a.full_flops) == (b.propagation_flops, b.full_flops)
    close(lb, la, "logits")
    close(cb.kv, ca.kv, "KV cache")
    assert cb.length == ca.length


@settings(deadline=None, max_examples=15, suppress_health_check=[HealthCheck.too_slow])
@given(shape=model_shapes, data=st.data())
def test_compiled_adept_step_equals_layer_loop(shape, data):
    """ADEPT's decode step in one compiled call (``DecodePlan.step_adept``: the gate after each
    block, the folded propagation of the exiting token's K/V into every skipped block, the exit
    map, the LM head) against the NumPy layer loop (``Adept.decide``, ``StackedKV``,
    ``Engine.predict``) over random shapes, thresholds, min_exit_layer and learned or identity
    maps: same tokens, exit layers and FLOPs; logits and K/V cache to float32 level."""
    n_layer, n_head, head_dim, mseed = shape
    assume(n_head * head_dim >= 8)
    model = cached_model(n_layer, n_head, head_dim, mseed)
    m_min = data.draw(st.integers(0, n_layer), label="min_exit_layer")
    tau = data.draw(st.sampled_from([0.0, 0.2, 0.5, 0.8, 0.95]), label="tau")
    mappers = data.draw(st.booleans(), label="mappers")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    params = random_adept(model.config, seed)
    prompt = np.random.default_rng(seed).integers(0, VOCAB, data.draw(st.integers(1, 10), label="T"))
    _, want = _adept_run("numpy", model, params, tau, m_min, mappers, prompt)
    eng, got = _adept_run("fast", model, params, tau, m_min, mappers, prompt)
    assert eng.exit_plan is not None
    _same_runs(want, got, m_min)


@pytest.mark.parametrize("tau, mappers, n_exit_layers", [(0.6, True, 3), (0.9, False, 1)])
def test_compiled_adept_step_is_taken_and_exits_at_several_layers(monkeypatch, tau, mappers, n_exit_layers):
    """On the fast backend an ADEPT engine decodes through ``step_adept`` alone (the Python
    block loop is never entered), and these fixed cases both exit early (at several layers in
    the first) and run to full depth, so the comparison covers exits, propagation and the last
    layer."""
    import minadept.fused as F
    m = random_model(n_layer=6, n_head=4, n_embd=32, vocab_size=97, n_positions=64, seed=4)
    params = random_adept(m.config, 11)
    prompt = PROMPT[:8] % 97
    _, want = _adept_run("numpy", m, params, tau, 1, mappers, prompt, n_new=30)
    monkeypatch.setattr(F, "_decode_loop", lambda *a: pytest.fail("the Python decode loop ran"))
    _, got = _adept_run("fast", m, params, tau, 1, mappers, prompt, n_new=30)
    _same_runs(want, got, 1)
    seen = {int(r.exit_layers[0]) for r in got[3][1:]}
    assert len(seen - {6}) >= n_exit_layers and 6 in seen, seen


def test_compiled_adept_step_follows_the_decay_schedule():
    """CALM's decaying threshold reaches the compiled step per generated token: the same exits
    as the layer loop when tau changes from step to step."""
    from minadept.exits.policies import Decay
    m = random_model(n_layer=6, n_head=4, n_embd=32, vocab_size=97, n_positions=64, seed=4)
    params = random_adept(m.config, 11)
    prompt = PROMPT[:8] % 97
    sched = Decay(0.9, horizon=12)
    _, want = _adept_run("numpy", m, params, None, 1, True, prompt, n_new=20, schedule=sched)
    _, got = _adept_run("fast", m, params, None, 1, True, prompt, n_new=20, schedule=sched)
    _same_runs(want, got, 1)


def test_exit_plan_only_for_what_it_runs():
    """The compiled step is used only where it is the same computation: ADEPT with eager
    propagation and an AdeptParams exit map (or none); lazy fill, the per-layer loop, another
    policy or a foreign exit map keep the Python loop."""
    from minadept.exits.adept import adept_engine
    from minadept.exits.policies import Adept
    params = random_adept(MODEL.config, 1)
    pol = Adept(Constant(0.5), params)
    with on_backend("fast"):
        assert adept_engine(MODEL, pol, params).exit_plan is not None
        assert adept_engine(MODEL, pol, params, fill="lazy").exit_plan is None
        assert adept_engine(MODEL, pol, params, kv_map=False, kv="propagate-loop").exit_plan is None
        assert adept_engine(MODEL, pol, params, kv_map=False, kv="oracle").exit_plan is None
        assert Engine(MODEL, Saturation(Constant(0.5))).exit_plan is None
        assert Engine(MODEL, pol, exit_mapper=lambda k, h: h).exit_plan is None


def test_import_shortens_openblas_thread_spin_unless_set():
    """``import minadept`` sets OPENBLAS_THREAD_TIMEOUT=18 (OpenBLAS's workers sleep after about
    2^18 cycles instead of 2^28, so after a prefill they do not take a core from the decode
    steps) before NumPy loads OpenBLAS, and keeps a value the user set."""
    import os
    import subprocess
    import sys
    code = "import os, minadept, numpy; print(os.environ['OPENBLAS_THREAD_TIMEOUT'])"
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "18"
    out = subprocess.run([sys.executable, "-c", code], env=dict(env, OPENBLAS_THREAD_TIMEOUT="25"),
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "25"

"""Behaviours of the early-exit engine pinned end to end through the public API only
(``Model``, ``Engine``, ``make_policy``, ``adept_engine``, ``generate``, ``backend.use``).

Every expectation here is derived independently of the code under test: from a stated invariant
(monotonicity, "exit means score > threshold", "oracle K/V = full-depth K/V"), from a by-hand
NumPy/float64 computation on recorded hidden states, or from the equivalence of two different
code paths (propagate vs propagate-loop, lazy vs eager, prefill vs token-by-token replay, the
fused decode step vs the NumPy layer loop). No value is copied from the implementation.

1. --kv propagate-loop = propagate end to end; both differ from the oracle at deeper layers
2. lazy fill with learned K/V maps = eager fill; lazy never spends more propagation FLOPs
3. the decay schedule (monotone in step, tends to 0.9 tau, step 0 undecayed, later exits earlier)
4. min_exit_layer (prefill, decode, fused decode) and its check-FLOP accounting
5. generate()'s stop reasons
6. prefill with exits = token-by-token replay (adept, confidence, margin)
7. fused decode with a learned exit map = the NumPy layer loop
8. never-exit = the plain model, with checks that really run
9. saturation decisions against an independent float64 cosine
"""
from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minadept import Engine, Model, backend
from minadept.exits.adept import adept_engine, load_adept
from minadept.exits.policies import make_policy
from minadept.generate import Generation, generate
from minadept.sampling import SamplingSettings

from randmodel import random_model

GREEDY = SamplingSettings(temperature=0)
L6 = 6
RAND = random_model(n_layer=L6, n_head=2, n_embd=32, vocab_size=97, n_positions=64, seed=0)
PROMPT = [int(t) for t in np.random.default_rng(1).integers(0, 97, 40)]
HYP = settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def fast_available() -> bool:
    saved = backend.active()
    try:
        backend.use("fast")
        return True
    except Exception:
        return False
    finally:
        backend.use(saved)


HAVE_FAST = fast_available()
needs_fast = pytest.mark.skipif(not HAVE_FAST, reason="the compiled kernels are not built")


@contextmanager
def on_backend(name):
    """Run the body on backend ``name`` (public ``backend.use``), then restore the previous one."""
    saved = backend.active()
    backend.use(name)
    try:
        yield
    finally:
        backend.use(saved)


@pytest.fixture(scope="module")
def embedded():
    model = Model.load()
    params = load_adept(model.path / "adept.safetensors", model.config)
    return model, params


@pytest.fixture(scope="module")
def story_ids(embedded):
    model, _ = embedded
    return model.tokenizer.encode("Once upon a time there was a little girl named Lily. "
                                  "She loved to play in the park with her dog.")


# ----------------------------------------------------------------------------- helpers

class Run:
    """A greedy generation driven by hand through ``Engine.forward`` (so the cache is kept)."""

    def __init__(self, engine, ids, n_new, *, step_of=lambda i: i):
        self.cache = engine.new_cache(len(ids) + n_new)
        r = engine.forward(ids, self.cache, step=0)
        self.results = [r]
        self.tokens = [int(np.argmax(r.logits[-1]))]
        for i in range(1, n_new):
            r = engine.forward([self.tokens[-1]], self.cache, step=step_of(i))
            self.results.append(r)
            self.tokens.append(int(np.argmax(r.logits[-1])))

    @property
    def exit_layers(self):
        return np.concatenate([r.exit_layers for r in self.results])

    @property
    def logits(self):
        return np.stack([r.logits[-1] for r in self.results])

    @property
    def propagation_flops(self):
        return sum(r.propagation_flops for r in self.results)

    def kv(self):
        return self.cache.kv[:, :, :, :self.cache.length]


def assert_runs_equal(a: Run, b: Run, *, logits_tol=1e-4, kv_tol=1e-5, what=""):
    assert a.tokens == b.tokens, what
    np.testing.assert_array_equal(a.exit_layers, b.exit_layers, err_msg=what)
    np.testing.assert_allclose(a.logits, b.logits, rtol=0, atol=logits_tol, err_msg=what)
    np.testing.assert_allclose(a.kv(), b.kv(), rtol=0, atol=kv_tol, err_msg=what)


def cosines64(hidden) -> np.ndarray:
    """cos(h_k, h_{k-1}) [n_layer, T] in float64 from recorded states [n_layer+1, T, C]."""
    h = np.asarray(hidden, dtype=np.float64)
    num = (h[1:] * h[:-1]).sum(-1)
    return num / (np.linalg.norm(h[1:], axis=-1) * np.linalg.norm(h[:-1], axis=-1))


def layer_norm64(x, g, b, eps):
    x = np.asarray(x, np.float64)
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * np.asarray(g, np.float64) + np.asarray(b, np.float64)


def full_depth_cache(model, ids):
    """A cache holding ``ids`` run at full depth (no exit policy)."""
    e = Engine(model, None)
    cache = e.new_cache()
    e.forward(ids, cache)
    return cache


def generated_exit_layers(steps):
    return [int(s.result.exit_layers[-1]) for s in steps]


# ----------------------------------------------------------------------------- 1. propagate-loop

def test_propagate_loop_generation_equals_propagate():
    """Greedy generation with real exits (deep layers skipped, in prompt and decode): the per-layer
    twin and the batched propagation give the same tokens, exits, logits and K/V; generate()
    agrees with the hand-driven loop under both modes."""
    pol = make_policy("confidence", RAND.config, threshold=0.5)
    runs = {kv: Run(Engine(RAND, pol, kv=kv), PROMPT[:16], 14) for kv in ("propagate", "propagate-loop")}
    a, b = runs["propagate"], runs["propagate-loop"]
    # the policy exits, early enough that several deeper layers are propagated
    assert (a.exit_layers <= L6 - 2).sum() >= 5, a.exit_layers
    assert (a.exit_layers[16:] < L6).any(), "no decode-time exit"
    assert_runs_equal(a, b, what="propagate-loop vs propagate")
    for kv, run in runs.items():
        steps = list(generate(Engine(RAND, pol, kv=kv), PROMPT[:16], max_new_tokens=14, sampling=GREEDY,
                              rng=np.random.default_rng(0)))
        assert [s.token for s in steps] == run.tokens, kv
        assert generated_exit_layers(steps) == [int(r.exit_layers[-1]) for r in run.results], kv


@pytest.mark.parametrize("kv", ["propagate", "propagate-loop"])
def test_propagated_kv_is_ln1_of_exit_state_by_hand(kv):
    """The K/V of a token that exited at k, at every deeper layer l, is the K/V projection of
    ln_1_l(h_k), computed here by hand in float64 from the recorded exit state."""
    pol = make_policy("confidence", RAND.config, threshold=0.5)
    e = Engine(RAND, pol, kv=kv)
    ids = PROMPT[:24]
    cache = e.new_cache()
    r = e.forward(ids, cache, all_logits=True, record_hidden=True)
    C, H, D, eps = RAND.config.n_embd, RAND.config.n_head, RAND.config.head_dim, RAND.config.layer_norm_epsilon
    checked = 0
    for t, k in enumerate(r.exit_layers):
        for l in range(int(k), L6):                     # 0-based block index l = block l+1 > k
            blk = RAND.params.h[l]
            a = layer_norm64(r.hidden[k, t], blk.ln_1_g, blk.ln_1_b, eps)
            kvv = a @ np.asarray(blk.c_attn_w, np.float64)[:, C:] + np.asarray(blk.c_attn_b, np.float64)[C:]
            want = kvv.reshape(2, H, D)
            np.testing.assert_allclose(cache.kv[l, :, :, t], want, rtol=0, atol=1e-5,
                                       err_msg=f"token {t} exit {k} layer {l + 1}")
            checked += 1
    assert checked >= 20


def test_oracle_kv_differs_from_propagated_at_deeper_layers():
    """Every token exits at layer 2 of 6 (fixed). The oracle runs the real blocks, so its cache is
    the full-depth cache at every layer; propagation is exact at block 3 (whose input *is* h_2)
    and differs at blocks 4..6. propagate-loop behaves like propagate there."""
    k, ids = 2, PROMPT[:20]
    pol = make_policy("fixed", RAND.config, exit_layer=k)
    caches = {}
    for kv in ("propagate", "propagate-loop", "oracle"):
        e = Engine(RAND, pol, kv=kv)
        caches[kv] = e.new_cache(len(ids))
        r = e.forward(ids, caches[kv], all_logits=True)
        assert (r.exit_layers == k).all()
    full = full_depth_cache(RAND, ids).kv[:, :, :, :len(ids)]
    np.testing.assert_allclose(caches["oracle"].kv, full, rtol=0, atol=1e-5)
    for kv in ("propagate", "propagate-loop"):
        np.testing.assert_allclose(caches[kv].kv[:k + 1], caches["oracle"].kv[:k + 1], rtol=0, atol=1e-5)
        for l in range(k + 1, L6):
            assert np.abs(caches[kv].kv[l] - caches["oracle"].kv[l]).max() > 1e-2, (kv, l)


def test_oracle_generation_differs_in_exited_kv():
    """In a generation with exits, --kv oracle's K/V of exited tokens at layers beyond exit+1
    differ from propagate's (the oracle runs the real blocks); non-exited tokens' K/V of the
    prompt's first token (which attends only to itself) agree."""
    pol = make_policy("confidence", RAND.config, threshold=0.5)
    a = Run(Engine(RAND, pol, kv="propagate"), PROMPT[:16], 8)
    o = Run(Engine(RAND, pol, kv="oracle"), PROMPT[:16], 8)
    ex = a.exit_layers[:16]                               # the prompt: same tokens in both runs
    diffs = [np.abs(a.kv()[l, :, :, t] - o.kv()[l, :, :, t]).max()
             for t in range(16) for l in range(int(ex[t]) + 1, L6)]
    assert diffs and max(diffs) > 1e-2


# ----------------------------------------------------------------------------- 2. lazy fill, learned K/V maps

def test_lazy_fill_with_learned_kv_maps_equals_eager(embedded, story_ids):
    model, params = embedded
    pol = make_policy("adept", model.config, adept=params, threshold=0.8)
    eager = Run(adept_engine(model, pol, params, kv_map=True, fill="eager"), story_ids, 10)
    lazy_engine = adept_engine(model, pol, params, kv_map=True, fill="lazy")
    lazy = Run(lazy_engine, story_ids, 10)
    assert (eager.exit_layers < model.config.n_layer - 1).sum() >= 5, eager.exit_layers
    assert eager.tokens == lazy.tokens
    np.testing.assert_array_equal(eager.exit_layers, lazy.exit_layers)
    np.testing.assert_allclose(eager.logits, lazy.logits, rtol=0, atol=1e-4)
    # lazy never spends more than eager, during the run
    assert 0 < lazy.propagation_flops <= eager.propagation_flops
    cum_e = np.cumsum([r.propagation_flops for r in eager.results])
    cum_l = np.cumsum([r.propagation_flops for r in lazy.results])
    assert (cum_l <= cum_e).all(), (cum_l, cum_e)          # at every point of the generation
    flushed = lazy_engine.flush(lazy.cache)
    assert flushed > 0, "nothing was left pending: the lazy path was not exercised"
    # each pending (layer, position) is filled exactly once: lazy + flush = eager
    assert lazy.propagation_flops + flushed == eager.propagation_flops
    assert adept_engine(model, pol, params, kv_map=True, fill="eager").flush(eager.cache) == 0
    np.testing.assert_allclose(lazy.kv(), eager.kv(), rtol=0, atol=1e-5)
    # the learned map matters: the identity map fills different K/V
    ident = Run(adept_engine(model, pol, params, kv_map=False, fill="eager"), story_ids, 1)
    assert np.abs(ident.kv()[:, :, :, :len(story_ids)] - eager.kv()[:, :, :, :len(story_ids)]).max() > 1e-3


# ----------------------------------------------------------------------------- 3. decay schedule

TAU_D, HORIZON = 0.5, 4
STEPS = [0, 1, 2, 3, 5, 8, 16, 50, 10**6]


def single_token_exits(engine, positions, step):
    """Exit layer of PROMPT[p] fed alone after a full-depth cache of PROMPT[:p], for each p."""
    out = []
    for p in positions:
        cache = full_depth_cache(RAND, PROMPT[:p])
        out.append(int(engine.forward([PROMPT[p]], cache, step=step).exit_layers[0]))
    return np.array(out)


def test_decay_threshold_through_exit_layers():
    """Same state, different generated-token index: the exit layer never rises with step (the
    threshold is non-increasing), equals the constant schedule at 0.9 tau far out (the limit),
    equals the undecayed start value 0.9 tau + 0.1 at step 0 (no earlier than constant tau), and
    is earlier than constant tau for some token late in the generation."""
    positions = range(4, 30)
    decay = Engine(RAND, make_policy("confidence", RAND.config, threshold=TAU_D, schedule="decay",
                                     horizon=HORIZON))
    by_step = np.stack([single_token_exits(decay, positions, s) for s in STEPS])
    assert (np.diff(by_step, axis=0) <= 0).all(), by_step
    const = lambda t: single_token_exits(Engine(RAND, make_policy("confidence", RAND.config, threshold=t)),
                                         positions, 0)
    tau_exits = const(TAU_D)
    np.testing.assert_array_equal(by_step[-1], const(0.9 * TAU_D))
    np.testing.assert_array_equal(by_step[0], const(0.9 * TAU_D + 0.1))
    assert (by_step[0] >= tau_exits).all() and (by_step[0] > tau_exits).any()
    assert (by_step[-1] <= tau_exits).all() and (by_step[-1] < tau_exits).any()
    assert (by_step[0] != by_step[1]).any(), "step 1 is already decayed"


def test_decay_in_generate_prompt_undecayed_and_later_exits_earlier():
    """generate() passes the generated-token index to the schedule: the prompt pass is step 0
    (the undecayed value, so the same prompt exits as under constant 0.9 tau + 0.1), and a
    hand-driven replay with explicit steps 0, 1, 2, ... reproduces every decision. Late in the
    generation tokens exit earlier than under the constant schedule at the same tau."""
    pol = make_policy("confidence", RAND.config, threshold=TAU_D, schedule="decay", horizon=HORIZON)
    gen = Generation(prompt_ids=[])
    steps = list(generate(Engine(RAND, pol), PROMPT[:12], max_new_tokens=24, sampling=GREEDY,
                          rng=np.random.default_rng(0), state=gen))
    start = Engine(RAND, make_policy("confidence", RAND.config, threshold=0.9 * TAU_D + 0.1))
    want = start.forward(PROMPT[:12], start.new_cache(), all_logits=True).exit_layers
    np.testing.assert_array_equal(gen.prompt_result.exit_layers, want)
    replay = Run(Engine(RAND, pol), PROMPT[:12], 24)
    assert replay.tokens == [s.token for s in steps]
    assert [int(r.exit_layers[-1]) for r in replay.results] == generated_exit_layers(steps)
    const_steps = list(generate(Engine(RAND, make_policy("confidence", RAND.config, threshold=TAU_D)),
                                PROMPT[:12], max_new_tokens=24, sampling=GREEDY, rng=np.random.default_rng(0)))
    late_decay, late_const = generated_exit_layers(steps)[8:], generated_exit_layers(const_steps)[8:]
    assert np.mean(late_decay) < np.mean(late_const), (late_decay, late_const)


def test_decay_tau_one_never_exits_nor_checks():
    pol = make_policy("saturation", RAND.config, threshold=1.0, schedule="decay", horizon=1)
    steps = list(generate(Engine(RAND, pol), PROMPT[:8], max_new_tokens=12, sampling=GREEDY,
                          rng=np.random.default_rng(0)))
    for s in steps:
        assert (s.result.exit_layers == L6).all() and s.result.check_flops.sum() == 0


# ----------------------------------------------------------------------------- 4. min_exit_layer

def per_check_cost(policy_name):
    """FLOPs of one check per token, measured: at min_exit_layer 1 and threshold 0 every token
    exits after exactly one check (layer 1)."""
    e = Engine(RAND, make_policy(policy_name, RAND.config, threshold=0.0, min_exit_layer=1))
    r = e.forward(PROMPT[:10], e.new_cache(), all_logits=True)
    assert (r.exit_layers == 1).all()
    assert (r.check_flops == r.check_flops[0]).all() and r.check_flops[0] > 0
    return int(r.check_flops[0])


def expected_checks(exit_layers, m):
    """Checks run after blocks m..exit (none after the last block): count per token."""
    return np.array([min(int(e), L6 - 1) - m + 1 for e in exit_layers])


def decode_results(engine, ids, n):
    cache = full_depth_cache(RAND, ids[:8])
    return [engine.forward([t], cache, step=1 + i) for i, t in enumerate(ids[8:8 + n])]


@pytest.mark.parametrize("m", [2, 3, 4, L6 - 1])
def test_min_exit_layer_prefill_and_decode(m):
    """No token exits below m; with threshold 0 every token exits exactly at m; with a real
    threshold tokens exit at m and above; check FLOPs = (checks from m to the exit) x the
    per-check cost measured at min_exit_layer 1."""
    c = per_check_cost("confidence")
    eager0 = Engine(RAND, make_policy("confidence", RAND.config, threshold=0.0, min_exit_layer=m))
    r0 = eager0.forward(PROMPT, eager0.new_cache(), all_logits=True)
    np.testing.assert_array_equal(r0.exit_layers, m)
    e = Engine(RAND, make_policy("confidence", RAND.config, threshold=0.5, min_exit_layer=m))
    r = e.forward(PROMPT, e.new_cache(), all_logits=True)
    assert (r.exit_layers >= m).all()
    assert (r.exit_layers < L6).any() and (r.exit_layers == m).any()
    np.testing.assert_array_equal(r.check_flops, expected_checks(r.exit_layers, m) * c)
    assert int(r.check_flops.sum()) == int(expected_checks(r.exit_layers, m).sum()) * c
    # decode: single tokens (the fused step on the fast backend)
    for res in decode_results(eager0, PROMPT, 8):
        assert int(res.exit_layers[0]) == m and int(res.check_flops[0]) == c
    dec = decode_results(e, PROMPT, 16)
    ex = np.array([int(x.exit_layers[0]) for x in dec])
    assert (ex >= m).all() and (ex < L6).any()
    np.testing.assert_array_equal([int(x.check_flops[0]) for x in dec], expected_checks(ex, m) * c)


@needs_fast
@pytest.mark.parametrize("m", [2, 4])
def test_min_exit_layer_fused_decode(m):
    """The fused single-token step (fast backend) honours min_exit_layer like the layer loop:
    same exit layers and check FLOPs as the NumPy backend, none below m."""
    pol = make_policy("confidence", RAND.config, threshold=0.5, min_exit_layer=m)
    out = {}
    for name in ("numpy", "fast"):
        with on_backend(name):
            dec = decode_results(Engine(RAND, pol), PROMPT, 24)
            out[name] = (np.array([int(x.exit_layers[0]) for x in dec]),
                         np.array([int(x.check_flops[0]) for x in dec]))
            z = decode_results(Engine(RAND, make_policy("confidence", RAND.config, threshold=0.0,
                                                        min_exit_layer=m)), PROMPT, 4)
            assert all(int(x.exit_layers[0]) == m for x in z), name
    np.testing.assert_array_equal(out["fast"][0], out["numpy"][0])
    np.testing.assert_array_equal(out["fast"][1], out["numpy"][1])
    assert (out["fast"][0] >= m).all() and (out["fast"][0] == m).any()


def test_min_exit_layer_saturation_check_flops():
    """The same accounting for a cheap measure (saturation), per-check cost measured from a
    never-exiting run at min_exit_layer 1 (L-1 checks per token)."""
    e1 = Engine(RAND, make_policy("saturation", RAND.config, threshold=0.999999, min_exit_layer=1))
    r1 = e1.forward(PROMPT[:10], e1.new_cache(), all_logits=True)
    assert (r1.exit_layers == L6).all()
    c = int(r1.check_flops[0]) // (L6 - 1)
    assert c > 0 and (r1.check_flops == c * (L6 - 1)).all()
    e = Engine(RAND, make_policy("saturation", RAND.config, threshold=0.8, min_exit_layer=3))
    r = e.forward(PROMPT, e.new_cache(), all_logits=True)
    assert (r.exit_layers >= 3).all() and (r.exit_layers < L6).any()
    np.testing.assert_array_equal(r.check_flops, expected_checks(r.exit_layers, 3) * c)


# ----------------------------------------------------------------------------- 5. stop reasons

def test_stop_reason_eot_yields_eot_and_nothing_after():
    ref = [s.token for s in generate(Engine(RAND, None), PROMPT[:6], max_new_tokens=10, sampling=GREEDY,
                                     rng=np.random.default_rng(0))]
    eot = ref[2]
    first = ref.index(eot)                                  # <= 2
    gen = Generation(prompt_ids=[])
    steps = list(generate(Engine(RAND, None), PROMPT[:6], max_new_tokens=10, sampling=GREEDY,
                          rng=np.random.default_rng(0), eot_id=eot, state=gen))
    assert [s.token for s in steps] == ref[:first + 1]
    assert steps[-1].token == eot and gen.tokens == ref[:first + 1]
    assert gen.stop_reason == "eot"


@pytest.mark.parametrize("policy", [None, "confidence"])
def test_stop_reason_max_new_tokens(policy):
    pol = None if policy is None else make_policy(policy, RAND.config, threshold=0.5)
    for n in (1, 5):
        gen = Generation(prompt_ids=[])
        steps = list(generate(Engine(RAND, pol), PROMPT[:6], max_new_tokens=n, sampling=GREEDY,
                              rng=np.random.default_rng(0), eot_id=None, state=gen))
        assert len(steps) == n and len(gen.tokens) == n and gen.stop_reason == "max_new_tokens"
        # the first token comes from the prompt pass, each later one from a single-token pass
        assert [len(s.result.exit_layers) for s in steps] == [6] + [1] * (n - 1)


@pytest.mark.parametrize("policy", [None, "confidence"])
def test_stop_reason_context_full(policy):
    """n_positions 16, prompt 10: positions 10..15 take the fed-back tokens, so the prompt pass
    and six decode passes predict 7 tokens, then the context is full."""
    small = random_model(n_layer=3, n_positions=16, seed=3)
    pol = None if policy is None else make_policy(policy, small.config, threshold=0.5)
    gen = Generation(prompt_ids=[])
    steps = list(generate(Engine(small, pol), PROMPT[:10], max_new_tokens=100, sampling=GREEDY,
                          rng=np.random.default_rng(0), state=gen))
    assert len(steps) == 16 - 10 + 1
    assert gen.stop_reason == "context_full"
    # a prompt that exactly fills the context still yields its one prediction
    gen2 = Generation(prompt_ids=[])
    assert len(list(generate(Engine(small, pol), PROMPT[:16], max_new_tokens=5, sampling=GREEDY,
                             rng=np.random.default_rng(0), state=gen2))) == 1
    assert gen2.stop_reason == "context_full"


# ----------------------------------------------------------------------------- 6. prefill = replay

def prefill_vs_replay(engine, ids):
    cache_p = engine.new_cache(len(ids))
    rp = engine.forward(ids, cache_p, all_logits=True)
    cache_r = engine.new_cache(len(ids))
    singles = [engine.forward([t], cache_r) for t in ids]
    exits_r = np.array([int(s.exit_layers[0]) for s in singles])
    np.testing.assert_array_equal(rp.exit_layers, exits_r)
    np.testing.assert_allclose(rp.logits, np.concatenate([s.logits for s in singles]), rtol=0, atol=1e-4)
    np.testing.assert_allclose(cache_p.kv, cache_r.kv, rtol=0, atol=1e-5)
    return rp.exit_layers


def test_prefill_equals_replay_adept(embedded, story_ids):
    model, params = embedded
    pol = make_policy("adept", model.config, adept=params, threshold=0.85)
    for fill in ("eager", "lazy"):
        engine = adept_engine(model, pol, params, fill=fill)
        if fill == "lazy":
            cache_p, cache_r = engine.new_cache(len(story_ids)), engine.new_cache(len(story_ids))
            rp = engine.forward(story_ids, cache_p, all_logits=True)
            singles = [engine.forward([t], cache_r) for t in story_ids]
            engine.flush(cache_p), engine.flush(cache_r)
            np.testing.assert_array_equal(rp.exit_layers, [int(s.exit_layers[0]) for s in singles])
            np.testing.assert_allclose(cache_p.kv, cache_r.kv, rtol=0, atol=1e-5)
            continue
        ex = prefill_vs_replay(engine, story_ids)
        assert len(set(ex.tolist()) - {model.config.n_layer}) >= 3, ex


@pytest.mark.parametrize("name,tau", [("confidence", 0.5), ("margin", 0.3)])
def test_prefill_equals_replay_lm_head_policy(name, tau):
    ex = prefill_vs_replay(Engine(RAND, make_policy(name, RAND.config, threshold=tau)), PROMPT)
    assert len(set(ex.tolist()) - {L6}) >= 3, ex


@HYP
@given(seed=st.integers(0, 10**6), T=st.integers(2, 24),
       pol=st.sampled_from([("margin", 0.3), ("margin", 0.15), ("confidence", 0.5), ("confidence", 0.35)]),
       m=st.integers(1, L6), fill=st.sampled_from(["eager", "lazy"]))
def test_prefill_equals_replay_random_prompts(seed, T, pol, m, fill):
    """LM-head policies (confidence, margin), min_exit_layer and fill drawn."""
    ids = [int(x) for x in np.random.default_rng(seed).integers(0, 97, T)]
    name, tau = pol
    engine = Engine(RAND, make_policy(name, RAND.config, threshold=tau, min_exit_layer=m), fill=fill)
    if fill == "eager":
        assert (prefill_vs_replay(engine, ids) >= m).all()
    else:
        cache_p, cache_r = engine.new_cache(len(ids)), engine.new_cache(len(ids))
        rp = engine.forward(ids, cache_p, all_logits=True)
        singles = [engine.forward([t], cache_r) for t in ids]
        engine.flush(cache_p), engine.flush(cache_r)
        np.testing.assert_array_equal(rp.exit_layers, [int(s.exit_layers[0]) for s in singles])
        np.testing.assert_allclose(rp.logits, np.concatenate([s.logits for s in singles]), rtol=0, atol=1e-4)
        np.testing.assert_allclose(cache_p.kv, cache_r.kv, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- 7. fused decode, exit map

@needs_fast
def test_fused_decode_with_learned_exit_map_equals_numpy(embedded, story_ids):
    model, params = embedded
    pol = make_policy("adept", model.config, adept=params, threshold=0.85)
    runs = {}
    for name in ("numpy", "fast"):
        with on_backend(name):
            runs[name] = Run(adept_engine(model, pol, params, exit_map=True), story_ids, 16)
    a, b = runs["numpy"], runs["fast"]
    dec = a.exit_layers[len(story_ids):]
    assert (dec < model.config.n_layer).sum() >= 4, dec       # the exit map is used in decode
    assert a.tokens == b.tokens
    np.testing.assert_array_equal(a.exit_layers, b.exit_layers)
    np.testing.assert_allclose(a.logits, b.logits, rtol=0, atol=1e-4)
    # and the exit map really changes the predictions of exited tokens
    with on_backend("fast"):
        ident = Run(adept_engine(model, pol, params, exit_map=False), story_ids, 16)
    np.testing.assert_array_equal(ident.exit_layers[:len(story_ids) + 1], a.exit_layers[:len(story_ids) + 1])
    assert np.abs(ident.logits[0] - a.logits[0]).max() > 1e-2 or a.exit_layers[len(story_ids) - 1] == 12


# ----------------------------------------------------------------------------- 8. never exit

def test_never_exit_equals_plain_model_with_checks_running():
    ids = PROMPT[:20]
    plain = Engine(RAND, None)
    rp = plain.forward(ids, plain.new_cache(), all_logits=True, record_hidden=True)
    assert cosines64(rp.hidden).max() < 0.999, "a cosine reaches the threshold: pick another model"
    off = Engine(RAND, make_policy("saturation", RAND.config, threshold=1.0))
    on = Engine(RAND, make_policy("saturation", RAND.config, threshold=0.999999))
    r_off = off.forward(ids, off.new_cache(), all_logits=True)
    r_on = on.forward(ids, on.new_cache(), all_logits=True)
    assert r_off.check_flops.sum() == 0
    assert (r_on.check_flops > 0).all(), "checks did not run"
    for r in (r_off, r_on):
        assert (r.exit_layers == L6).all()
        if backend.active() == "numpy":
            np.testing.assert_array_equal(r.logits, rp.logits)
        else:
            np.testing.assert_allclose(r.logits, rp.logits, rtol=0, atol=1e-5)
    # generation: every decode step checks and still equals the plain model
    runs = {n: Run(e, ids, 10) for n, e in (("plain", plain), ("off", off), ("on", on))}
    for n in ("off", "on"):
        assert runs[n].tokens == runs["plain"].tokens
        assert (runs[n].exit_layers == L6).all()
        np.testing.assert_allclose(runs[n].logits, runs["plain"].logits, rtol=0, atol=1e-5)
        np.testing.assert_allclose(runs[n].kv(), runs["plain"].kv(), rtol=0, atol=1e-6)
    assert all(r.check_flops.sum() == 0 for r in runs["off"].results)
    assert all((r.check_flops > 0).all() for r in runs["on"].results)


def test_never_exit_bit_for_bit_on_numpy_backend():
    with on_backend("numpy"):
        ids = PROMPT[:20]
        plain = Run(Engine(RAND, None), ids, 8)
        on = Run(Engine(RAND, make_policy("saturation", RAND.config, threshold=0.999999)), ids, 8)
        assert all((r.check_flops > 0).all() for r in on.results)
        assert on.tokens == plain.tokens
        np.testing.assert_array_equal(on.logits, plain.logits)
        np.testing.assert_array_equal(on.kv(), plain.kv())


# ----------------------------------------------------------------------------- 9. saturation score

def check_saturation_decisions(hidden, exit_layers, tau, m=1):
    cos = cosines64(hidden)                               # cos[k-1] = cos(h_k, h_{k-1})
    for t, e in enumerate(exit_layers):
        e = int(e)
        for k in range(m, min(e, L6 - 1) + 1):
            c = cos[k - 1, t]
            if k == e:
                assert c > tau - 1e-6, (t, k, c)
            else:
                assert c <= tau + 1e-6, (t, k, c, e)


@pytest.mark.parametrize("tau", [0.8, 0.85, 0.9])
def test_saturation_exits_match_independent_cosine(tau):
    e = Engine(RAND, make_policy("saturation", RAND.config, threshold=tau))
    r = e.forward(PROMPT, e.new_cache(), all_logits=True, record_hidden=True)
    assert (r.exit_layers < L6).any() and len(set(r.exit_layers.tolist())) >= 2
    check_saturation_decisions(r.hidden, r.exit_layers, tau)


@HYP
@given(seed=st.integers(0, 10**6), T=st.integers(1, 30), tau=st.sampled_from([0.75, 0.85, 0.9]),
       m=st.integers(1, L6 - 1))
def test_saturation_decisions_random_prompts(seed, T, tau, m):
    ids = [int(x) for x in np.random.default_rng(seed).integers(0, 97, T)]
    e = Engine(RAND, make_policy("saturation", RAND.config, threshold=tau, min_exit_layer=m))
    r = e.forward(ids, e.new_cache(), all_logits=True, record_hidden=True)
    assert (r.exit_layers >= m).all()
    check_saturation_decisions(r.hidden, r.exit_layers, tau, m)
    # a decode step with recorded states (the single-token layer loop)
    cache = e.new_cache(T + 1)
    e.forward(ids, cache)
    d = e.forward([ids[0]], cache, step=1, record_hidden=True)
    check_saturation_decisions(d.hidden, d.exit_layers, tau, m)

"""Tests written to kill mutants that survived ``tests/mutation.py`` (see tests/README.md,
"Mutation testing"). Each asserts a value computed independently of the code under test: by
hand from the GPT-2 formulas (``reference`` functions on explicit weights), from the FLOP
formulas of ``flops.py``'s docstring, or from exact small-number arithmetic."""
from __future__ import annotations

import math

import numpy as np
import pytest

from minadept import backend
from minadept import reference as R
from minadept.engine import Engine
from minadept.exits.adept import AdeptParams, adept_engine, n_pairs
from minadept.exits.policies import Confidence, Constant, ExitState, Fixed, Margin, Policy, Saturation, make_policy

from randmodel import random_model

L = 4
MODEL = random_model(n_layer=L, seed=11)
CFG = MODEL.config
C, V = CFG.n_embd, CFG.vocab_size
IDS = np.random.default_rng(5).integers(0, V, 9)
HEAD = 2 * C * V                                   # LM head, per predicted token
BACKENDS = ["numpy"] + (["fast"] if backend._load_fast() is not None else [])


@pytest.fixture(params=BACKENDS)
def each_backend(request):
    with backend.using(request.param):
        yield request.param


def block_cost(n_keys):
    return 24 * C * C + 4 * n_keys * C


def states_by_hand(ids):
    """h_0..h_L [L+1, T, C] of the plain model, block by block with the reference functions."""
    x = MODEL.params.wte[ids] + MODEL.params.wpe[np.arange(len(ids))]
    hs = [x]
    for blk in MODEL.params.h:
        x = R.block(blk, x, CFG)
        hs.append(x)
    return np.stack(hs)


def logits_of(h):
    return R.layer_norm(h, MODEL.params.ln_f_g, MODEL.params.ln_f_b, CFG.layer_norm_epsilon) @ MODEL.params.wte.T


def random_adept(threshold, seed=0, scale=0.05):
    rng = np.random.default_rng(seed)
    P, r = n_pairs(L), 3
    f = lambda *s: (rng.standard_normal(s) * scale).astype(np.float32)
    return AdeptParams(exit_w=np.eye(C, dtype=np.float32)[None].repeat(L - 1, 0) + f(L - 1, C, C),
                       exit_b=f(L - 1, C), kv_u=f(P, C, r), kv_v=f(P, r, C), kv_c=f(P, C),
                       policy_w=f(L - 1, C + 2), policy_b=f(L - 1), threshold=threshold)


# ----------------------------------------------------------------------------- engine accounting

def test_oracle_exit_predicts_from_h_k_and_counts_skipped_blocks_as_propagation(each_backend):
    """--kv oracle runs the skipped blocks, but an exited token still predicts from ln_f(h_k), and
    the blocks it runs after its exit are propagation, not blocks (mutants: h_exit from the final
    state; oracle block FLOPs booked as blocks)."""
    e = Engine(MODEL, Fixed(2), kv="oracle")
    r = e.forward(IDS, e.new_cache(), all_logits=True)
    hs = states_by_hand(IDS)
    assert (r.exit_layers == 2).all()
    np.testing.assert_allclose(r.logits, logits_of(hs[2]), rtol=1e-4, atol=1e-4)
    keys = np.arange(1, len(IDS) + 1)
    np.testing.assert_array_equal(r.block_flops, 2 * block_cost(keys))
    assert r.propagation_flops == int(((L - 2) * block_cost(keys)).sum())


def test_adept_head_and_check_flops(each_backend):
    """head FLOPs: 2CV at full depth; 2CV + 2C^2 for an exit through the learned exit map; 2CV for
    an exit with the identity exit map; a check costs 10 C + 2 (C + 2) (mutants: map FLOPs at full
    depth / with the identity, the features left out of the check)."""
    params = random_adept(0.5)
    never = adept_engine(MODEL, make_policy("adept", CFG, threshold=1.0, adept=params), params)
    r = never.forward(IDS, never.new_cache(), all_logits=True)
    assert (r.exit_layers == L).all()
    np.testing.assert_array_equal(r.head_flops, np.full(len(IDS), HEAD))
    always = make_policy("adept", CFG, threshold=0.0, adept=params)       # P(Exit) > 0: every token at layer 1
    for exit_map, want in ((True, HEAD + 2 * C * C), (False, HEAD)):
        e = adept_engine(MODEL, always, params, exit_map=exit_map)
        r = e.forward(IDS, e.new_cache(), all_logits=True)
        assert (r.exit_layers == 1).all()
        np.testing.assert_array_equal(r.head_flops, np.full(len(IDS), want))
        # one check at layer 1: the features (about 10 C: normalise, log sd, cosine) and their dot
        # product with the C + 2 weights (2 (C + 2))
        np.testing.assert_array_equal(r.check_flops, np.full(len(IDS), 10 * C + 2 * (C + 2)))


def test_full_depth_adept_prediction_uses_no_exit_map(each_backend):
    """A token that reaches the last layer predicts from ln_f(h_L), on the prefill and on the
    single-token (fused, on the fast backend) decode path (mutant: the map applied at layer L)."""
    params = random_adept(0.5)
    e = adept_engine(MODEL, make_policy("adept", CFG, threshold=1.0, adept=params), params)
    cache = e.new_cache()
    r0 = e.forward(IDS[:-1], cache)
    r1 = e.forward(IDS[-1:], cache, step=1)
    want = logits_of(states_by_hand(IDS)[L])
    np.testing.assert_allclose(r0.logits[-1], want[-2], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(r1.logits[-1], want[-1], rtol=1e-4, atol=1e-4)


def test_no_check_at_the_last_layer(each_backend):
    """min_exit_layer = n_layer leaves nothing to check (checks run below the last layer only): no
    check FLOPs, the LM head counted once, total = full depth, on prefill and single-token decode
    (mutant: the fused step checks at layer L and books the head as reused check logits)."""
    e = Engine(MODEL, make_policy("confidence", CFG, threshold=0.0, min_exit_layer=L))
    cache = e.new_cache()
    for ids, step in ((IDS[:-1], 0), (IDS[-1:], 1)):
        r = e.forward(ids, cache, step=step)
        assert (r.exit_layers == L).all()
        assert r.check_flops.sum() == 0
        assert r.head_flops.sum() == HEAD
        assert r.total_flops == r.full_flops


def test_engine_asks_never_exits_about_the_real_step(each_backend):
    """A schedule that forbids exits for the first steps (schedule(step) >= 1) then allows every
    one: no checks at steps 0..2, every token exits at layer 1 from step 3 on (mutant: never_exits
    asked about step 0)."""
    pol = Saturation(lambda step: 1.0 if step < 3 else -2.0)
    e = Engine(MODEL, pol)
    for step in (0, 2, 3, 7):
        r = e.forward(IDS[:3], e.new_cache(), step=step)
        if step < 3:
            assert (r.exit_layers == L).all() and r.check_flops.sum() == 0
        else:
            assert (r.exit_layers == 1).all() and (r.check_flops == 6 * C).all()


# ----------------------------------------------------------------------------- the policy interface

class Recorder(Policy):
    """Never exits; keeps every ExitState it sees."""
    name = "recorder"

    def __init__(self):
        self.states = []

    def decide(self, state):
        self.states.append(state)
        return np.zeros(len(state.h), bool), None


def test_exit_state_holds_this_blocks_h_q_k_v(each_backend):
    """ExitState after block k: h_k, h_{k-1}, and block k's q, k, v = split of ln_1(h_{k-1}) @
    c_attn_w + c_attn_b (mutant: k and v swapped)."""
    pol = Recorder()
    e = Engine(MODEL, pol)
    e.forward(IDS, e.new_cache(), all_logits=True)
    hs = states_by_hand(IDS)
    assert [s.layer for s in pol.states] == list(range(1, L))
    for s in pol.states:
        blk = MODEL.params.h[s.layer - 1]
        a = R.layer_norm(hs[s.layer - 1], blk.ln_1_g, blk.ln_1_b, CFG.layer_norm_epsilon) @ blk.c_attn_w + blk.c_attn_b
        q, k, v = (R.split_heads(t, CFG.n_head) for t in np.split(a, 3, axis=-1))
        for got, want in ((s.h, hs[s.layer]), (s.h_prev, hs[s.layer - 1]), (s.q, q), (s.k, k), (s.v, v)):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(s.positions, np.arange(len(IDS)))


def test_threshold_is_strict():
    """A token exits when score > tau, strictly: a margin of exactly 0 (two tied top logits) does
    not exit at tau = 0 (mutant: >=)."""
    logits = np.array([[3.0, 3.0, 0.0, -1.0]], np.float32)
    h = np.ones((1, 4), np.float32)
    state = ExitState(layer=1, h=h, h_prev=h, q=None, k=None, v=None, positions=np.array([0]), step=0,
                      predict=lambda hh: logits)
    for name in ("numpy",) + (("fast",) if backend._load_fast() is not None else ()):
        saved = backend._state
        backend.use(name)
        try:
            mask, _ = Margin(Constant(0.0)).decide(state)
            assert not mask[0]
            mask, _ = Margin(Constant(0.0)).decide(ExitState(**{**{f: getattr(state, f) for f in state.__slots__},
                                                                "predict": lambda hh: logits + np.float32([[0, -1e-3, 0, 0]])}))
            assert mask[0]
        finally:
            backend._state = saved


# ----------------------------------------------------------------------------- sampling

def test_temperature_divides_the_logits_once():
    """softmax(z / T): logits [0, ln 4] at T = 2 give probabilities 1/3, 2/3 (mutant: T applied twice)."""
    from minadept.sampling import SamplingSettings, allowed_probs
    p = allowed_probs(np.array([0.0, math.log(4.0)], np.float32), SamplingSettings(temperature=2.0, top_k=None))
    np.testing.assert_allclose(p, [1 / 3, 2 / 3], rtol=1e-6)


def test_top_p_keeps_the_smallest_prefix_reaching_exactly_top_p():
    """Two equal logits have mass 1/2 each: top_p = 0.5 is reached by the first token alone (ties
    in id order), so only it is kept (mutant: searchsorted side=right keeps both)."""
    from minadept.sampling import SamplingSettings, allowed_probs
    p = allowed_probs(np.array([1.0, 1.0], np.float32), SamplingSettings(temperature=1.0, top_k=None, top_p=0.5))
    np.testing.assert_array_equal(p, [1.0, 0.0])


def test_lm_head_check_logits_are_the_prediction(each_backend):
    """confidence at tau = 0: every token exits after its first check at layer 1, whose LM-head
    product (2CV, booked as the check) is the prediction itself: no second head product (mutant:
    the measure does not hand its logits back, so the head runs twice)."""
    e = Engine(MODEL, make_policy("confidence", CFG, threshold=0.0))
    cache = e.new_cache()
    want = logits_of(states_by_hand(IDS)[1])
    r = e.forward(IDS[:-1], cache, all_logits=True)
    assert (r.exit_layers == 1).all()
    np.testing.assert_array_equal(r.check_flops, np.full(len(IDS) - 1, HEAD))
    np.testing.assert_array_equal(r.head_flops, np.zeros(len(IDS) - 1))
    np.testing.assert_allclose(r.logits, want[:-1], rtol=1e-4, atol=1e-4)
    r = e.forward(IDS[-1:], cache, step=1)                       # the single-token (fused) path
    assert r.exit_layers.tolist() == [1] and r.check_flops.tolist() == [HEAD] and r.head_flops.tolist() == [0]
    np.testing.assert_allclose(r.logits[0], want[-1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name,below,above", [("confidence", 0.49, 0.51), ("margin", 0.16, 0.17)])
def test_confidence_and_margin_scores_by_hand(each_backend, name, below, above):
    """Logits [ln 3, ln 2, 0] give probabilities 1/2, 1/3, 1/6: confidence 1/2, margin 1/6
    (mutant: margin measuring the top-1 probability)."""
    logits = np.log(np.array([[3.0, 2.0, 1.0]], np.float32))
    h = np.ones((1, 4), np.float32)
    state = ExitState(layer=1, h=h, h_prev=h, q=None, k=None, v=None, positions=np.array([0]), step=0,
                      predict=lambda hh: logits)
    cls = {"confidence": Confidence, "margin": Margin}[name]
    assert cls(Constant(below)).decide(state)[0].tolist() == [True]
    assert cls(Constant(above)).decide(state)[0].tolist() == [False]


# ----------------------------------------------------------------------------- calibration

def test_ridge_solves_collinear_features():
    """Two identical input columns make the unpenalised normal equations singular; the ridge
    penalty splits the weight evenly: y = 2 a + 1 from X = [a, a] gives W = [1, 1], b = 1
    (mutant: the penalty dropped)."""
    from minadept.exits.calibrate import fit_ridge
    a = np.random.default_rng(0).standard_normal((200, 1))
    W, b = fit_ridge(np.hstack([a, a]), 2 * a + 1, lam=1e-6)
    np.testing.assert_allclose(W, [[1.0], [1.0]], atol=1e-3)
    np.testing.assert_allclose(b, [1.0], atol=1e-3)


def test_equal_rewards_prefer_the_exit():
    """Exit at k is preferred when its reward is at least that of every deeper choice: with no
    quality loss and no cost every reward ties, so every layer prefers the exit (mutant: >)."""
    from minadept.exits.calibrate import preference_labels
    labels = preference_labels(np.zeros((L + 1, 5)), cost_weight=0.0)
    assert labels.shape == (L - 1, 5) and labels.all()


def test_single_class_layers_get_a_constant_policy():
    """A layer whose labels are all Exit gets P(Exit) ~ 1, all Continue P(Exit) ~ 0, whatever
    the state (mutant: the constant's sign flipped)."""
    from minadept.exits.calibrate import fit_policy
    rng = np.random.default_rng(1)
    H = rng.standard_normal((L + 1, 40, C)).astype(np.float32)
    labels = np.zeros((L - 1, 40), bool)
    labels[0] = True                                    # layer 1: always Exit
    labels[2, ::2] = True                               # layer 3: mixed
    pw, pb = fit_policy(H, labels)
    sig = lambda z: 1 / (1 + np.exp(-z))
    assert sig(pb[0]) > 0.99 and not pw[0].any()
    assert sig(pb[1]) < 0.01 and not pw[1].any()        # layer 2: always Continue


def test_threshold_search_falls_back_to_the_most_conservative_tau():
    """No tau meets an impossible target (perplexity may not rise by -100%): the most conservative
    tau of the grid is returned (mutant: the least conservative)."""
    from minadept.exits.calibrate import choose_threshold
    wins = np.random.default_rng(2).integers(0, V, (2, 17))
    tau, table = choose_threshold(MODEL, random_adept(0.5), wins, target=-1.0, taus=(0.9, 0.3, 0.6))
    assert tau == 0.9 and [r["tau"] for r in table["rows"]] == [0.9, 0.3, 0.6]


def test_stored_threshold_zero_loads(tmp_path):
    """tau = 0 is a valid threshold (exit at every check): it round-trips through the file."""
    from minadept.exits.adept import load_adept, save_adept
    save_adept(random_adept(0.0), tmp_path / "adept.safetensors")
    assert load_adept(tmp_path, CFG).threshold == 0.0


# ----------------------------------------------------------------------------- dump

def test_dump_of_a_lazy_engine_holds_the_propagated_kv():
    """Fixed exit at 2 with lazy fill: the dump's K/V at blocks 3..L is ln_1_l(h_2) @ W_kv_l +
    b_kv_l of each token, computed by hand, exactly as with eager fill (mutant: no flush)."""
    from minadept.dump import dump_arrays
    hs = states_by_hand(IDS)
    d = dump_arrays(Engine(MODEL, Fixed(2), fill="lazy"), IDS)
    H, D = CFG.n_head, CFG.head_dim
    for l in range(3, L + 1):
        blk = MODEL.params.h[l - 1]
        kv = R.layer_norm(hs[2], blk.ln_1_g, blk.ln_1_b, CFG.layer_norm_epsilon) @ blk.c_attn_w[:, C:] + blk.c_attn_b[C:]
        want = kv.reshape(len(IDS), 2, H, D).transpose(1, 2, 0, 3)          # [2, H, T, D]
        np.testing.assert_allclose(d["kv"][l - 1], want, rtol=1e-4, atol=1e-5)


def test_dump_of_an_empty_prompt_is_the_endoftext_token(tiny_model, tmp_path):
    """An empty prompt dumps the one token <|endoftext|> (id 50256 in GPT-2's vocabulary)."""
    from minadept.dump import write_dump
    write_dump(Engine(tiny_model), "", str(tmp_path / "d.npz"))
    d = np.load(tmp_path / "d.npz")
    assert d["input_ids"].tolist() == [50256] and d["logits"].shape == (1, tiny_model.config.vocab_size)


# ----------------------------------------------------------------------------- settings

@pytest.mark.parametrize("kv", ["oracle", "propagate-loop"])
def test_adept_with_other_kv_modes_runs_without_the_learned_kv_map(kv):
    """--exit adept with --kv oracle / propagate-loop (and no --kv-map) is valid: the learned K/V
    map is used only with --kv propagate, the exit map still is (mutant: the K/V map passed
    anyway, which the engine refuses)."""
    from minadept.settings import EngineSettings, build_engine
    params = random_adept(0.5)
    e = build_engine(MODEL, EngineSettings(exit="adept", kv=kv), adept=params)
    assert e.kv == kv and e.kv_maps is None and e.exit_mapper is not None
    assert e.settings()["kv_map"] == "identity" and e.settings()["exit_map"] == "learned"
    r = e.forward(IDS, e.new_cache(), all_logits=True)
    assert r.logits.shape == (len(IDS), V)

"""ADEPT's learned policy and mappers: the fits recover known relations from synthetic
data, the policy file round-trips and rejects a mismatched model, calibration is deterministic for
a seed, and with the learned policy disabled the engine equals the plain model bit for bit."""
from __future__ import annotations

import numpy as np
import pytest

from minadept import reference as nn
from minadept.engine import Engine
from minadept.errors import MinadeptError
from minadept.exits.adept import (AdeptParams, load_adept, n_pairs, pair_index, policy_features,
                                  save_adept)
from minadept.exits.calibrate import (calibrate, collect_states, fit_kv_maps, fit_logistic,
                                      fit_ridge, preference_labels)
from minadept.exits.policies import make_policy
from minadept.exits.propagate import StackedKV, propagate_kv_mapped

from randmodel import random_model

L = 4
MODEL = random_model(n_layer=L, n_positions=64, seed=3)
IDS = np.random.default_rng(0).integers(0, MODEL.config.vocab_size, 1500)


@pytest.fixture(scope="module")
def params():
    return calibrate(MODEL, IDS, seed=1, max_tokens=64 * 8, kv_rank=4, min_fit_windows=4)


# ---------------------------------------------------------------------------- the fits

def test_ridge_recovers_a_known_linear_map():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((4000, 12)).astype(np.float32) * 3 + 1
    A = rng.standard_normal((12, 7)).astype(np.float32)
    b = rng.standard_normal(7).astype(np.float32)
    Y = X @ A + b + 0.01 * rng.standard_normal((4000, 7)).astype(np.float32)
    W, c = fit_ridge(X, Y, lam=1e-8)
    assert np.abs(W - A).max() < 2e-3, np.abs(W - A).max()
    assert np.abs(c - b).max() < 5e-3, np.abs(c - b).max()


def test_logistic_recovers_known_weights():
    rng = np.random.default_rng(1)
    X = rng.standard_normal((100000, 3)) * np.array([1.0, 3.0, 0.5]) + np.array([0.0, 2.0, -1.0])
    w_true, b_true = np.array([1.5, -0.4, 2.0]), 0.7
    p = 1 / (1 + np.exp(-(X @ w_true + b_true)))
    t = (rng.random(len(X)) < p).astype(np.float64)
    w, b = fit_logistic(X, t, l2=0.0)
    assert np.abs(w - w_true).max() < 0.1, (w, w_true)       # standard errors here are ~0.03
    assert abs(b - b_true) < 0.1, (b, b_true)


def test_preference_labels_follow_the_reward():
    # one token, L = 3: T_1 = -0.5, T_2 = -0.1, T_3 = 0 (full depth); C_k = k / 3
    T = np.array([[0.0], [-0.5], [-0.1], [0.0]])
    # W = 0: quality only; exit at 1 or 2 is never preferred to full depth (T_3 = 0 is best)
    assert preference_labels(T, 0.0)[:, 0].tolist() == [False, False]
    # W = 0.6: U = -0.7, -0.5, -0.6 -> exit at 2 preferred; exit at 1 not (2 beats it)
    assert preference_labels(T, 0.6)[:, 0].tolist() == [False, True]
    # W = 3: U = -1.5, -2.1, -3 -> exit at 1 preferred, and at 2 (over 3)
    assert preference_labels(T, 3.0)[:, 0].tolist() == [True, True]


def test_kv_maps_fit_better_than_copying_the_exit_state():
    """On the data they were fitted to, least squares cannot lose to the zero correction."""
    wins = np.stack([IDS[i * 64:(i + 1) * 64 + 1] for i in range(6)])
    H = collect_states(Engine(MODEL), wins)
    U, V, c = fit_kv_maps(H, rank=6, lam=1e-6)
    for k in range(1, L):
        n_k = nn.normalize(H[k], 1e-5)
        for l in range(k + 1, L):
            p = pair_index(k, l + 1, L)                 # H[l] is the input of block l+1
            target = nn.normalize(H[l], 1e-5)
            err_map = ((n_k + n_k @ U[p] @ V[p] + c[p] - target) ** 2).mean()
            err_copy = ((n_k - target) ** 2).mean()
            assert err_map < 0.9 * err_copy, (k, l, err_map, err_copy)


def test_pair_index_is_a_bijection():
    # by hand: pairs (k, block) with 1 <= k, k + 2 <= block <= L: (L-1)(L-2)/2 of them
    for n_layer, count in ((2, 0), (3, 1), (4, 3), (12, 55)):
        assert n_pairs(n_layer) == count == sum(1 for k in range(1, n_layer) for b in range(k + 2, n_layer + 1))
    assert pair_index(1, 3, 4) == 0 and pair_index(1, 4, 4) == 1 and pair_index(2, 4, 4) == 2
    for n_layer in (2, 3, 4, 12):
        idx = [pair_index(k, b, n_layer) for k in range(1, n_layer) for b in range(k + 2, n_layer + 1)]
        assert idx == list(range(n_pairs(n_layer)))


def test_kv_map_known_hand_built_mapper():
    """A hand-built map whose output is known without its formula: U = e_0, V = 2 e_1 (so the
    correction adds 2 n[0] to column 1) for pair (1, 3), c = 0.5 everywhere in pair (1, 4); the
    other pairs zero. On h = [3, -1, 1, -3] (mean 0, variance 5) n = h / sqrt(5 + 1e-5)."""
    C, L_ = 4, 4
    P = n_pairs(L_)
    u, v, c = np.zeros((P, C, 1), np.float32), np.zeros((P, 1, C), np.float32), np.zeros((P, C), np.float32)
    u[pair_index(1, 3, L_), 0, 0] = 1.0
    v[pair_index(1, 3, L_), 0, 1] = 2.0
    c[pair_index(1, 4, L_)] = 0.5
    p = AdeptParams(np.zeros((L_ - 1, C, C), np.float32), np.zeros((L_ - 1, C), np.float32), u, v, c,
                    np.zeros((L_ - 1, C + 2), np.float32), np.zeros(L_ - 1, np.float32), 0.5)
    h = np.array([[3.0, -1.0, 1.0, -3.0]], np.float32)
    n = np.array([3.0, -1.0, 1.0, -3.0]) / np.sqrt(5.0 + 1e-5)
    out = p.kv_map(1, h)
    assert out.shape == (3, 1, C)
    np.testing.assert_allclose(out[0, 0], n, rtol=1e-6)                          # block 2: h_1 itself
    np.testing.assert_allclose(out[1, 0], n + np.array([0, 2 * n[0], 0, 0]), rtol=1e-6)   # block 3
    np.testing.assert_allclose(out[2, 0], n + 0.5, rtol=1e-6)                     # block 4
    np.testing.assert_allclose(p.kv_map(2, h)[1, 0], n, rtol=1e-6)                # pair (2, 4) is zero


def test_kv_map_formula_and_identity_at_the_exit_block(params):
    rng = np.random.default_rng(2)
    h = rng.standard_normal((5, MODEL.config.n_embd)).astype(np.float32)
    out = params.kv_map(1, h)                                    # blocks 2..L
    n = nn.normalize(h, 1e-5)
    np.testing.assert_allclose(out[0], n, rtol=0, atol=1e-6)        # block 2 reads h_1 itself
    for i, b in enumerate(range(3, L + 1), start=1):
        p = pair_index(1, b, L)
        np.testing.assert_allclose(out[i], n + n @ params.kv_u[p] @ params.kv_v[p] + params.kv_c[p],
                                   rtol=1e-5, atol=1e-5)


def test_policy_features_shape_and_values():
    rng = np.random.default_rng(3)
    h, hp = rng.standard_normal((2, 4, 16)).astype(np.float32)
    f = policy_features(h, hp)
    assert f.shape == (4, 18) and f.dtype == np.float32
    h64 = h.astype(np.float64)                                     # by hand, float64
    sd = np.sqrt(((h64 - h64.mean(-1, keepdims=True)) ** 2).mean(-1) + 1e-5)
    np.testing.assert_allclose(f[:, :16], (h64 - h64.mean(-1, keepdims=True)) / sd[:, None], atol=1e-5)
    np.testing.assert_allclose(f[:, 16], np.log(sd), atol=1e-5)
    cos = (h * hp).sum(-1) / np.linalg.norm(h, axis=-1) / np.linalg.norm(hp, axis=-1)
    np.testing.assert_allclose(f[:, 17], cos, atol=1e-5)
    # invariants: scaling h by 10 keeps the normalised part and the cosine, adds log 10 to the
    # log-scale; cos(h, h) = 1, cos(h, -2h) = -1; a shift of h by a constant leaves feature 0..15
    g = policy_features(h * 10, hp)
    np.testing.assert_allclose(g[:, :16], f[:, :16], atol=1e-4)
    np.testing.assert_allclose(g[:, 16] - f[:, 16], np.log(10.0), atol=1e-4)
    np.testing.assert_allclose(g[:, 17], f[:, 17], atol=1e-6)
    np.testing.assert_allclose(policy_features(h, h)[:, 17], 1.0, atol=1e-6)
    np.testing.assert_allclose(policy_features(h, -2 * h)[:, 17], -1.0, atol=1e-6)
    np.testing.assert_allclose(policy_features(h + 5, hp)[:, :17], f[:, :17], atol=1e-4)


def test_policy_score_equals_sigmoid_of_the_features(params):
    rng = np.random.default_rng(4)
    h, hp = (rng.standard_normal((2, 6, MODEL.config.n_embd)) * 3).astype(np.float32)
    h64, hp64 = h.astype(np.float64), hp.astype(np.float64)
    mu = h64.mean(-1, keepdims=True)
    sd = np.sqrt(((h64 - mu) ** 2).mean(-1, keepdims=True) + 1e-5)
    cos = (h64 * hp64).sum(-1) / np.linalg.norm(h64, axis=-1) / np.linalg.norm(hp64, axis=-1)
    feats = np.concatenate([(h64 - mu) / sd, np.log(sd), cos[:, None]], axis=-1)   # by hand
    for k in range(1, L):
        z = feats @ params.policy_w[k - 1].astype(np.float64) + params.policy_b[k - 1]
        np.testing.assert_allclose(params.score(k, h, hp), 1 / (1 + np.exp(-z)), rtol=1e-5, atol=1e-6)
        # P(Exit) of two states is ordered as their logits (sigmoid is increasing)
        s = params.score(k, h, hp)
        assert np.array_equal(np.argsort(s, kind="stable"), np.argsort(z, kind="stable")) or \
            np.allclose(np.sort(s), s[np.argsort(z)])


# ---------------------------------------------------------------------------- the file

def test_policy_file_round_trips(params, tmp_path):
    path = tmp_path / "adept.safetensors"
    save_adept(params, path)
    back = load_adept(path, MODEL.config)
    for name in ("exit_w", "exit_b", "kv_u", "kv_v", "kv_c", "policy_w", "policy_b"):
        assert np.array_equal(getattr(back, name), getattr(params, name)), name
    assert back.threshold == params.threshold
    assert back.info == params.info
    # the file itself, read without minadept: the documented names, float32, shapes, metadata
    from safetensors import safe_open
    C, P, r = MODEL.config.n_embd, n_pairs(L), 4
    shapes = {"exit_w": (L - 1, C, C), "exit_b": (L - 1, C), "kv_u": (P, C, r), "kv_v": (P, r, C),
              "kv_c": (P, C), "policy_w": (L - 1, C + 2), "policy_b": (L - 1,)}
    with safe_open(str(path), framework="numpy") as f:
        assert set(f.keys()) == set(shapes)
        for name, shape in shapes.items():
            t = f.get_tensor(name)
            assert t.dtype == np.float32 and t.shape == shape, (name, t.dtype, t.shape)
        assert float(f.metadata()["threshold"]) == params.threshold


def test_policy_file_for_another_model_is_a_clear_error(params, tmp_path):
    path = tmp_path / "adept.safetensors"
    save_adept(params, path)
    other = random_model(n_layer=L, n_embd=48, n_positions=64)
    with pytest.raises(MinadeptError, match=r"tensor 'exit_w' has shape \(3, 32, 32\).*needs \(3, 48, 48\)"):
        load_adept(path, other.config)
    deeper = random_model(n_layer=L + 1, n_positions=64)
    with pytest.raises(MinadeptError, match="n_layer 5"):
        load_adept(path, deeper.config)
    with pytest.raises(MinadeptError, match="no calibrated ADEPT policy"):
        load_adept(tmp_path / "missing.safetensors", MODEL.config)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(MinadeptError, match="cannot read ADEPT policy file"):
        load_adept(tmp_path / "junk.safetensors", MODEL.config)


def _resave(params, path, **changes):
    from dataclasses import replace
    save_adept(replace(params, **changes), path)


@pytest.mark.parametrize("changes, msg", [
    (dict(threshold=float("nan")), "not in \\[0, 1\\]"),
    (dict(threshold=1.5), "not in \\[0, 1\\]"),
    (dict(threshold=-1.0), "not in \\[0, 1\\]"),
    ("nan_policy", "tensor 'policy_w' has NaN or infinite values"),
    ("inf_kv", "tensor 'kv_u' has NaN or infinite values"),
])
def test_policy_file_with_bad_values_is_a_clear_error(params, tmp_path, changes, msg):
    path = tmp_path / "adept.safetensors"
    if changes == "nan_policy":
        w = params.policy_w.copy(); w[0, 0] = np.nan
        changes = dict(policy_w=w)
    elif changes == "inf_kv":
        u = params.kv_u.copy(); u[0, 0, 0] = np.inf
        changes = dict(kv_u=u)
    _resave(params, path, **changes)
    with pytest.raises(MinadeptError, match=msg):
        load_adept(path, MODEL.config)


def test_model_weights_are_not_an_adept_file(tmp_path):
    from safetensors.numpy import save_file
    save_file({"wte.weight": np.zeros((4, 4), np.float32)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(MinadeptError, match="is not an ADEPT policy file"):
        load_adept(tmp_path / "model.safetensors", MODEL.config)


def test_mapper_flops_are_counted(params):
    """Exit map 2 C^2 per prediction from k < L; the K/V maps are folded into the propagation
    weights, so a propagated layer costs 4 C^2 per token with or without them."""
    ids = IDS[:20]
    pol = make_policy("adept", MODEL.config, threshold=0.0, adept=params)    # all exit at layer 1
    plain = Engine(MODEL, pol, exit_mapper=params.exit_map, kv_maps=params)
    counted = Engine(MODEL, pol, exit_mapper=params.exit_map, kv_maps=params,
                     mapper_flops=params.mapper_flops())
    a = plain.forward(ids, plain.new_cache(20), all_logits=True)
    b = counted.forward(ids, counted.new_cache(20), all_logits=True)
    C = MODEL.config.n_embd
    assert (b.head_flops - a.head_flops == 2 * C * C).all()
    assert b.propagation_flops == a.propagation_flops == 20 * (L - 1) * 4 * C * C
    np.testing.assert_array_equal(a.logits, b.logits)


@pytest.mark.parametrize("k", [1, 2, L - 2, L - 1])
def test_folded_kv_maps_equal_map_then_propagate(params, k):
    """StackedKV folds kv_map, ln_1's affine and c_attn's K/V columns into one matrix per exit
    layer: the same K/V as applying them one after the other (float32 rounding apart)."""
    rng = np.random.default_rng(k)
    h = (rng.standard_normal((6, MODEL.config.n_embd)) * 3).astype(np.float32)
    ref = propagate_kv_mapped(MODEL, params.kv_map(k, h), k)                    # [M, 2, H, N, D]
    got = StackedKV(MODEL, params).propagate(h, k)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
    one = StackedKV(MODEL, params).propagate_block(h, np.full(6, k), L)         # the last block alone
    np.testing.assert_allclose(one, ref[-1:], rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------- calibration

def test_calibration_is_deterministic_for_a_seed(params):
    again = calibrate(MODEL, IDS, seed=1, max_tokens=64 * 8, kv_rank=4, min_fit_windows=4)
    other = calibrate(MODEL, IDS, seed=2, max_tokens=64 * 8, kv_rank=4, min_fit_windows=4)
    for name in ("exit_w", "exit_b", "kv_u", "kv_v", "kv_c", "policy_w", "policy_b"):
        assert np.array_equal(getattr(again, name), getattr(params, name)), name
    assert again.threshold == params.threshold and again.info == params.info
    assert not np.array_equal(other.exit_w, params.exit_w)


def test_calibration_statistics_are_sane(params):
    info = params.info
    assert info["calibration_tokens"] == 6 * 64 and info["heldout_tokens"] == 2 * 64
    assert len(info["exit_map_r2"]) == L - 1 and all(r <= 1 for r in info["exit_map_r2"])
    assert all(kl >= 0 for kl in info["mean_kl_by_layer"])
    rows = info["threshold_search"]["rows"]
    assert params.threshold in [r["tau"] for r in rows] and info["threshold"] == params.threshold
    ok = [r for r in rows if r["ppl_increase"] <= 0.05]
    assert info["target_met"] == bool(ok)
    if ok:                                       # the cheapest setting within the target
        assert params.threshold == min(ok, key=lambda r: r["compute_fraction"])["tau"]
    else:
        assert params.threshold == max(r["tau"] for r in rows)


@pytest.mark.parametrize("kw, msg", [
    (dict(max_tokens=64 * 19), "--max-tokens must be at least 1280 \\(20 windows of 64 tokens: 16 to fit, 4 held out\\)"),
    (dict(cost_weight=-1.0), "--cost-weight"),
    (dict(cost_weight=float("nan")), "--cost-weight"),
    (dict(target_ppl_increase=0.0), "--target-ppl-increase"),
    (dict(kv_rank=0), "--kv-rank"),
])
def test_calibration_rejects_bad_settings(kw, msg):
    with pytest.raises(MinadeptError, match=msg):
        calibrate(MODEL, IDS, **kw)


def test_calibration_rejects_too_little_text():
    with pytest.raises(MinadeptError, match="calibration text is too short: 1200 tokens make 18 windows of 64"):
        calibrate(MODEL, IDS[:1200], max_tokens=64 * 20)


# ---------------------------------------------------------------------------- the engine

def _run(engine, ids):
    cache = engine.new_cache(len(ids) + 4)
    r = engine.forward(ids[:-4], cache, all_logits=True)
    steps = [engine.forward([t], cache, step=i + 1) for i, t in enumerate(ids[-4:])]
    return r, steps, cache


def test_disabled_policy_and_identity_mappers_leave_the_engine_unchanged(params):
    ids = IDS[:40]
    r0, s0, c0 = _run(Engine(MODEL), ids)
    never = make_policy("adept", MODEL.config, threshold=1.0, adept=params)
    for mappers in ({}, dict(exit_mapper=params.exit_map, kv_maps=params)):
        r, s, c = _run(Engine(MODEL, never, **mappers), ids)
        assert (r.exit_layers == L).all()
        assert np.array_equal(r.logits, r0.logits)
        assert all(np.array_equal(a.logits, b.logits) for a, b in zip(s, s0))
        assert np.array_equal(c.kv, c0.kv)


def test_learned_policy_exits_and_uses_the_mappers(params):
    ids = IDS[:40]
    eager = make_policy("adept", MODEL.config, threshold=0.0, adept=params)   # exits at layer 1
    r_id = Engine(MODEL, eager).forward(ids, Engine(MODEL).new_cache(40), all_logits=True)
    cache = Engine(MODEL).new_cache(40)
    eng = Engine(MODEL, eager, exit_mapper=params.exit_map, kv_maps=params)
    r = eng.forward(ids, cache, all_logits=True)
    assert (r.exit_layers == 1).all()
    h1 = collect_states(Engine(MODEL), ids[None, :])[1]                      # h_1 of every token
    p, eps = MODEL.params, MODEL.config.layer_norm_epsilon
    m = h1.astype(np.float64) @ params.exit_w[0].astype(np.float64) + params.exit_b[0]   # by hand
    mu = m.mean(-1, keepdims=True)
    ln = (m - mu) / np.sqrt(((m - mu) ** 2).mean(-1, keepdims=True) + eps) * p.ln_f_g + p.ln_f_b
    want = ln @ p.wte.T.astype(np.float64)
    np.testing.assert_allclose(r.logits[:len(want)], want, rtol=1e-4, atol=1e-4)   # collect_states drops the last id
    assert not np.allclose(r.logits, r_id.logits)                          # the mapper changed them


def test_adept_without_calibration_is_an_error():
    with pytest.raises(MinadeptError, match="needs a calibrated adept.safetensors"):
        make_policy("adept", MODEL.config)


def test_default_threshold_comes_from_the_file(params):
    """Without --threshold the policy decides P(Exit) > the calibrated tau (checked on its
    decisions, not its attribute); a given threshold replaces it."""
    from dataclasses import replace
    from minadept.exits.policies import ExitState
    rng = np.random.default_rng(11)
    h, hp = (rng.standard_normal((2, 300, MODEL.config.n_embd)) * 4).astype(np.float32)
    p = params.score(1, h, hp)
    for tau in (0.2, float(np.median(p))):
        prm = replace(params, threshold=tau)
        state = ExitState(layer=1, h=h, h_prev=hp, q=None, k=None, v=None, positions=np.arange(300),
                          step=0, predict=None)
        mask, _ = make_policy("adept", MODEL.config, adept=prm).decide(state)
        clear = np.abs(p - tau) > 1e-9
        assert np.array_equal(mask[clear], (p > tau)[clear]), tau
        other, _ = make_policy("adept", MODEL.config, adept=prm, threshold=0.999).decide(state)
        assert np.array_equal(other, p > 0.999)


@pytest.mark.parametrize("tau", [0.0, 0.3, 0.5, 0.9, 0.99, 1.0])
def test_logit_decision_equals_probability_threshold(params, tau):
    """Adept.decide compares the logit with log(tau / (1 - tau)): the same decisions as
    P(Exit) > tau (the documented rule), at every layer."""
    from minadept.exits.policies import ExitState
    rng = np.random.default_rng(7)
    pol = make_policy("adept", MODEL.config, threshold=tau, adept=params)
    seen = set()
    for k in range(1, L):
        h, hp = (rng.standard_normal((2, 200, MODEL.config.n_embd)) * rng.uniform(0.5, 20)).astype(np.float32)
        state = ExitState(layer=k, h=h, h_prev=hp, q=None, k=None, v=None, positions=np.arange(200),
                          step=0, predict=None)
        mask, _ = pol.decide(state)
        p = params.score(k, h, hp)
        clear = np.abs(p - tau) > 1e-9
        assert np.array_equal(mask[clear], (p > tau)[clear])
        seen.update(mask.tolist())
    if 0.0 < tau < 1.0:
        assert seen == {True, False}           # the test exercises both outcomes


def test_dump_policy_records_the_mappers(params):
    """A reference dump says which mappers made it (learned and identity dumps differ)."""
    import json
    from minadept.dump import dump_arrays
    from minadept.exits.adept import adept_engine
    pol = make_policy("adept", MODEL.config, threshold=0.5, adept=params)
    a = json.loads(str(dump_arrays(adept_engine(MODEL, pol, params), IDS[:10])["policy"]))
    b = json.loads(str(dump_arrays(adept_engine(MODEL, pol, params, kv_map=False), IDS[:10])["policy"]))
    assert (a["exit_map"], a["kv_map"]) == ("learned", "learned")
    assert (b["exit_map"], b["kv_map"]) == ("learned", "identity")
    # and the arrays say it too: identity-mapped K/V of exited tokens are propagate_kv of h_k,
    # learned ones are not
    from minadept.exits.propagate import propagate_kv
    da = dump_arrays(adept_engine(MODEL, pol, params), IDS[:10])
    db = dump_arrays(adept_engine(MODEL, pol, params, kv_map=False), IDS[:10])
    np.testing.assert_array_equal(da["exit_layers"], db["exit_layers"])
    ts = [t for t in range(10) if db["exit_layers"][t] < L - 1]
    assert ts, db["exit_layers"]
    for t in ts:
        k = int(db["exit_layers"][t])
        want = propagate_kv(MODEL, db["hidden_states"][k, t][None], k)[:, :, :, 0]
        np.testing.assert_allclose(db["kv"][k:, :, :, t], want, rtol=1e-5, atol=1e-5)
        assert np.abs(da["kv"][k + 1:, :, :, t] - want[1:]).max() > 1e-3

"""``minadept calibrate``: fit ADEPT's mappers and exit policy on text, pick the default threshold.

All fitting is NumPy and deterministic for a seed (no torch):

1. ``collect_states``: run the full model over calibration windows, keep h_0..h_L per token.
2. ``fit_ridge``: exit mappers h_k -> h_L (linear with bias, ridge least squares), k = 1..L-1.
3. ``fit_kv_maps``: low-rank maps from normalize(h_k) to normalize(h_l), the input of each
   skipped block (reduced-rank ridge regression: ridge, then the top-r principal directions of
   the fitted values).
4. ``exit_quality``: T_k = -KL(p_L || p_k) per token, p_k the mapped exit prediction (nats).
5. ``preference_labels``: Exit preferred at k when T_k - W C_k >= T_j - W C_j for every deeper j
   (C_k = k / L, the fraction of blocks run; W = beta / lambda, ``--cost-weight``).
6. ``fit_logistic``: Bradley-Terry / logistic regression of the preference on the policy features,
   one model per exit layer (Newton's method with an L2 penalty).
7. ``choose_threshold``: on held-out windows, the cheapest tau whose perplexity is within
   ``target_ppl_increase`` of full depth, measured with the real engine (exits, mappers and K/V
   propagation included).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .. import model as M
from ..errors import MinadeptError
from ..reference import normalize
from .adept import AdeptParams, n_pairs, pair_index, policy_features

#: fewest windows (of min(n_positions, 256) tokens) a calibration fits on, after the hold-out
MIN_FIT_WINDOWS = 16
HELDOUT = 0.2
TAU_GRID = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.96, 0.97, 0.98, 0.99)


def calibration_windows(ids: np.ndarray, n_ctx: int, n_windows: int, seed: int) -> np.ndarray:
    """``n_windows`` windows of n_ctx + 1 tokens at distinct random offsets -> [n_windows, n_ctx+1].
    Raises MinadeptError if the text is too short for one window."""
    n_slots = (len(ids) - 1) // n_ctx
    if n_slots < 1:
        raise MinadeptError(f"calibration text has {len(ids)} tokens; need at least {n_ctx + 1}")
    rng = np.random.default_rng(seed)
    slots = np.sort(rng.choice(n_slots, size=min(n_windows, n_slots), replace=False))
    return np.stack([ids[s * n_ctx: s * n_ctx + n_ctx + 1] for s in slots])


def collect_states(engine, windows: np.ndarray, progress=None) -> np.ndarray:
    """Full-depth hidden states of every window's first n_ctx tokens: [L+1, W*n_ctx, C] float32."""
    cfg = engine.config
    n = windows.shape[1] - 1
    H = np.empty((cfg.n_layer + 1, len(windows) * n, cfg.n_embd), np.float32)
    for i, w in enumerate(windows):
        r = engine.forward(w[:-1], engine.new_cache(n), record_hidden=True)
        H[:, i * n:(i + 1) * n] = r.hidden
        if progress is not None:
            progress.update(n)
    return H


def fit_ridge(X: np.ndarray, Y: np.ndarray, lam: float = 1e-4):
    """Ridge least squares with bias: argmin ||X W + b - Y||^2 / N + lam ||W||^2.
    X [N, Cin], Y [N, Cout] -> (W [Cin, Cout], b [Cout]) float32 (normal equations in float64)."""
    X64, Y64 = X.astype(np.float64), Y.astype(np.float64)
    mx, my = X64.mean(0), Y64.mean(0)
    Xc = X64 - mx
    A = Xc.T @ Xc / len(X)
    A[np.diag_indices_from(A)] += lam
    W = np.linalg.solve(A, Xc.T @ (Y64 - my) / len(X))
    return W.astype(np.float32), (my - mx @ W).astype(np.float32)


def fit_kv_maps(H: np.ndarray, rank: int, lam: float = 1e-4):
    """Reduced-rank ridge maps for every (exit layer k, block l+1) with k < l <= L-1
    (``adept.pair_index`` order): normalize(h_l) - normalize(h_k) ~ (n_k @ U) @ V + c. Ridge first (one factorisation per exit
    layer, shared by its targets), then V = the top-r principal directions of the fitted values
    (eigenvectors of W^T Cov(n_k) W), U = W V^T. Returns U [P, C, r], V [P, r, C], c [P, C]."""
    L, C = H.shape[0] - 1, H.shape[2]
    P = n_pairs(L)
    U = np.zeros((P, C, rank), np.float32)
    V = np.zeros((P, rank, C), np.float32)
    c = np.zeros((P, C), np.float32)
    Nrm = [None] + [normalize(H[l], 1e-5).astype(np.float64) for l in range(1, L)]
    for k in range(1, L - 1):
        X = Nrm[k]
        mx = X.mean(0)
        Xc = X - mx
        cov = Xc.T @ Xc / len(X)                                          # [C, C]
        A = cov + lam * np.eye(C)
        targets = list(range(k + 1, L))
        Y = np.concatenate([Nrm[l] - X for l in targets], axis=1)         # [N, C * targets]
        my = Y.mean(0)
        W_all = np.linalg.solve(A, Xc.T @ (Y - my) / len(X))              # [C, C * targets]
        for i, l in enumerate(targets):
            p = pair_index(k, l + 1, L)                                   # H[l] enters block l+1
            W = W_all[:, i * C:(i + 1) * C]
            _, vecs = np.linalg.eigh(W.T @ cov @ W)                       # ascending eigenvalues
            Vr = vecs[:, ::-1][:, :rank].T                                # [r, C]
            U[p], V[p] = W @ Vr.T, Vr
            c[p] = my[i * C:(i + 1) * C] - mx @ (W @ Vr.T @ Vr)
    return U, V, c


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def exit_quality(model, H: np.ndarray, exit_w, exit_b, chunk: int = 4096, progress=None) -> np.ndarray:
    """T [L+1, N]: T_k = -KL(p_L || p_k) in nats (p_k = softmax of the mapped exit prediction at
    layer k); T_L = 0; row 0 unused."""
    cfg, L = model.config, model.config.n_layer
    N = H.shape[1]
    T = np.zeros((L + 1, N))
    head = lambda h: _log_softmax(M.lm_head(model, M.final_norm(model.params, h, cfg)))
    for a in range(0, N, chunk):
        b = min(N, a + chunk)
        lf = head(H[L, a:b])
        pf = np.exp(lf)
        for k in range(1, L):
            lk = head(H[k, a:b] @ exit_w[k - 1] + exit_b[k - 1])
            T[k, a:b] = -(pf * (lf - lk)).sum(-1)
        if progress is not None:
            progress.update(b - a)
    return T


def preference_labels(T: np.ndarray, cost_weight: float) -> np.ndarray:
    """[L-1, N] bool: Exit at k (1..L-1) is preferred to every deeper choice under the reward
    T_k - W k / L (the paper's lambda T - beta C with W = beta / lambda)."""
    L = T.shape[0] - 1
    U = T[1:] - cost_weight * np.arange(1, L + 1)[:, None] / L                  # [L, N], k = 1..L
    best_deeper = np.maximum.accumulate(U[::-1], axis=0)[::-1]                   # max over j >= k
    return U[:-1] >= best_deeper[1:]


def fit_logistic(X: np.ndarray, t: np.ndarray, l2: float = 1e-3, iters: int = 25):
    """Logistic regression P(t=1) = sigmoid(X w + b) by Newton's method on standardised
    features with an L2 penalty. X [N, F], t [N] in [0, 1] -> (w [F], b) in the original units."""
    mu, sd = X.mean(0), X.std(0) + 1e-6
    Z = np.concatenate([(X - mu) / sd, np.ones((len(X), 1))], axis=1).astype(np.float64)
    w = np.zeros(Z.shape[1])
    reg = np.full(Z.shape[1], l2)
    reg[-1] = 0.0
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-(Z @ w)))
        g = Z.T @ (p - t) / len(Z) + reg * w
        Hs = (Z * (p * (1 - p))[:, None]).T @ Z / len(Z) + np.diag(reg + 1e-9)
        step = np.linalg.solve(Hs, g)
        w -= step
        if np.abs(step).max() < 1e-7:
            break
    wf = w[:-1] / sd
    return wf.astype(np.float32), float(w[-1] - mu @ wf)


def choose_threshold(model, params: AdeptParams, windows: np.ndarray, target: float,
                     taus=TAU_GRID, progress=None):
    """The cheapest tau in ``taus`` whose held-out perplexity is within (1 + target) of full
    depth (engine with exits, learned mappers, eager K/V propagation). Returns (tau, rows) with
    one row per tau: tau, ppl, ppl_increase, compute_fraction, mean_exit_layer. If no tau meets
    the target the most conservative one (max of ``taus``) is returned."""
    from ..engine import Engine
    from ..evaluate import evaluate_windows
    from ..settings import EngineSettings, build_engine
    full = evaluate_windows(Engine(model), windows)["ppl"]
    rows = []
    for tau in taus:
        r = evaluate_windows(build_engine(model, EngineSettings(exit="adept", threshold=tau), adept=params), windows)
        rows.append({"tau": tau, "ppl": r["ppl"], "ppl_increase": r["ppl"] / full - 1,
                     "compute_fraction": r["compute_fraction"], "mean_exit_layer": r["mean_exit_layer"]})
        if progress is not None:
            progress.update(1)
    ok = [r for r in rows if r["ppl_increase"] <= target]
    best = min(ok, key=lambda r: r["compute_fraction"]) if ok else max(rows, key=lambda r: r["tau"])
    return best["tau"], {"full_ppl": full, "rows": rows}


def check_settings(cfg, *, cost_weight: float, max_tokens: int, target_ppl_increase: float,
                   kv_rank: int, min_fit_windows: int = MIN_FIT_WINDOWS, heldout: float = HELDOUT) -> tuple[int, int]:
    """Validate calibration settings for a model with ``cfg`` before any work; returns
    (window length n_ctx, number of windows). Raises MinadeptError naming the bad setting."""
    if not cost_weight >= 0 or math.isinf(cost_weight):
        raise MinadeptError(f"--cost-weight must be a finite number >= 0, got {cost_weight}")
    if not 0 < target_ppl_increase < 10:
        raise MinadeptError(f"--target-ppl-increase must be in (0, 10), got {target_ppl_increase}")
    if cfg.n_layer < 2:
        raise MinadeptError("calibration needs a model with at least 2 layers")
    if not 1 <= kv_rank <= cfg.n_embd:
        raise MinadeptError(f"--kv-rank must be in [1, {cfg.n_embd}] (n_embd), got {kv_rank}")
    n_ctx = min(cfg.n_positions, 256)
    n_windows = max_tokens // n_ctx
    need = min_windows(min_fit_windows, heldout)
    if n_windows < need:
        raise MinadeptError(f"--max-tokens must be at least {need * n_ctx} ({need} windows of {n_ctx} tokens: "
                            f"{min_fit_windows} to fit, {need - min_fit_windows} held out), got {max_tokens}")
    return n_ctx, n_windows


def min_windows(min_fit_windows: int = MIN_FIT_WINDOWS, heldout: float = HELDOUT) -> int:
    """Fewest calibration windows that leave ``min_fit_windows`` to fit after the hold-out."""
    n = min_fit_windows + 1
    while n - _n_held(n, heldout) < min_fit_windows:
        n += 1
    return n


def _n_held(n_windows: int, heldout: float) -> int:
    return max(1, int(round(heldout * n_windows)))


def check_text_length(cfg, n_tokens: int, min_fit_windows: int = MIN_FIT_WINDOWS, heldout: float = HELDOUT) -> None:
    """Refuse, before any work, calibration text too short for ``min_fit_windows`` windows to fit
    after the hold-out (fewer gives a policy that only looks calibrated: fitted on 4 windows of
    the embedded model's training text it misses its target and adds 46-49% to the perplexity
    of valid.txt). Raises MinadeptError."""
    n_ctx = min(cfg.n_positions, 256)
    need = min_windows(min_fit_windows, heldout)
    have = (n_tokens - 1) // n_ctx
    if have < need:
        raise MinadeptError(f"calibration text is too short: {n_tokens} tokens make {have} windows of {n_ctx}, "
                            f"and calibration needs at least {need} ({need * n_ctx + 1} tokens: {min_fit_windows} "
                            f"to fit, {need - min_fit_windows} held out); give a longer text")


def fit_exit_maps(H: np.ndarray, ridge: float):
    """Ridge exit maps h_k -> h_L for k = 1..L-1 from states H [L+1, N, C]: (exit_w [L-1, C, C],
    exit_b [L-1, C], R^2 of each fit)."""
    L, C = H.shape[0] - 1, H.shape[2]
    exit_w = np.zeros((L - 1, C, C), np.float32)
    exit_b = np.zeros((L - 1, C), np.float32)
    r2 = []
    for k in range(1, L):
        exit_w[k - 1], exit_b[k - 1] = fit_ridge(H[k], H[L], ridge)
        resid = H[k] @ exit_w[k - 1] + exit_b[k - 1] - H[L]
        r2.append(1 - float((resid ** 2).sum() / ((H[L] - H[L].mean(0)) ** 2).sum()))
    return exit_w, exit_b, r2


def fit_policy(H: np.ndarray, labels: np.ndarray):
    """The per-layer logistic exit policy from states H [L+1, N, C] and preference labels
    [L-1, N]: (policy_w [L-1, C+2], policy_b [L-1]). A layer whose labels are all one class gets a
    constant policy."""
    L, C = H.shape[0] - 1, H.shape[2]
    pw = np.zeros((L - 1, C + 2), np.float32)
    pb = np.zeros(L - 1, np.float32)
    for k in range(1, L):
        t = labels[k - 1].astype(np.float64)
        if t.min() == t.max():
            pb[k - 1] = 20.0 if t[0] else -20.0
        else:
            pw[k - 1], pb[k - 1] = fit_logistic(policy_features(H[k], H[k - 1]), t)
    return pw, pb


def calibrate(model, ids: np.ndarray, *, cost_weight: float = 1.0, seed: int = 0,
              max_tokens: int = 98304, target_ppl_increase: float = 0.05, heldout: float = HELDOUT,
              ridge: float = 1e-4, kv_rank: int = 24, progress_factory=None,
              min_fit_windows: int = MIN_FIT_WINDOWS) -> AdeptParams:
    """Fit mappers and policy on the token stream ``ids`` [N] and choose the default threshold.

    ``max_tokens``: calibration tokens (windows of n_positions, at most 256); ``heldout``: the
    fraction of windows kept for choosing tau; ``min_fit_windows``: the fewest windows left to fit
    on (``MIN_FIT_WINDOWS``; tests of the fits on tiny models pass fewer). Raises MinadeptError for bad settings or too little
    text. ``progress_factory(total, desc)`` returns an object with ``update(n)`` and ``close()``.
    """
    from ..engine import Engine
    n_ctx, n_windows = check_settings(model.config, cost_weight=cost_weight, max_tokens=max_tokens,
                                      target_ppl_increase=target_ppl_increase, kv_rank=kv_rank,
                                      min_fit_windows=min_fit_windows, heldout=heldout)
    check_text_length(model.config, len(ids), min_fit_windows, heldout)
    cfg = model.config
    wins = calibration_windows(ids, n_ctx, n_windows, seed)
    n_held = _n_held(len(wins), heldout)
    fit_w, held_w = wins[:-n_held], wins[-n_held:]
    bar = progress_factory or (lambda total, desc: _NoBar())

    p = bar(fit_w.shape[0] * n_ctx, "full-depth states")
    H = collect_states(Engine(model), fit_w, p)
    p.close()
    L = cfg.n_layer
    exit_w, exit_b, r2 = fit_exit_maps(H, ridge)
    kv_u, kv_v, kv_c = fit_kv_maps(H, kv_rank, ridge)
    p = bar(H.shape[1], "exit quality (KL)")
    T = exit_quality(model, H, exit_w, exit_b, progress=p)
    p.close()
    labels = preference_labels(T, cost_weight)
    pw, pb = fit_policy(H, labels)
    info = {"cost_weight": cost_weight, "seed": seed, "calibration_tokens": int(H.shape[1]),
            "heldout_tokens": int(held_w.shape[0] * n_ctx), "ridge": ridge, "kv_rank": kv_rank,
            "target_ppl_increase": target_ppl_increase,
            "exit_map_r2": r2, "mean_kl_by_layer": [float(-T[k].mean()) for k in range(1, L)],
            "exit_preferred_rate": [float(labels[k].mean()) for k in range(L - 1)]}
    params = AdeptParams(exit_w, exit_b, kv_u, kv_v, kv_c, pw, pb, threshold=1.0, info=info)
    p = bar(len(TAU_GRID), "threshold (held-out ppl)")
    tau, table = choose_threshold(model, params, held_w, target_ppl_increase, progress=p)
    p.close()
    info.update(threshold=float(tau), threshold_search=table,
                target_met=any(r["ppl_increase"] <= target_ppl_increase for r in table["rows"]))
    return AdeptParams(exit_w, exit_b, kv_u, kv_v, kv_c, pw, pb, threshold=float(tau), info=info)


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass

"""Prove that two builds of minadept (OLD and NEW environments) behave the same and run as fast.

OLD is the commit a refactor starts from, NEW the refactored tree, each in its own environment.

    # 1. behaviour: record in each environment, then compare
    /tmp/oldenv/bin/python bench/compare_versions.py record /tmp/old.npz
    .venv/bin/python       bench/compare_versions.py record /tmp/new.npz
    python bench/compare_versions.py compare /tmp/old.npz /tmp/new.npz     # exit 0 = same
    # 2. speed: alternating rounds, one timing subprocess per environment per round
    python bench/compare_versions.py speed --old-python /tmp/oldenv/bin/python \\
        --new-python .venv/bin/python --rounds 5

``record`` runs 4 English prompts x every exit policy x KV modes x backends (numpy, and fast when
the extension is built) on the embedded model with BLAS/OpenMP pinned to 1 thread, and stores:
a greedy generation of 24 tokens (tokens, last-position logits per step, exit layers, every FLOP
field of every ForwardResult), a prefill with all_logits=True, and ``dump.dump_arrays``. Every
case part runs in try/except: an error is stored as data (it shows up as a difference, never as a
crash). Only API present in the pre-refactor build (commit 4f4850a) is used.

``compare`` rule. NumPy backend: every stored array bitwise identical (dtype, shape, bytes).
Fast backend: logits (and dump hidden states / K/V) within 1e-4, identical tokens, exit layers
and FLOP accounting, except after a first difference that a measured near-tie explains: a
differing greedy token whose top-2 logit gap at that step is < 1e-4, or a differing exit layer
whose exit-score margin |score - threshold| (adept: its logit minus the logit of tau) is < 1e-4
in either recording (margins are diagnostics captured by wrapping the policy, not compared).
Exit status 0 when everything holds, 1 otherwise.

``speed`` prints the best (and the median over rounds) of prefill tokens/s (128-token prompt) and greedy decode
tokens/s (64 new tokens) at full depth and with the adept policy (fast backend, 1 thread), and the
new/old ratios against the target >= 0.95.

The script itself imports only numpy at module level, so it runs under either environment.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
import zipfile

import numpy as np

PROMPTS = [
    "Once upon a time, there was",
    "The little dog ran to the park and saw a big red ball.",
    "Tom and his sister Mia went to the beach with their mom. They wanted to build a big sandcastle "
    "near the water, but the waves kept coming.",
    "One day, a kind old man lived in a small house near the forest. Every morning he fed the birds "
    "and talked to the trees. The children in the village liked to visit him because he told them "
    "funny stories about a brave little fox who was afraid of the dark.",
]
N_NEW = 24
TOL = 1e-4          # fast backend: logits; also the near-tie threshold
FLOP_FIELDS = ("block_flops", "check_flops", "head_flops", "propagation_flops", "full_flops")
SEP = "|"

# (label, make_policy kwargs). Thresholds chosen so that each really exits on the embedded model
# (measured: confidence 0.7/0.9, margin 0.5/0.8, saturation 0.95/0.99 all exit some tokens;
# adept's calibrated tau 0.96 and 0.8; decay over the 24 generated tokens).
POLICIES = [
    ("none", dict(name="none")),
    ("fixed2", dict(name="fixed", exit_layer=2)),
    ("confidence0.9", dict(name="confidence", threshold=0.9)),
    ("confidence0.7", dict(name="confidence", threshold=0.7)),
    ("margin0.8", dict(name="margin", threshold=0.8)),
    ("margin0.5", dict(name="margin", threshold=0.5)),
    ("saturation0.99", dict(name="saturation", threshold=0.99)),
    ("saturation0.95", dict(name="saturation", threshold=0.95)),
    ("adept-default", dict(name="adept")),
    ("adept0.8", dict(name="adept", threshold=0.8)),
    ("adept-decay", dict(name="adept", schedule="decay", horizon=N_NEW)),
]
# (label, Engine kwargs, learned K/V map for adept). The learned K/V map exists only with
# kv=propagate; adept under propagate-loop / oracle runs with the identity K/V map (as the CLI).
KV_MODES = [
    ("prop-eager", dict(kv="propagate", fill="eager"), True),
    ("prop-lazy", dict(kv="propagate", fill="lazy"), True),
    ("prop-loop", dict(kv="propagate-loop", fill="eager"), False),
    ("oracle", dict(kv="oracle", fill="eager"), False),
]
ADEPT_EXTRA_KV = [
    ("prop-eager-kvid", dict(kv="propagate", fill="eager"), False),
    ("prop-lazy-kvid", dict(kv="propagate", fill="lazy"), False),
]


def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


# ================================================================================ record

class NpzWriter:
    """Streams arrays into an .npz (zip of .npy), so a large record never sits in memory."""

    def __init__(self, path):
        self.zf = zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True)
        self.n = 0

    def put(self, key, value):
        arr = np.asanyarray(value)
        with self.zf.open(key + ".npy", "w", force_zip64=True) as f:
            np.lib.format.write_array(f, arr, allow_pickle=False)
        self.n += 1

    def close(self):
        self.zf.close()


class MarginProbe:
    """Diagnostic only: wraps the policy's scoring (instance attributes, removed afterwards) to
    record min |score - threshold| over the exit checks of each forward call. Best effort: if the
    internals it wraps are absent, margins are NaN and nothing else changes."""

    def __init__(self, policy):
        self.policy, self.cur, self.undo = policy, math.inf, []
        self.step = 0
        try:
            orig_decide = policy.decide

            def decide(state, _o=orig_decide):
                self.step = state.step
                return _o(state)
            self._set(policy, "decide", decide)
            if getattr(policy, "name", "") == "adept":
                params = policy.params
                orig_logit = params.logit

                def logit(k, h, h_prev, _o=orig_logit):
                    z = _o(k, h, h_prev)
                    tau = policy.schedule(self.step)
                    if 0.0 < tau < 1.0:
                        self._see(np.asarray(z, np.float64) - math.log(tau / (1.0 - tau)))
                    return z
                self._set(params, "logit", logit)
            elif hasattr(policy, "score") and hasattr(policy, "schedule"):
                orig_score = policy.score

                def score(state, _o=orig_score):
                    s, lg = _o(state)
                    self._see(np.asarray(s, np.float64) - policy.schedule(state.step))
                    return s, lg
                self._set(policy, "score", score)
        except Exception:
            self.restore()

    def _set(self, obj, name, fn):
        had = name in getattr(obj, "__dict__", {})
        old = obj.__dict__.get(name) if had else None
        object.__setattr__(obj, name, fn)          # also on frozen dataclasses (AdeptParams)
        self.undo.append((obj, name, had, old))

    def _see(self, d):
        if d.size:
            self.cur = min(self.cur, float(np.min(np.abs(d))))

    def take(self) -> float:
        v, self.cur = self.cur, math.inf
        return v if v != math.inf else float("nan")

    def restore(self):
        for obj, name, had, old in reversed(self.undo):
            try:
                if had:
                    object.__setattr__(obj, name, old)
                else:
                    object.__delattr__(obj, name)
            except AttributeError:
                pass
        self.undo = []


def _flops(results, w, prefix):
    for f in FLOP_FIELDS + ("total_flops",):
        try:
            vals = [np.asarray(getattr(r, f), dtype=np.int64).ravel() for r in results]
            w.put(f"{prefix}.{f}", np.concatenate(vals))
        except Exception as e:
            w.put(f"{prefix}.{f}.error", np.array(_err(e)))


def _record_case(m, engine_factory, ids, w, case):
    import minadept.dump
    from minadept.generate import generate
    from minadept.sampling import SamplingSettings
    # -- greedy generation
    try:
        eng = engine_factory()
        probe = MarginProbe(eng.policy)
        try:
            steps, margins = [], []
            for s in generate(eng, ids, max_new_tokens=N_NEW, sampling=SamplingSettings(temperature=0),
                              rng=np.random.default_rng(0)):
                steps.append(s)
                margins.append(probe.take())
        finally:
            probe.restore()
        res = [s.result for s in steps]
        p = f"{case}{SEP}gen"
        w.put(p + ".tokens", np.array([s.token for s in steps], np.int64))
        w.put(p + ".logits", np.stack([np.asarray(r.logits)[-1] for r in res]))
        w.put(p + ".prompt_exit_layers", np.asarray(res[0].exit_layers, np.int64))
        w.put(p + ".step_exit_layers", np.array([int(np.asarray(r.exit_layers)[-1]) for r in res], np.int64))
        w.put(p + ".all_exit_layers", np.concatenate([np.asarray(r.exit_layers, np.int64).ravel() for r in res]))
        _flops(res, w, p)
        w.put(f"{case}{SEP}diag.gen_margin", np.array(margins, np.float64))
    except Exception as e:
        w.put(f"{case}{SEP}gen.error", np.array(_err(e)))
    # -- prefill, all logits
    try:
        eng = engine_factory()
        probe = MarginProbe(eng.policy)
        try:
            cache = eng.new_cache(len(ids))
            r = eng.forward(ids, cache, all_logits=True)
            margin = probe.take()
        finally:
            probe.restore()
        p = f"{case}{SEP}prefill"
        w.put(p + ".logits", np.asarray(r.logits))
        w.put(p + ".exit_layers", np.asarray(r.exit_layers, np.int64))
        _flops([r], w, p)
        w.put(f"{case}{SEP}diag.prefill_margin", np.float64(margin))
    except Exception as e:
        w.put(f"{case}{SEP}prefill.error", np.array(_err(e)))
    # -- the reference dump
    try:
        arrays = minadept.dump.dump_arrays(engine_factory(), ids)
        for k in sorted(arrays):
            w.put(f"{case}{SEP}dump.{k}", np.asarray(arrays[k]))
    except Exception as e:
        w.put(f"{case}{SEP}dump.error", np.array(_err(e)))


def cmd_record(args):
    t0 = time.perf_counter()
    w = NpzWriter(args.out)
    w.put("meta.python", np.array(sys.executable))
    try:
        from threadpoolctl import threadpool_limits
        threadpool_limits(1)                       # BLAS thread count changes summation order
        import minadept
        from minadept import Engine, Model
        from minadept import backend
        from minadept.exits.adept import adept_engine, load_adept
        from minadept.exits.policies import make_policy
        m = Model.load()
    except Exception as e:
        w.put("meta.import_error", np.array(_err(e)))
        w.close()
        print(f"record: cannot import or load minadept: {_err(e)}; wrote {args.out} with the error", file=sys.stderr)
        return 0
    w.put("meta.minadept_file", np.array(getattr(minadept, "__file__", "?")))
    w.put("meta.version", np.array(str(getattr(minadept, "__version__", "?"))))
    w.put("meta.numpy", np.array(np.__version__))
    try:
        ap = load_adept(m.path, m.config)
        w.put("meta.adept_tau", np.float64(ap.threshold))
    except Exception as e:
        ap = None
        w.put("meta.adept_error", np.array(_err(e)))
    backends = ["numpy"]
    try:
        backend.use("fast")
        backends.append("fast")
    except Exception as e:
        w.put("meta.fast_error", np.array(_err(e)))
    if args.backends:
        backends = [b for b in backends if b in args.backends.split(",")]
    w.put("meta.backends", np.array(",".join(backends)))
    prompts = PROMPTS[:args.prompts]
    ids_list = []
    for i, text in enumerate(prompts):
        ids = m.tokenizer.encode(text)
        ids_list.append(ids)
        w.put(f"meta.prompt{i}.ids", np.asarray(ids, np.int64))
    cases = []
    for be in backends:
        for plabel, pkw in POLICIES:
            kvs = KV_MODES + (ADEPT_EXTRA_KV if pkw["name"] == "adept" else [])
            for klabel, ekw, learned in kvs:
                for i in range(len(prompts)):
                    cases.append((be, plabel, pkw, klabel, ekw, learned, i))
    n_err = 0
    for n, (be, plabel, pkw, klabel, ekw, learned, i) in enumerate(cases):
        case = SEP.join((be, plabel, klabel, f"p{i}"))
        try:
            backend.use(be)
            kw = dict(pkw)
            name = kw.pop("name")
            if name == "adept":
                policy = make_policy(name, m.config, adept=ap, **kw)
                factory = (lambda policy=policy, ekw=ekw, learned=learned:
                           adept_engine(m, policy, ap, kv_map=learned, **ekw))
            else:
                policy = make_policy(name, m.config, **kw)
                factory = lambda policy=policy, ekw=ekw: Engine(m, policy, **ekw)
            _record_case(m, factory, ids_list[i], w, case)
        except Exception as e:
            n_err += 1
            w.put(f"{case}{SEP}setup.error", np.array(_err(e)))
        if not args.quiet and (n + 1) % 50 == 0:
            print(f"  {n + 1}/{len(cases)} cases, {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    w.put("meta.cases", np.array(json.dumps([SEP.join((c[0], c[1], c[3], f"p{c[6]}")) for c in cases])))
    w.close()
    print(f"record: {len(cases)} cases ({', '.join(backends)}), {w.n} arrays -> {args.out} "
          f"in {time.perf_counter() - t0:.1f}s ({sys.executable}, minadept at "
          f"{os.path.dirname(getattr(minadept, '__file__', '?'))})")
    return 0


# ================================================================================ compare

def _s(a) -> str:
    return str(np.asarray(a).item()) if np.asarray(a).ndim == 0 else str(a)


def _top2_gap(row) -> float:
    row = np.asarray(row, np.float64)
    t = np.partition(row, -2)[-2:]
    return float(t[1] - t[0])


def _first_diff(a, b) -> str:
    """One line naming the first differing element of two arrays (same shape)."""
    if a.dtype.kind in "fc":
        ne = ~((a == b) | (np.isnan(a) & np.isnan(b))) if a.dtype.kind == "f" else a != b
        if not ne.any():       # equal values, different bits (-0.0 / NaN payload)
            ne = a.view(np.uint8).reshape(a.shape + (-1,)).any(-1) != b.view(np.uint8).reshape(b.shape + (-1,)).any(-1)
    else:
        ne = a != b
    idx = np.argwhere(ne)
    if a.ndim == 0:
        return f"{_s(a)} vs {_s(b)}"
    if len(idx) == 0:
        return "bit patterns differ"
    i = tuple(int(x) for x in idx[0])
    msg = f"{int(ne.sum())} of {a.size} elements differ; first at {list(i)}: {a[i].item()!r} vs {b[i].item()!r}"
    if a.dtype.kind in "fc":
        d = np.abs(a.astype(np.float64) - b.astype(np.float64))
        msg += f"; max|diff| {np.nanmax(d):.3g}"
    return msg


class Case:
    def __init__(self, name):
        self.name = name
        self.status = "identical"          # identical | close | explained | both-error | FAIL
        self.notes: list[str] = []
        self.maxdiff = 0.0

    def fail(self, msg):
        self.status = "FAIL"
        self.notes.append(msg)

    def soften(self, status, msg=None):
        order = ["identical", "close", "both-error", "explained", "FAIL"]
        if order.index(status) > order.index(self.status):
            self.status = status
        if msg:
            self.notes.append(msg)


def _load_case_fields(z, case):
    pre = case + SEP
    return {k[len(pre):]: k for k in z.files if k.startswith(pre)}


def _bitwise(a, b) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _compare_part_bitwise(c, part, fo, fn, zo, zn):
    keys = sorted(k for k in set(fo) | set(fn) if k.startswith(part + ".") and not k.startswith("diag."))
    for k in keys:
        if k not in fo or k not in fn:
            c.fail(f"{k}: only in {'OLD' if k in fo else 'NEW'}"
                   + (f" ({_s(zo[fo[k]] if k in fo else zn[fn[k]])})" if k.endswith(".error") else ""))
            continue
        a, b = zo[fo[k]], zn[fn[k]]
        if not _bitwise(a, b):
            if a.shape != b.shape or a.dtype != b.dtype:
                c.fail(f"{k}: shape/dtype {a.shape} {a.dtype} vs {b.shape} {b.dtype}")
            else:
                c.fail(f"{k}: not bitwise identical: {_first_diff(a, b)}")
        elif a.dtype.kind == "f":
            pass


def _close(a, b, atol, rtol=0.0):
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    d = np.abs(a64 - b64)
    ok = bool(np.all((d <= atol + rtol * np.abs(b64)) | (np.isnan(a64) & np.isnan(b64))))
    return ok, (float(np.nanmax(d)) if d.size else 0.0)


def _compare_fast(c, fo, fn, zo, zn):
    """Fast backend: tolerance on floats, exact on ints, near-tie explanations."""
    def get(f, z, k):
        return z[f[k]] if k in f else None

    def same_int(part, k):
        a, b = get(fo, zo, f"{part}.{k}"), get(fn, zn, f"{part}.{k}")
        return a is not None and b is not None and a.shape == b.shape and np.array_equal(a, b)

    # ---- generation
    to, tn = get(fo, zo, "gen.tokens"), get(fn, zn, "gen.tokens")
    if to is not None and tn is not None and to.shape != tn.shape:
        c.fail(f"gen.tokens: {len(to)} vs {len(tn)} generated tokens")
    elif to is not None and tn is not None:
        lo, ln = get(fo, zo, "gen.logits"), get(fn, zn, "gen.logits")
        eo, en = get(fo, zo, "gen.step_exit_layers"), get(fn, zn, "gen.step_exit_layers")
        po, pn = get(fo, zo, "gen.prompt_exit_layers"), get(fn, zn, "gen.prompt_exit_layers")
        mo, mn = get(fo, zo, "diag.gen_margin"), get(fn, zn, "diag.gen_margin")
        S = len(to)
        div = S                                    # first step where tokens or exit layers differ
        for s in range(S):
            exit_same = (np.array_equal(po, pn) if s == 0 else eo[s] == en[s])
            if to[s] != tn[s] or not exit_same:
                div = s
                break
        ok, md = _close(lo[:div], ln[:div], TOL)
        c.maxdiff = max(c.maxdiff, md)
        if not ok:
            c.fail(f"gen.logits: max|diff| {md:.3g} > {TOL:g} before any token/exit difference")
        if div < S:
            exit_same = np.array_equal(po, pn) if div == 0 else eo[div] == en[div]
            if not exit_same:
                mg = np.nanmin([mo[div] if mo is not None else np.nan, mn[div] if mn is not None else np.nan])
                what = (f"gen step {div}: exit layer {(po if div == 0 else eo[div])!s} vs {(pn if div == 0 else en[div])!s}; "
                        f"exit score margin {mg:.3g}")
                if mg < TOL:
                    c.soften("explained", what + f" < {TOL:g}: near-tie (exit score margin)")
                else:
                    c.fail(what + f" (not a near-tie)")
            else:
                go, gn = _top2_gap(lo[div]), _top2_gap(ln[div])
                ok, md = _close(lo[div:div + 1], ln[div:div + 1], TOL)
                what = (f"gen step {div}: token {to[div]} vs {tn[div]}; top-2 logit gap {min(go, gn):.3g} "
                        f"(old {go:.3g}, new {gn:.3g}); logits max|diff| {md:.3g}")
                if min(go, gn) < TOL and ok:
                    c.soften("explained", what + ": near-tie (top-2 logit gap)")
                else:
                    c.fail(what + " (not a near-tie)")
        # FLOPs: exact over the results before the divergence (results 0..div-1 = prompt + decodes)
        T = len(po) if po is not None else 0
        n_tok = T + max(0, div - 1) if div < S else None      # per-token arrays: prompt tokens, then 1 per decode
        for f in FLOP_FIELDS + ("total_flops",):
            a, b = get(fo, zo, f"gen.{f}"), get(fn, zn, f"gen.{f}")
            if a is None or b is None:
                continue
            if f in ("block_flops", "check_flops", "head_flops"):
                cut = n_tok if div < S else None
            else:
                cut = div if div < S else None
            if div == 0:
                continue
            if not np.array_equal(a[:cut], b[:cut]):
                c.fail(f"gen.{f}: {_first_diff(a[:cut], b[:cut])}")
    # ---- prefill and dump: exit layers exact (or near-tie), floats within tolerance
    for part, fl in (("prefill", ("logits",)), ("dump", ("logits", "hidden_states", "kv"))):
        xo, xn = get(fo, zo, f"{part}.exit_layers"), get(fn, zn, f"{part}.exit_layers")
        if xo is None or xn is None:
            continue
        if not np.array_equal(xo, xn):
            mg = np.nanmin([zo[fo["diag.prefill_margin"]] if "diag.prefill_margin" in fo else np.nan,
                            zn[fn["diag.prefill_margin"]] if "diag.prefill_margin" in fn else np.nan])
            what = f"{part}.exit_layers: {_first_diff(xo, xn)}; exit score margin {mg:.3g}"
            if mg < TOL:
                c.soften("explained", what + f" < {TOL:g}: near-tie (exit score margin)")
            else:
                c.fail(what + " (not a near-tie)")
            continue
        for k in fl:
            a, b = get(fo, zo, f"{part}.{k}"), get(fn, zn, f"{part}.{k}")
            if a is None or b is None:
                continue
            if a.shape != b.shape:
                c.fail(f"{part}.{k}: shape {a.shape} vs {b.shape}")
                continue
            ok, md = _close(a, b, TOL, 0.0 if k == "logits" else 1e-5)
            c.maxdiff = max(c.maxdiff, md)
            if not ok:
                c.fail(f"{part}.{k}: max|diff| {md:.3g} > tolerance")
        for f in FLOP_FIELDS + ("total_flops",):
            a, b = get(fo, zo, f"{part}.{f}"), get(fn, zn, f"{part}.{f}")
            if a is not None and b is not None and not np.array_equal(a, b):
                c.fail(f"{part}.{f}: {_first_diff(a, b)}")
    # remaining exact fields (ids, policy text, format version) and key sets
    for k in sorted(set(fo) | set(fn)):
        if k.startswith("diag."):
            continue
        if k not in fo or k not in fn:
            if not (k.endswith(".error") and k in fo and k in fn):
                c.fail(f"{k}: only in {'OLD' if k in fo else 'NEW'}"
                       + (f" ({_s(zo[fo[k]] if k in fo else zn[fn[k]])})" if k.endswith(".error") else ""))
            continue
        a, b = zo[fo[k]], zn[fn[k]]
        if a.dtype.kind in "iubUS" and k.split(".", 1)[1] in ("input_ids", "policy", "format_version", "tokens"):
            if not np.array_equal(a, b) and not k.startswith("gen."):
                c.fail(f"{k}: {_first_diff(a, b)}")
    # floats that matched bitwise everywhere stay 'identical'; otherwise 'close'
    if c.status == "identical":
        for k in fo:
            if k in fn and not k.startswith("diag.") and not _bitwise(zo[fo[k]], zn[fn[k]]):
                c.soften("close")
                break


def cmd_compare(args):
    t0 = time.perf_counter()
    zo, zn = np.load(args.old, allow_pickle=False), np.load(args.new, allow_pickle=False)
    print(f"OLD {args.old}: {_s(zo['meta.python']) if 'meta.python' in zo.files else '?'}")
    print(f"NEW {args.new}: {_s(zn['meta.python']) if 'meta.python' in zn.files else '?'}")
    meta_fail = []
    for z, tag in ((zo, "OLD"), (zn, "NEW")):
        if "meta.import_error" in z.files:
            meta_fail.append(f"{tag} could not import/load minadept: {_s(z['meta.import_error'])}")
    for k in ("meta.backends", "meta.adept_tau", "meta.cases", "meta.adept_error", "meta.fast_error"):
        a = _s(zo[k]) if k in zo.files else None
        b = _s(zn[k]) if k in zn.files else None
        if a != b:
            meta_fail.append(f"{k}: OLD {a if a is None or len(a) < 80 else a[:80] + '...'} vs "
                             f"NEW {b if b is None or len(b) < 80 else b[:80] + '...'}")
    for i in range(len(PROMPTS)):
        k = f"meta.prompt{i}.ids"
        if (k in zo.files) != (k in zn.files) or (k in zo.files and not _bitwise(zo[k], zn[k])):
            meta_fail.append(f"{k} differs (tokenizer)")
    # group keys by case
    def cases_of(z):
        out = {}
        for k in z.files:
            if k.startswith("meta."):
                continue
            case, field = k.split(SEP + "", 4)[:4], k.rsplit(SEP, 1)[1]
            out.setdefault(SEP.join(case), {})[field] = k
        return out
    co, cn = cases_of(zo), cases_of(zn)
    results: list[Case] = []
    pols, kvl = [p for p, _ in POLICIES], [k for k, _, _ in KV_MODES + ADEPT_EXTRA_KV]

    def order(n):
        be, pol, kv, pr = (n.split(SEP) + ["?"] * 4)[:4]
        return (be != "numpy", be, pols.index(pol) if pol in pols else 99, pol,
                kvl.index(kv) if kv in kvl else 99, kv, pr)
    for name in sorted(set(co) | set(cn), key=order):
        c = Case(name)
        results.append(c)
        if name not in co or name not in cn:
            c.fail(f"case only in {'OLD' if name in co else 'NEW'}")
            continue
        fo, fn = co[name], cn[name]
        # errors: the same error in both = unchanged behaviour (noted); otherwise a difference
        for part in ("setup", "gen", "prefill", "dump"):
            eo, en = fo.get(part + ".error"), fn.get(part + ".error")
            if eo and en:
                if _s(zo[eo]) == _s(zn[en]):
                    c.soften("both-error", f"{part}: both raise {_s(zo[eo])}")
                else:
                    c.fail(f"{part}: OLD raises {_s(zo[eo])!r}, NEW raises {_s(zn[en])!r}")
            elif eo or en:
                c.fail(f"{part}: only {'OLD' if eo else 'NEW'} raises: {_s(zo[eo] if eo else zn[en])}")
        if c.status == "FAIL":
            continue
        if name.split(SEP)[0] == "numpy":
            for part in ("gen", "prefill", "dump"):
                _compare_part_bitwise(c, part, fo, fn, zo, zn)
        else:
            _compare_fast(c, fo, fn, zo, zn)

    # ---- table: backend x policy, one column per KV mode (prompts aggregated)
    kv_order = [k for k, _, _ in KV_MODES + ADEPT_EXTRA_KV]
    pol_order = [p for p, _ in POLICIES]
    sym = {"identical": "=", "close": "~", "explained": "t", "both-error": "E", "FAIL": "X"}
    groups: dict[tuple, dict[str, list[Case]]] = {}
    for c in results:
        be, pol, kv, _ = (c.name.split(SEP) + ["?"] * 4)[:4]
        groups.setdefault((be, pol), {}).setdefault(kv, []).append(c)
    kvs = [k for k in kv_order if any(k in g for g in groups.values())] + sorted(
        {k for g in groups.values() for k in g} - set(kv_order))
    print("\nper prompt: = bitwise identical, ~ within tolerance, t differs after a measured near-tie, "
          "E same error in both, X FAIL")
    print(f"{'backend':7} {'policy':15} " + " ".join(f"{k:>15}" for k in kvs) + f" {'max|dlogit|':>11}")
    for (be, pol), g in sorted(groups.items(), key=lambda kv: (kv[0][0] != "numpy", kv[0][0],
                               pol_order.index(kv[0][1]) if kv[0][1] in pol_order else 99, kv[0][1])):
        cells = ["".join(sym[c.status] for c in sorted(g[k], key=lambda c: c.name)) if k in g else "-" for k in kvs]
        md = max(c.maxdiff for cs in g.values() for c in cs)
        bad = any(c.status == "FAIL" for cs in g.values() for c in cs)
        print(f"{be:7} {pol:15} " + " ".join(f"{x:>15}" for x in cells) + f" {md:>11.2g}" + ("  <-- FAIL" if bad else ""))
    fails = [c for c in results if c.status == "FAIL"]
    notes = [c for c in results if c.status in ("explained", "both-error")]
    if meta_fail:
        print("\nFIRST DIFFERENCES (meta):")
        for m in meta_fail:
            print("  " + m)
    if fails:
        print(f"\nFIRST DIFFERENCES ({len(fails)} failing cases; the first {min(len(fails), args.show)} shown):")
        for c in fails[:args.show]:
            print(f"  {c.name}")
            for n in c.notes[:4]:
                print(f"      {n}")
            if len(c.notes) > 4:
                print(f"      ... {len(c.notes) - 4} more")
    if notes:
        print(f"\nNOTES ({len(notes)} cases explained or failing identically in both):")
        for c in notes[:args.show]:
            print(f"  {c.name}: {'; '.join(c.notes[:2])}")
    n_np = sum(1 for c in results if c.name.startswith("numpy"))
    n_fast = len(results) - n_np
    ok = not fails and not meta_fail and results
    summary = {s: sum(1 for c in results if c.status == s) for s in ("identical", "close", "explained", "both-error", "FAIL")}
    print(f"\n{len(results)} cases ({n_np} numpy, {n_fast} fast): "
          + ", ".join(f"{v} {k}" for k, v in summary.items() if v) + f"; compared in {time.perf_counter() - t0:.1f}s")
    if ok:
        print("VERDICT: PASS - NumPy backend bitwise identical (tokens, logits, exit layers, FLOPs, dumps); "
              f"fast backend within {TOL:g} with identical tokens, exit layers and FLOPs"
              + (" (near-ties explained)" if summary["explained"] else ""))
        return 0
    print(f"VERDICT: FAIL - {len(fails)} cases differ" + (f", {len(meta_fail)} meta differences" if meta_fail else ""))
    return 1


# ================================================================================ speed

SPEED_TEXT = " ".join(PROMPTS) + " " + " ".join(PROMPTS)
SPEED_PROMPT, SPEED_NEW = 128, 64


def cmd_time(args):
    """Hidden: the timing subprocess, under either environment. Loads, warms up, prints "ready",
    then for each stdin line naming a setting ("full" or "adept") runs one timed prefill + greedy
    decode and prints one JSON line {"prefill": tok/s, "decode": tok/s}; ends at EOF."""
    from threadpoolctl import threadpool_limits
    threadpool_limits(1)
    from minadept import Engine, Model
    from minadept import backend
    from minadept.exits.adept import adept_engine, load_adept
    from minadept.exits.policies import make_policy
    backend.use("fast")
    m = Model.load()
    ids = np.asarray(m.tokenizer.encode(SPEED_TEXT)[:SPEED_PROMPT], np.int64)
    assert len(ids) == SPEED_PROMPT, len(ids)
    ap = load_adept(m.path, m.config)
    engines = {"full": Engine(m, make_policy("none", m.config)),
               "adept": adept_engine(m, make_policy("adept", m.config, adept=ap), ap)}

    def once(eng):
        c = eng.new_cache(SPEED_PROMPT + SPEED_NEW)
        t0 = time.perf_counter()
        r = eng.forward(ids, c)
        t1 = time.perf_counter()
        tok = int(np.argmax(r.logits[-1]))
        for i in range(SPEED_NEW - 1):
            r = eng.forward([tok], c, step=i + 1)
            tok = int(np.argmax(r.logits[-1]))
        t2 = time.perf_counter()
        return {"prefill": SPEED_PROMPT / (t1 - t0), "decode": (SPEED_NEW - 1) / (t2 - t1)}

    for eng in engines.values():        # warm-up: first BLAS call, fused plan, propagation weights
        once(eng)
    print("ready", flush=True)
    for line in sys.stdin:
        print(json.dumps(once(engines[line.strip()])), flush=True)
    return 0


def cmd_speed(args):
    t0 = time.perf_counter()
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1",
               MINADEPT_BACKEND="fast")
    here = os.path.abspath(__file__)
    pys = {"old": args.old_python, "new": args.new_python}
    # per[side][setting][measure] = one value per round (best of the round's runs)
    per = {s: {n: {"prefill": [], "decode": []} for n in ("full", "adept")} for s in pys}
    allruns = {s: {n: [] for n in ("full", "adept")} for s in pys}
    for rnd in range(args.rounds):
        procs = {}
        try:
            for side, py in pys.items():       # cwd=/ : never import a source tree by accident
                procs[side] = subprocess.Popen([py, here, "_time"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                               stderr=subprocess.PIPE, text=True, env=env, cwd="/")
            for side, p in procs.items():
                if p.stdout.readline().strip() != "ready":
                    p.stdin.close()
                    print(f"speed: the {side} timing process failed ({pys[side]}):\n"
                          f"{p.stderr.read().strip()[-2000:]}", file=sys.stderr)
                    return 1
            runs = {s: {n: [] for n in ("full", "adept")} for s in pys}
            # interleave the two environments run by run, so that load from other processes
            # falls on both alike; the side that goes first alternates
            for rep in range(args.reps):
                for name in ("full", "adept"):
                    order = ("old", "new") if (rnd + rep) % 2 == 0 else ("new", "old")
                    for side in order:
                        procs[side].stdin.write(name + "\n")
                        procs[side].stdin.flush()
                        runs[side][name].append(json.loads(procs[side].stdout.readline()))
        finally:
            for p in procs.values():
                try:
                    p.stdin.close()
                except OSError:
                    pass
                p.wait()
        for side in pys:
            for name in ("full", "adept"):
                allruns[side][name].extend(runs[side][name])
                for meas in ("prefill", "decode"):
                    # best of the runs: other processes on a shared machine only ever slow a run down
                    per[side][name][meas].append(max(r[meas] for r in runs[side][name]))
        print(f"  round {rnd + 1}/{args.rounds}: " + "  ".join(
            f"{s} full {per[s]['full']['prefill'][-1]:.0f}/{per[s]['full']['decode'][-1]:.0f} "
            f"adept {per[s]['adept']['prefill'][-1]:.0f}/{per[s]['adept']['decode'][-1]:.0f}"
            for s in ("old", "new")) + "  (prefill/decode tok/s)", file=sys.stderr)
    print(f"\nfast backend, 1 thread, {SPEED_PROMPT}-token prompt, {SPEED_NEW} greedy new tokens; "
          f"{args.rounds} rounds, each a fresh timing process per environment, {args.reps} runs per side "
          "interleaved old/new.\nVerdict on 'best' = the fastest of all runs (other processes only ever slow "
          "a run down); 'median' = median over rounds of each round's best; 'rounds' = per-round new/old range.")
    print(f"{'setting':8} {'measure':8} {'old best':>9} {'new best':>9} {'new/old':>8} {'median':>7} "
          f"{'rounds':>15}  target >= 0.95")
    ok = True
    for name in ("full", "adept"):
        for meas in ("prefill", "decode"):
            o, n = per["old"][name][meas], per["new"][name][meas]
            bo = max(r[meas] for r in allruns["old"][name])
            bn = max(r[meas] for r in allruns["new"][name])
            paired = sorted(b / a for a, b in zip(o, n))
            ratio = bn / bo
            ok &= ratio >= 0.95
            print(f"{name:8} {meas:8} {bo:>9.0f} {bn:>9.0f} {ratio:>8.3f} "
                  f"{statistics.median(n) / statistics.median(o):>7.3f} {paired[0]:>6.3f} .. {paired[-1]:<6.3f}"
                  f"  {'ok' if ratio >= 0.95 else 'BELOW TARGET'}")
    print(f"speed: {'PASS' if ok else 'FAIL'} ({time.perf_counter() - t0:.0f}s). On a shared machine the "
          "per-round range shows the noise; repeat a FAIL with more --rounds before believing it.")
    return 0 if ok else 1


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="{record,compare,speed}")
    r = sub.add_parser("record", help="record behaviour in this environment")
    r.add_argument("out")
    r.add_argument("--prompts", type=int, default=len(PROMPTS), help="use the first N prompts (default all 4)")
    r.add_argument("--backends", default=None, help="comma list (default: numpy and fast when built)")
    r.add_argument("--quiet", action="store_true")
    c = sub.add_parser("compare", help="compare two records; exit 0 when the rule holds")
    c.add_argument("old")
    c.add_argument("new")
    c.add_argument("--show", type=int, default=10, help="failing cases to detail (default 10)")
    s = sub.add_parser("speed", help="alternating timing rounds in two environments")
    s.add_argument("--old-python", required=True)
    s.add_argument("--new-python", required=True)
    s.add_argument("--rounds", type=int, default=5)
    s.add_argument("--reps", type=int, default=5, help="timed runs per side per round (best kept)")
    sub.add_parser("_time")               # hidden: the timing subprocess
    args = ap.parse_args(argv)
    return {"record": cmd_record, "compare": cmd_compare, "speed": cmd_speed, "_time": cmd_time}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())

"""``minadept check REF.npz CANDIDATE.npz``: compare two reference dumps (format in the README)
and say where the candidate parts from the reference.

Order of the checks: each file is readable and well formed (keys, dtypes, shapes that agree with
each other, a supported ``format_version``), then the two agree on format version, shapes and
``input_ids``; any failure there is unusable input (``CheckInputError``, exit status 2). Then,
walking the computation in order -- h_0, then for each layer l = 1..n_layer its K/V (made from
h_{l-1}) and its output h_l, then the logits -- every (array, layer, token) is compared:

    a token is beyond tolerance when  max|cand - ref| > atol + rtol * max|ref|

with both maxima over that token's entries (its n_embd vector, its H x D keys or values, its
vocab_size logits). The scale is the token's vector, not each element: an fp32 dot product of
n terms carries a rounding error proportional to the size of its terms, not of its result, so an
element near zero may differ by as much as a large one (see DEFAULT_RTOL). Exit layers must agree
exactly; the greedy token (argmax of the logits) must agree except where the reference's own
top-2 margin is within tolerance (a near-tie).
"""
from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .dump import FORMAT_VERSION

#: Relative tolerance, of a token's largest entry (see the module doc). Each array entry is a
#: chain of fp32 dot products over n_embd (and 4 n_embd, in the MLP) terms; two correct
#: implementations sum them in different orders (BLAS blocking, fused kernels), which moves each
#: result by about sqrt(n) * 2^-24 of its terms' size (random-walk rounding; n = 3072 gives
#: 3e-6), and layer norms and the residual stream carry that through every layer. Measured
#: between minadept and transformers (fp32, CPU, all 12 layers): at most 1.7e-6 of the token's
#: scale on a random GPT-2 124M, 1.9e-6 on the embedded model. 1e-4 leaves a factor of 50 or
#: more for other BLAS libraries, thread counts and machines, while a real porting error moves
#: values by 1e-1 to 1 of their scale (a transposed weight, a wrong position); the subtlest one,
#: the GELU in its erf form instead of tanh, moves them by 3e-4 to 1e-3.
DEFAULT_RTOL = 1e-4
#: Absolute floor, for tokens whose vectors are all near zero (|x| << 1); GPT-2 states are O(1).
DEFAULT_ATOL = 1e-5

REQUIRED = ("format_version", "input_ids", "hidden_states", "logits", "kv", "exit_layers", "policy")


class CheckInputError(Exception):
    """A dump that cannot be compared (unreadable, malformed, other version, other shapes or ids)."""


@dataclass
class Row:
    """One (array, layer): worst token's max |d|, max |d| / max|ref| over tokens, first token beyond."""
    array: str               # hidden_states, K, V, logits
    layer: int | None        # hidden_states 0..L, K/V 1..L, logits None
    max_abs: float
    max_rel: float
    first_token: int | None  # first token beyond tolerance, or None
    first_excess: float | None = None   # |d| / tolerance of that token


@dataclass
class CheckResult:
    ref: str
    cand: str
    shape: dict
    atol: float
    rtol: float
    rows: list[Row]
    exit_agree: int
    exit_first: int | None
    greedy_agree: int
    greedy_first: int | None       # first differing position (near-ties included)
    greedy_fail: int | None        # first differing position that is not a near-tie
    policies: tuple = ()
    notes: list = field(default_factory=list)

    @property
    def first(self) -> Row | None:
        """The first (array, layer) in computation order with a token beyond tolerance."""
        return next((r for r in self.rows if r.first_token is not None), None)

    @property
    def ok(self) -> bool:
        return (self.first is None and self.exit_first is None and self.greedy_fail is None)


# ----------------------------------------------------------------------------- loading

def load_dump(path) -> dict:
    """Read and validate one dump; returns its arrays. Raises CheckInputError (one line)."""
    p = Path(path)
    name = str(path)
    if not p.exists():
        raise CheckInputError(f"{name}: no such file")
    if p.is_dir():
        raise CheckInputError(f"{name}: is a directory, expected a .npz dump")
    try:
        with open(p, "rb") as f:
            magic = f.read(6)
        if magic[:4] not in (b"PK\x03\x04", b"PK\x05\x06"):
            what = "a single .npy array" if magic == b"\x93NUMPY" else "empty" if not magic else "not a zip archive"
            raise CheckInputError(f"{name}: cannot read as .npz ({what}); expected a minadept dump")
        with np.load(p, allow_pickle=False) as z:
            keys = set(z.files)
            if "format_version" not in keys:
                raise CheckInputError(f"{name}: not a minadept dump (no format_version array)")
            v = z["format_version"]
            if v.shape != () or v.dtype.kind not in "iu":
                raise CheckInputError(f"{name}: format_version must be a scalar integer, got {v.dtype} {v.shape}")
            v = int(v)
            if v < FORMAT_VERSION:
                raise CheckInputError(f"{name}: dump format_version {v} is no longer supported (this minadept reads "
                                      f"version {FORMAT_VERSION}); write it again with the current dump")
            if v > FORMAT_VERSION:
                raise CheckInputError(f"{name}: dump format_version {v} is newer than this minadept reads "
                                      f"({FORMAT_VERSION}); upgrade minadept")
            missing = [k for k in REQUIRED if k not in keys]
            if missing:
                raise CheckInputError(f"{name}: missing array{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
                                      f"(format_version {v} requires {', '.join(REQUIRED)})")
            d = {k: z[k] for k in REQUIRED}
    except CheckInputError:
        raise
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        raise CheckInputError(f"{name}: cannot read as .npz ({e.__class__.__name__}: {e})") from None
    except ValueError as e:   # pickled object arrays, corrupt headers
        raise CheckInputError(f"{name}: malformed .npz ({str(e).splitlines()[0]})") from None
    _validate(d, name)
    return d


def _validate(d: dict, name: str) -> None:
    def bad(msg):
        raise CheckInputError(f"{name}: {msg}")

    for k, kind, nd in (("input_ids", "iu", 1), ("exit_layers", "iu", 1), ("hidden_states", "f", 3),
                        ("logits", "f", 2), ("kv", "f", 5)):
        a = d[k]
        if a.dtype.kind not in kind:
            bad(f"{k} has dtype {a.dtype}, expected {'an integer' if kind == 'iu' else 'a float'} type")
        if a.ndim != nd:
            bad(f"{k} has {a.ndim} dimensions {list(a.shape)}, expected {nd}")
    if d["policy"].dtype.kind != "U" or d["policy"].shape != ():
        bad(f"policy must be a str scalar (JSON), got {d['policy'].dtype} {d['policy'].shape}")
    try:
        json.loads(str(d["policy"]))
    except ValueError:
        bad("policy is not valid JSON")
    T = d["input_ids"].shape[0]
    if T < 1:
        bad("input_ids is empty")
    L1, T1, C = d["hidden_states"].shape
    L = L1 - 1
    if L < 1:
        bad(f"hidden_states has {L1} entries, expected n_layer + 1 >= 2")
    if T1 != T:
        bad(f"hidden_states has {T1} tokens, input_ids {T}")
    if d["logits"].shape[0] != T:
        bad(f"logits has {d['logits'].shape[0]} tokens, input_ids {T}")
    kv = d["kv"].shape
    if kv[0] != L or kv[1] != 2 or kv[3] != T or kv[2] * kv[4] != C:
        bad(f"kv has shape {list(kv)}, expected [n_layer={L}, 2, n_head, T={T}, head_dim] with "
            f"n_head * head_dim = n_embd = {C}")
    if d["exit_layers"].shape != (T,):
        bad(f"exit_layers has shape {list(d['exit_layers'].shape)}, expected [{T}]")
    ex = d["exit_layers"]
    if ((ex < 1) | (ex > L)).any():
        t = int(np.flatnonzero((ex < 1) | (ex > L))[0])
        bad(f"exit_layers[{t}] = {int(ex[t])} is outside 1..n_layer = {L}")
    if (d["input_ids"] < 0).any() or (d["input_ids"] >= d["logits"].shape[1]).any():
        bad(f"input_ids outside 0..vocab_size-1 = {d['logits'].shape[1] - 1}")


def _shape(d: dict) -> dict:
    L2, _, H, T, D = d["kv"].shape
    return dict(n_layer=L2, n_head=H, head_dim=D, tokens=T, n_embd=d["hidden_states"].shape[2],
                vocab_size=d["logits"].shape[1])


def compatible(ref: dict, cand: dict, ref_name: str, cand_name: str) -> dict:
    """Shapes and ids of the two dumps agree; returns the shape. Raises CheckInputError."""
    a, b = _shape(ref), _shape(cand)
    for k in ("n_layer", "n_embd", "n_head", "head_dim", "vocab_size", "tokens"):
        if a[k] != b[k]:
            raise CheckInputError(f"shape mismatch: {ref_name} has {k} {a[k]}, {cand_name} has {b[k]} "
                                  f"(dumps of different models or prompts)")
    diff = np.flatnonzero(ref["input_ids"] != cand["input_ids"])
    if len(diff):
        t = int(diff[0])
        raise CheckInputError(f"input_ids differ at token {t} ({int(ref['input_ids'][t])} in {ref_name}, "
                              f"{int(cand['input_ids'][t])} in {cand_name}): not the same prompt or tokenizer")
    return a


# ----------------------------------------------------------------------------- comparing

def _rows_of(name: str, layer, ref: np.ndarray, cand: np.ndarray, atol: float, rtol: float) -> Row:
    """ref, cand [T, ...]: per-token max |d| against atol + rtol * max|ref|."""
    r = ref.reshape(ref.shape[0], -1).astype(np.float64)
    c = cand.reshape(cand.shape[0], -1).astype(np.float64)
    d = np.abs(c - r)
    d = np.where(np.isnan(d), np.where((r == c) | (np.isnan(r) & np.isnan(c)), 0.0, np.inf), d)
    dmax = d.max(axis=1)
    scale = np.abs(np.where(np.isfinite(r), r, 0.0)).max(axis=1)
    tol = atol + rtol * scale
    beyond = np.flatnonzero(dmax > tol)
    rel = np.where(scale > 0, dmax / np.where(scale > 0, scale, 1.0), np.where(dmax > 0, np.inf, 0.0))
    first = int(beyond[0]) if len(beyond) else None
    return Row(name, layer, float(dmax.max()), float(rel.max()), first,
               None if first is None else float(dmax[first] / tol[first]))


def compare(ref: dict, cand: dict, *, atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL,
            ref_name: str = "REF", cand_name: str = "CANDIDATE") -> CheckResult:
    """Compare two validated dumps (``load_dump``); raises CheckInputError when they do not match
    in version, shapes or ids."""
    if not (np.isfinite(atol) and np.isfinite(rtol) and atol >= 0 and rtol >= 0):
        raise CheckInputError(f"tolerances must be finite and >= 0, got atol {atol}, rtol {rtol}")
    shape = compatible(ref, cand, ref_name, cand_name)
    L = shape["n_layer"]
    hr, hc, kr, kc = ref["hidden_states"], cand["hidden_states"], ref["kv"], cand["kv"]
    rows = [_rows_of("hidden_states", 0, hr[0], hc[0], atol, rtol)]
    for l in range(1, L + 1):          # computation order: K/V of layer l come from h_{l-1}
        # kv[l-1, 0] is [H, T, D]: move tokens first
        rows.append(_rows_of("K", l, kr[l - 1, 0].transpose(1, 0, 2), kc[l - 1, 0].transpose(1, 0, 2), atol, rtol))
        rows.append(_rows_of("V", l, kr[l - 1, 1].transpose(1, 0, 2), kc[l - 1, 1].transpose(1, 0, 2), atol, rtol))
        rows.append(_rows_of("hidden_states", l, hr[l], hc[l], atol, rtol))
    logit_row = _rows_of("logits", None, ref["logits"], cand["logits"], atol, rtol)
    rows.append(logit_row)

    ex_r, ex_c = ref["exit_layers"], cand["exit_layers"]
    ex_diff = np.flatnonzero(ex_r != ex_c)
    lr, lc = ref["logits"].astype(np.float64), cand["logits"].astype(np.float64)
    g_r, g_c = lr.argmax(axis=1), lc.argmax(axis=1)
    g_diff = np.flatnonzero(g_r != g_c)
    g_fail = None
    for t in g_diff:                   # a near-tie in the reference may flip within tolerance
        margin = lr[t, g_r[t]] - lr[t, g_c[t]]
        tol = atol + rtol * np.abs(lr[t]).max()
        if not margin <= 2 * tol:
            g_fail = int(t)
            break
    T = shape["tokens"]
    return CheckResult(ref=ref_name, cand=cand_name, shape=shape, atol=atol, rtol=rtol, rows=rows,
                       exit_agree=int(T - len(ex_diff)), exit_first=int(ex_diff[0]) if len(ex_diff) else None,
                       greedy_agree=int(T - len(g_diff)), greedy_first=int(g_diff[0]) if len(g_diff) else None,
                       greedy_fail=g_fail, policies=(str(ref["policy"]), str(cand["policy"])))


def check_files(ref_path, cand_path, *, atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL) -> CheckResult:
    ref = load_dump(ref_path)
    cand = load_dump(cand_path)
    return compare(ref, cand, atol=atol, rtol=rtol, ref_name=str(ref_path), cand_name=str(cand_path))


# ----------------------------------------------------------------------------- reporting

def _where(r: Row) -> str:
    return "logits" if r.array == "logits" else f"layer {r.layer} ({'hidden_states' if r.array == 'hidden_states' else r.array})"


def verdict(res: CheckResult) -> str:
    """The last line: PASS, or FAIL with the first place the candidate parts from the reference."""
    tol = f"atol {res.atol:g}, rtol {res.rtol:g}"
    if res.ok:
        return f"PASS: every array within {tol}; exit layers and greedy tokens agree"
    f = res.first
    if f is not None:
        x = f"{f.first_excess:.2f}" if f.first_excess < 10 else f"{f.first_excess:.3g}"
        return (f"FAIL: the candidate parts from the reference at {_where(f)}, token {f.first_token} "
                f"(max |d| {x}x the tolerance; {tol})")
    if res.exit_first is not None:
        return f"FAIL: exit layers differ first at token {res.exit_first} (the arrays are within {tol})"
    return f"FAIL: greedy tokens differ at token {res.greedy_fail} (the logits are within {tol})"


def format_table(res: CheckResult, ref: dict | None = None, cand: dict | None = None) -> str:
    """The human report: a row per layer, per-array summaries, agreement lines and the verdict."""
    s = res.shape
    out = [f"check {res.ref} (reference) vs {res.cand} (candidate): format_version {FORMAT_VERSION}, "
           f"{s['n_layer']} layers, {s['tokens']} tokens, n_embd {s['n_embd']}, {s['n_head']} heads, "
           f"vocab {s['vocab_size']}",
           f"tolerance per token: max|d| <= atol + rtol * max|ref|, atol {res.atol:g}, rtol {res.rtol:g}",
           "",
           f"{'layer':>6}  {'hidden |d|':>10} {'rel':>8}  {'K |d|':>9} {'rel':>8}  {'V |d|':>9} {'rel':>8}  first token beyond"]
    out += _layer_rows(res)
    out.append("")
    out += _array_summaries(res)
    out += _agreement_lines(res, ref, cand)
    out.append(verdict(res))
    return "\n".join(out)


def _cells(r) -> str:
    return (f"{r.max_abs:10.2e} {r.max_rel:8.1e}" if r.array == "hidden_states"
            else f"{r.max_abs:9.2e} {r.max_rel:8.1e}")


def _layer_rows(res: CheckResult) -> list[str]:
    """Layer 0 (the embedding), then each layer's hidden state, K and V, then the logits."""
    by = {(r.array, r.layer): r for r in res.rows}
    out = []
    for l in range(res.shape["n_layer"] + 1):
        h = by[("hidden_states", l)]
        if l == 0:
            kv, firsts = f"{'-':>9} {'':>8}  {'-':>9} {'':>8}", [h]
        else:
            k, v = by[("K", l)], by[("V", l)]
            kv, firsts = f"{_cells(k)}  {_cells(v)}", [k, v, h]
        beyond = ", ".join(f"{'h' if r.array == 'hidden_states' else r.array} {r.first_token}"
                           for r in firsts if r.first_token is not None) or "-"
        out.append(f"{l:>6}  {_cells(h)}  {kv}  {beyond}")
    lg = by[("logits", None)]
    out.append(f"{'logits':>6}  {lg.max_abs:10.2e} {lg.max_rel:8.1e}  {'':>9} {'':>8}  {'':>9} {'':>8}  "
               f"{'-' if lg.first_token is None else lg.first_token}")
    return out


def _array_summaries(res: CheckResult) -> list[str]:
    out = []
    for name, arr in (("hidden_states", ("hidden_states",)), ("kv", ("K", "V")), ("logits", ("logits",))):
        rs = [r for r in res.rows if r.array in arr]
        f = next((r for r in rs if r.first_token is not None), None)
        where = "none" if f is None else (f"token {f.first_token}" if f.layer is None
                                          else f"layer {f.layer}{'' if name == 'hidden_states' else ' ' + f.array}, token {f.first_token}")
        out.append(f"{name:<14} max |d| {max(r.max_abs for r in rs):.2e}  max rel {max(r.max_rel for r in rs):.1e}  "
                   f"first beyond tolerance: {where}")
    return out


def _agreement_lines(res: CheckResult, ref: dict | None, cand: dict | None) -> list[str]:
    T = res.shape["tokens"]
    ex = f"exit layers    {res.exit_agree}/{T} agree"
    if res.exit_first is not None and ref is not None and cand is not None:
        t = res.exit_first
        ex += f" (first difference: token {t}, {int(ref['exit_layers'][t])} vs {int(cand['exit_layers'][t])})"
    g = f"greedy tokens  {res.greedy_agree}/{T} agree"
    if res.greedy_first is not None:
        g += f" (first difference: token {res.greedy_first}"
        g += ")" if res.greedy_fail == res.greedy_first else ", a near-tie within tolerance)"
    return [ex, g]


def to_json(res: CheckResult) -> dict:
    f = res.first
    return {
        "ok": res.ok, "reference": res.ref, "candidate": res.cand, "format_version": FORMAT_VERSION,
        "shape": res.shape, "atol": res.atol, "rtol": res.rtol,
        "first_beyond": None if f is None else {"array": f.array, "layer": f.layer, "token": f.first_token,
                                               "excess": f.first_excess},
        "rows": [{"array": r.array, "layer": r.layer, "max_abs": r.max_abs, "max_rel": r.max_rel,
                  "first_token_beyond": r.first_token} for r in res.rows],
        "exit_layers": {"agree": res.exit_agree, "first_difference": res.exit_first},
        "greedy_tokens": {"agree": res.greedy_agree, "first_difference": res.greedy_first,
                          "first_failure": res.greedy_fail},
        "policies": {"reference": json.loads(res.policies[0]), "candidate": json.loads(res.policies[1])},
        "verdict": verdict(res),
    }


def _finite(x):
    """JSON has no inf/nan: write them as the strings "inf", "-inf", "nan"."""
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    if isinstance(x, float) and not np.isfinite(x):
        return str(x)
    return x


def run_check(ref_path, cand_path, *, atol=DEFAULT_ATOL, rtol=DEFAULT_RTOL, as_json=False, out=None) -> int:
    """The command: prints the table (or JSON) to ``out`` (stdout); returns 0 pass, 1 fail.
    Raises CheckInputError for unusable input (the CLI prints it and returns 2)."""
    import sys
    out = out or sys.stdout
    ref = load_dump(ref_path)
    cand = load_dump(cand_path)
    res = compare(ref, cand, atol=atol, rtol=rtol, ref_name=str(ref_path), cand_name=str(cand_path))
    if as_json:
        print(json.dumps(_finite(to_json(res))), file=out)
    else:
        print(format_table(res, ref, cand), file=out)
    return 0 if res.ok else 1

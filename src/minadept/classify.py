"""Early-exit classification: the embedded GPT-2 as a frozen feature extractor, a linear probe
(multinomial logistic regression, fitted here in NumPy) per layer, token-level exits in the
prefill (the engine's own policies) and a rule that stops the whole input at the first layer
whose probe is confident enough.

Pieces, in the order a classification runs them:

- ``read_tsv`` / ``encode``: a ``text<TAB>label`` file; a text becomes ``<|endoftext|>`` + its
  tokens, cut to the context (``n_positions``) with a warning.
- ``layer_states``: the engine's prefill layer by layer (its own ``_block`` and ``_exit_step``:
  the same token exits, K/V propagation and FLOP accounting as ``Engine.forward``), yielding
  after every block the states a probe sees (a token that left at layer k holds h_k) and the
  FLOPs spent so far, so that the caller can stop the input there.
- ``pool``: ``mean`` over the text's tokens (the ``<|endoftext|>`` prefix left out) or the
  ``last`` token's state.
- ``fit_logreg``: multinomial logistic regression with an L2 penalty, L-BFGS with an Armijo
  backtracking line search (the loss never increases).
- ``Probes``: one probe per layer 1..n_layer with its standardisation, the settings it was fitted
  with (pooling, token-exit settings) and the sha256 of the model's weight and tokenizer files;
  ``save_probes`` / ``load_probes``.
- ``Rule`` / ``parse_rule``: ``full``, ``layer:K``, ``max-prob:T``, ``entropy:T``, ``patience:P``.
- ``classify_ids`` (one text, stopping early), ``full_depth_ids`` (the baseline: all blocks, all
  tokens, the last-layer probe only), ``trace_ids`` (every layer, for fitting and for
  simulating rules: a rule's stop layer and prediction depend only on the layers up to it, so
  ``simulate`` over a trace equals ``classify_ids``, which the tests check).
- ``train_probes``: features on a split of the data, L2 strength and rule thresholds chosen on a
  held-out slice of it.
"""
from __future__ import annotations

import hashlib
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import MinadeptError
from .flops import full_forward_flops

PROBE_FILE = "probes.safetensors"
PROBE_JSON = "probes.json"
FORMAT_VERSION = 1
POOLINGS = ("mean", "last")
RULES = ("full", "layer", "max-prob", "entropy", "patience")
L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
MAX_DROP_POINTS = 1.0          # a rule's threshold: the cheapest whose held-out drop is within this


# ----------------------------------------------------------------------------- data

def read_tsv(path, *, need_labels: bool = True) -> tuple[list[str], list[str] | None]:
    """Texts and labels (strings) of a UTF-8 ``text<TAB>label`` file with that header line
    (``text`` alone is accepted when ``need_labels`` is False). Raises MinadeptError for a missing
    file, a missing header, a line without its label, or an empty text (naming the line)."""
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise MinadeptError(f"data file not found: {p}") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as e:
        raise MinadeptError(f"cannot read data file {p}: {e.__class__.__name__}") from None
    head = lines[0].split("\t") if lines else []
    if head == ["text", "label"]:
        has_labels = True
    elif head == ["text"] and not need_labels:
        has_labels = False
    else:
        raise MinadeptError(f"{p}: the first line must be the header 'text<TAB>label', got {lines[0][:60]!r}"
                            if lines else f"{p}: empty file (expected a 'text<TAB>label' header)")
    texts, labels = [], []
    for n, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        parts = line.split("\t")
        if has_labels and (len(parts) != 2 or not parts[1].strip()):
            raise MinadeptError(f"{p} line {n}: expected 'text<TAB>label', got {len(parts)} field(s)")
        if not has_labels and len(parts) != 1:
            raise MinadeptError(f"{p} line {n}: expected one field (text) under the header 'text'")
        if not parts[0].strip():
            raise MinadeptError(f"{p} line {n}: empty text")
        texts.append(parts[0])
        if has_labels:
            labels.append(parts[1].strip())
    if not texts:
        raise MinadeptError(f"{p}: no examples after the header")
    return texts, (labels if has_labels else None)


def encode(tokenizer, text: str, n_ctx: int, *, warn: bool = True) -> np.ndarray:
    """``<|endoftext|>`` + the text's tokens, int64 [T]; a text longer than the context is cut to
    its first n_ctx tokens (a RuntimeWarning says so). Raises MinadeptError for an empty text."""
    if not isinstance(text, str) or not text.strip():
        raise MinadeptError("empty text: nothing to classify")
    ids = [tokenizer.eot_id] + list(tokenizer.encode(text))
    if len(ids) > n_ctx:
        if warn:
            warnings.warn(f"text of {len(ids)} tokens truncated to the context of {n_ctx} (n_positions): "
                          f"{text[:40]!r}...", RuntimeWarning, stacklevel=2)
        ids = ids[:n_ctx]
    return np.asarray(ids, dtype=np.int64)


def label_indices(labels: list[str], known: list[str]) -> np.ndarray:
    """Labels as indices into ``known``; raises MinadeptError naming an unknown label."""
    pos = {l: i for i, l in enumerate(known)}
    bad = sorted({l for l in labels if l not in pos})
    if bad:
        raise MinadeptError(f"unknown label(s) {', '.join(map(repr, bad[:5]))}: the probes know {', '.join(known)}")
    return np.array([pos[l] for l in labels], dtype=np.int64)


def sorted_labels(labels: list[str]) -> list[str]:
    """The distinct labels, numerically sorted when all are integers."""
    u = set(labels)
    return sorted(u, key=int) if all(l.lstrip("-").isdigit() for l in u) else sorted(u)


# ----------------------------------------------------------------------------- the layer loop

def layer_states(engine, ids: np.ndarray, cache=None):
    """The engine's prefill of ``ids`` block by block. Yields ``(layer, h, flops)`` after each block
    1..n_layer: h [T, C] the states after it (a token that exited at k holds h_k), flops the FLOPs
    spent so far (blocks, exit checks, K/V propagation; with ``--kv-fill lazy`` only the fills that
    layers up to here needed). Stopping the iteration stops the input. Uses the engine's own block
    and exit steps, so the states equal ``Engine.forward(..., record_hidden=True).hidden``."""
    from .engine import _Pass, token_ids
    cfg, L = engine.config, engine.config.n_layer
    ids = token_ids(ids, cfg.vocab_size)
    if ids.size == 0:
        raise MinadeptError("no tokens to run")
    if cache is None:
        cache = engine.new_cache(len(ids))
    p = _Pass.start(engine, ids, cache.length, False)
    checking = engine._checking(0)
    cache.length = p.end          # the cache holds this input from the first block on
    done = 0
    for layer in engine._blocks(p, cache, 0, checking, False, False):
        done = layer
        yield layer, _states(p), _flops_so_far(engine, p, layer, checking)
    for layer in range(done + 1, L + 1):        # every token has exited: nothing runs deeper
        yield layer, _states(p), _flops_so_far(engine, p, layer, checking)


def _states(p) -> np.ndarray:
    """The pass's states [T, C], a token that exited at k holding h_k (the ``oracle`` K/V mode
    keeps running exited tokens, so their h_k comes from ``h_exit``)."""
    if not (p.oracle and p.active.size < len(p.pos)):
        return p.h
    keep = np.zeros(len(p.pos), bool)
    keep[p.active] = True
    return np.where(keep[:, None], p.h, p.h_exit)


def _flops_so_far(engine, p, layer: int, checking: bool) -> int:
    """Blocks, K/V propagation and the exit checks of blocks 1..``layer``: a token is checked after
    every block from min_exit_layer to its exit (still active: to ``layer``), never after block L."""
    checks = 0
    if checking:
        first, L = max(1, engine.policy.min_exit_layer), engine.config.n_layer
        n = np.clip(np.minimum(np.minimum(p.exit_layers, layer), L - 1) - first + 1, 0, None)
        checks = int(n.sum()) * engine.policy.check_flops(engine.config)
    return int(p.blocks_f.sum()) + int(p.prop_f) + checks


def pool(h: np.ndarray, mode: str) -> np.ndarray:
    """The feature vector of states h [T, C] of ``<|endoftext|>`` + text: ``mean`` over the text's
    tokens (position 0, the same for every text, left out) or the ``last`` token's state."""
    if mode == "last":
        return h[-1]
    return h[1:].mean(axis=0) if len(h) > 1 else h[0]


# ----------------------------------------------------------------------------- logistic regression

def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _loss_grad(theta, X, Y, l2):
    n, d = X.shape
    K = Y.shape[1]
    W, b = theta[:d * K].reshape(d, K), theta[d * K:]
    Z = X @ W + b
    Zm = Z - Z.max(axis=1, keepdims=True)
    lse = np.log(np.exp(Zm).sum(axis=1))
    loss = float((lse - (Zm * Y).sum(axis=1)).mean() + 0.5 * l2 * (W * W).sum())
    G = (_softmax(Z) - Y) / n
    gW = X.T @ G + l2 * W
    return loss, np.concatenate([gW.ravel(), G.sum(axis=0)])


def fit_logreg(X: np.ndarray, y: np.ndarray, n_classes: int, l2: float, *, max_iter: int = 300,
               tol: float = 1e-6, init=None, memory: int = 10):
    """Multinomial logistic regression: minimise mean cross-entropy + l2/2 ||W||^2 (bias not
    penalised) by L-BFGS with an Armijo backtracking line search, so the loss decreases at every
    step. X [n, d] float, y [n] int in [0, n_classes). Returns (W [d, K], b [K], losses)."""
    X = np.asarray(X, np.float64)
    n, d = X.shape
    K = int(n_classes)
    Y = np.zeros((n, K))
    Y[np.arange(n), y] = 1.0
    theta = np.zeros(d * K + K) if init is None else np.concatenate([init[0].ravel(), init[1]]).astype(np.float64)
    f, g = _loss_grad(theta, X, Y, l2)
    losses = [f]
    S, Yh = [], []
    for _ in range(max_iter):
        if np.abs(g).max() < tol:
            break
        direction = _lbfgs_direction(g, S, Yh)
        slope = g @ direction
        if slope >= 0:                                 # not a descent direction: steepest descent
            direction, slope, S, Yh = -g, -(g @ g), [], []
        new, f_new, g_new = _armijo(theta, direction, f, slope, lambda t: _loss_grad(t, X, Y, l2))
        if not f_new <= f:                             # no progress possible in float64
            break
        s, yv = new - theta, g_new - g
        if s @ yv > 1e-12:
            S.append(s)
            Yh.append(yv)
            if len(S) > memory:
                S.pop(0)
                Yh.pop(0)
        theta, g, done = new, g_new, (f - f_new) <= 1e-12 * max(1.0, abs(f))
        f = f_new
        losses.append(f)
        if done:
            break
    return theta[:d * K].reshape(d, K), theta[d * K:].copy(), np.array(losses)


def _lbfgs_direction(g: np.ndarray, S: list, Yh: list) -> np.ndarray:
    """L-BFGS's two-loop recursion: the quasi-Newton step -H g from the stored pairs (s, y)."""
    q = g.copy()
    alphas = []
    for s, yv in reversed(list(zip(S, Yh))):
        a = (s @ q) / (yv @ s)
        alphas.append(a)
        q -= a * yv
    if S:
        q *= (S[-1] @ Yh[-1]) / (Yh[-1] @ Yh[-1])
    for (s, yv), a in zip(zip(S, Yh), reversed(alphas)):
        q += s * (a - (yv @ q) / (yv @ s))
    return -q


def _armijo(theta, direction, f, slope, loss_grad):
    """Backtracking line search (Armijo, c = 1e-4): (new theta, its loss, its gradient)."""
    step = 1.0
    while True:
        new = theta + step * direction
        f_new, g_new = loss_grad(new)
        if f_new <= f + 1e-4 * step * slope or step < 1e-12:
            return new, f_new, g_new
        step *= 0.5


# ----------------------------------------------------------------------------- probes and their file

def model_hashes(model) -> dict:
    """sha256 of the model's weight files (``model*.safetensors``) and tokenizer files."""
    if model.path is None:
        raise MinadeptError("the model has no directory: cannot fingerprint it for its probes")
    names = sorted(f.name for f in Path(model.path).glob("model*.safetensors"))
    names += [n for n in ("tokenizer.json", "vocab.json", "merges.txt") if (Path(model.path) / n).exists()]
    out = {}
    for n in names:
        h = hashlib.sha256()
        with open(Path(model.path) / n, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        out[n] = h.hexdigest()
    return out


@dataclass
class Probes:
    """A linear probe per layer 1..L: p(label | x) = softmax(((x - mean) / scale) @ W + b)."""
    W: np.ndarray                     # [L, C, K] float32
    b: np.ndarray                     # [L, K]
    mean: np.ndarray                  # [L, C]
    scale: np.ndarray                 # [L, C]
    labels: list[str]
    pooling: str
    exit_settings: dict               # the EngineSettings (token exits) the features were taken with
    model_sha256: dict
    info: dict = field(default_factory=dict)    # l2 per layer, held-out accuracies, thresholds, ...

    @property
    def n_layer(self) -> int:
        return self.W.shape[0]

    def probs(self, layer: int, x: np.ndarray) -> np.ndarray:
        """Class probabilities [K] (or [N, K]) of features x [C] (or [N, C]) at ``layer`` (1-based)."""
        i = layer - 1
        z = ((x - self.mean[i]) / self.scale[i]) @ self.W[i] + self.b[i]
        z = np.atleast_2d(z).astype(np.float64)
        p = _softmax(z)
        return p[0] if np.ndim(x) == 1 else p

    def flops(self) -> int:
        """FLOPs of one probe on one feature vector (standardise + product)."""
        C, K = self.W.shape[1:]
        return 2 * C * K + 2 * C

    def thresholds(self) -> dict:
        return dict(self.info.get("thresholds", {}))


def save_probes(probes: Probes, out_dir) -> Path:
    """Write ``probes.safetensors`` (tensors; settings in its metadata) and ``probes.json`` (the
    same settings plus the fit report, for people) into ``out_dir`` (created when missing)."""
    from safetensors.numpy import save_file
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    meta = {"format_version": FORMAT_VERSION, "labels": probes.labels, "pooling": probes.pooling,
            "exit_settings": probes.exit_settings, "model_sha256": probes.model_sha256}
    save_file({"W": probes.W.astype(np.float32), "b": probes.b.astype(np.float32),
               "mean": probes.mean.astype(np.float32), "scale": probes.scale.astype(np.float32)},
              str(d / PROBE_FILE), metadata={"minadept_probes": json.dumps(meta),
                                             "info": json.dumps(probes.info)})
    (d / PROBE_FILE).chmod(0o644)
    (d / PROBE_JSON).write_text(json.dumps(dict(meta, **probes.info), indent=1) + "\n", encoding="utf-8")
    return d / PROBE_FILE


def load_probes(path, model=None) -> Probes:
    """Read probes from a directory holding ``probes.safetensors`` or the file itself. With
    ``model``, its weight and tokenizer files must have the sha256 the probes were fitted on.
    Raises MinadeptError (one line) otherwise."""
    from safetensors import SafetensorError, safe_open
    p = Path(path)
    f = p / PROBE_FILE if p.is_dir() else p
    if not f.is_file():
        raise MinadeptError(f"probe file not found: {f}")
    try:
        with safe_open(str(f), "numpy") as sf:
            meta = sf.metadata() or {}
            arrays = {k: sf.get_tensor(k) for k in ("W", "b", "mean", "scale")}
    except (SafetensorError, KeyError, OSError, ValueError) as e:
        raise MinadeptError(f"cannot read probe file {f}: {e.__class__.__name__}") from None
    if "minadept_probes" not in meta:
        raise MinadeptError(f"{f} is not a minadept probe file (no 'minadept_probes' metadata)")
    m = json.loads(meta["minadept_probes"])
    if m.get("format_version") != FORMAT_VERSION:
        raise MinadeptError(f"probe file {f} has format_version {m.get('format_version')}; this minadept reads {FORMAT_VERSION}")
    probes = Probes(W=arrays["W"], b=arrays["b"], mean=arrays["mean"], scale=arrays["scale"], labels=m["labels"],
                    pooling=m["pooling"], exit_settings=m["exit_settings"], model_sha256=m["model_sha256"],
                    info=json.loads(meta.get("info", "{}")))
    if model is not None:
        check_model(probes, model, f)
    return probes


def check_model(probes: Probes, model, where="the probes") -> None:
    """MinadeptError unless ``model``'s files are those the probes were fitted on."""
    if probes.n_layer != model.config.n_layer or probes.W.shape[1] != model.config.n_embd:
        raise MinadeptError(f"{where} were fitted on another model (n_layer {probes.n_layer}, n_embd "
                            f"{probes.W.shape[1]}; this model has {model.config.n_layer}, {model.config.n_embd})")
    have = model_hashes(model)
    if have != probes.model_sha256:
        diff = sorted(set(have) ^ set(probes.model_sha256)
                      | {k for k in have if probes.model_sha256.get(k) != have[k]})
        raise MinadeptError(f"{where} were fitted on another model: sha256 of {', '.join(diff)} differ"
                            f" from {model.path}")


# ----------------------------------------------------------------------------- stopping rules

@dataclass(frozen=True)
class Rule:
    """When to stop an input: ``full`` (last layer), ``layer`` (fixed layer K), ``max-prob`` (top
    probability > T), ``entropy`` (entropy / ln K < T, DeeBERT), ``patience`` (the last P layers'
    probes agree, PABEE). ``value`` None: the threshold calibrated with the probes."""
    kind: str
    value: float | None = None

    def __str__(self):
        if self.value is None:
            return self.kind
        return f"{self.kind}:{int(self.value) if self.kind in ('layer', 'patience') else format(self.value, 'g')}"


def parse_rule(text: str, n_layer: int | None = None) -> Rule:
    """``full``, ``layer:K``, ``max-prob[:T]``, ``entropy[:T]``, ``patience[:P]`` (no value: the
    probes' calibrated one). Raises MinadeptError for an unknown rule or a value out of range."""
    kind, _, val = str(text).strip().partition(":")
    if kind not in RULES:
        raise MinadeptError(f"unknown --stop rule {text!r} (expected full, layer:K, max-prob:T, entropy:T or patience:P)")
    if kind == "full":
        if val:
            raise MinadeptError(f"--stop full takes no value, got {text!r}")
        return Rule("full")
    if not val:
        if kind == "layer":
            raise MinadeptError("--stop layer needs a layer, e.g. layer:4")
        return Rule(kind)
    try:
        v = float(val)
    except ValueError:
        raise MinadeptError(f"--stop {kind}: not a number: {val!r}") from None
    if kind in ("layer", "patience"):
        if v != int(v):
            raise MinadeptError(f"--stop {kind} must be an integer, got {val!r}")
        top = n_layer if n_layer is not None else math.inf
        if not 1 <= v <= top:
            rng = f"1..{n_layer}" if n_layer else ">= 1"
            raise MinadeptError(f"--stop {kind} must be in {rng}, got {val}")
        return Rule(kind, int(v))
    if not 0.0 <= v <= 1.0 or math.isnan(v):
        raise MinadeptError(f"--stop {kind} threshold must be in [0, 1], got {val}")
    return Rule(kind, v)


def resolve_rule(rule: Rule, probes: Probes) -> Rule:
    """A rule with its value: the probes' calibrated threshold when none was given."""
    if rule.value is not None or rule.kind == "full":
        return rule
    t = probes.thresholds().get(rule.kind)
    if t is None:
        raise MinadeptError(f"--stop {rule.kind} needs a value: the probes have no calibrated one")
    return Rule(rule.kind, t)


def norm_entropy(p: np.ndarray) -> np.ndarray:
    """Entropy / ln K of probabilities [..., K], in [0, 1]."""
    K = p.shape[-1]
    return -(p * np.log(np.clip(p, 1e-30, None))).sum(axis=-1) / math.log(K)


def stops(rule: Rule, layer: int, n_layer: int, probs: np.ndarray, preds: list[int]) -> bool:
    """Whether ``rule`` stops the input after ``layer``; probs [K] at this layer, preds the argmax
    at layers 1..layer."""
    if layer >= n_layer:
        return True
    k = rule.kind
    if k == "full":
        return False
    if k == "layer":
        return layer >= rule.value
    if k == "max-prob":
        return bool(probs.max() > rule.value)
    if k == "entropy":
        return bool(norm_entropy(probs) < rule.value)
    P = int(rule.value)                                  # patience
    return len(preds) >= P and len(set(preds[-P:])) == 1


def simulate(rule: Rule, probs: np.ndarray):
    """A rule over traced probabilities [N, L, K]: (stop layers [N] 1..L, predictions [N])."""
    N, L, _ = probs.shape
    stop = np.full(N, L)
    preds = probs.argmax(axis=2)
    for i in range(N):
        hist = []
        for layer in range(1, L + 1):
            hist.append(int(preds[i, layer - 1]))
            if stops(rule, layer, L, probs[i, layer - 1], hist):
                stop[i] = layer
                break
    return stop, preds[np.arange(N), stop - 1]


# ----------------------------------------------------------------------------- running

@dataclass
class Result:
    """One text's classification."""
    label: int                   # index into probes.labels
    probs: np.ndarray            # [K] at the stop layer
    stop_layer: int
    flops: int                   # blocks, token-exit checks, K/V propagation, probes, up to the stop
    full_flops: int              # all blocks on all tokens + the last-layer probe
    tokens: int


def full_flops_of(config, n_tokens: int, probes: Probes) -> int:
    """The baseline's FLOPs: every block on every token and one probe."""
    return full_forward_flops(config, n_tokens, 0) + probes.flops()


def classify_ids(engine, probes: Probes, ids: np.ndarray, rule: Rule) -> Result:
    """Classify one encoded text (``encode``) with token exits from ``engine``, stopping at the
    first layer where ``rule`` says so (``rule`` must carry its value: ``resolve_rule``)."""
    L = engine.config.n_layer
    hist, probe_f = [], 0
    for layer, h, spent in layer_states(engine, ids):
        if rule.kind == "layer" and layer < rule.value:
            continue
        if rule.kind == "full" and layer < L:
            continue
        pr = probes.probs(layer, pool(h, probes.pooling))
        probe_f += probes.flops()
        hist.append(int(pr.argmax()))
        if stops(rule, layer, L, pr, hist):
            break
    return Result(label=hist[-1], probs=pr, stop_layer=layer, flops=spent + probe_f,
                  full_flops=full_flops_of(engine.config, len(ids), probes), tokens=len(ids))


def full_depth_ids(engine, probes: Probes, ids: np.ndarray) -> Result:
    """The baseline: ``engine`` must be the full-depth one (no exits); all blocks on all tokens,
    then the last-layer probe (no LM head, no checks)."""
    for layer, h, spent in layer_states(engine, ids):
        pass
    pr = probes.probs(layer, pool(h, probes.pooling))
    return Result(label=int(pr.argmax()), probs=pr, stop_layer=layer, flops=spent + probes.flops(),
                  full_flops=full_flops_of(engine.config, len(ids), probes), tokens=len(ids))


def trace_ids(engine, ids: np.ndarray, poolings=POOLINGS):
    """Every layer of one text: ({pooling: features [L, C]}, cumulative FLOPs [L] of the blocks,
    exit checks and propagation up to each layer)."""
    L, C = engine.config.n_layer, engine.config.n_embd
    feats = {m: np.empty((L, C), np.float32) for m in poolings}
    spent = np.empty(L, np.int64)
    for layer, h, f in layer_states(engine, ids):
        for m in poolings:
            feats[m][layer - 1] = pool(h, m)
        spent[layer - 1] = f
    return feats, spent


def trace_texts(engine, texts, poolings=POOLINGS, progress=None):
    """``trace_ids`` over many texts: ({pooling: [N, L, C]}, FLOPs [N, L], tokens [N], truncated)."""
    tok, n_ctx = engine.model.tokenizer, engine.config.n_positions
    feats = {m: [] for m in poolings}
    spent, n_tok, truncated = [], [], 0
    for t in texts:
        ids = encode(tok, t, n_ctx, warn=False)
        truncated += len(ids) == n_ctx and len(tok.encode(t)) + 1 > n_ctx
        f, s = trace_ids(engine, ids, poolings)
        for m in poolings:
            feats[m].append(f[m])
        spent.append(s)
        n_tok.append(len(ids))
        if progress is not None:
            progress(1)
    return {m: np.stack(v) for m, v in feats.items()}, np.stack(spent), np.array(n_tok), truncated


def probe_probs(probes: Probes, feats: np.ndarray) -> np.ndarray:
    """Probabilities [N, L, K] of traced features [N, L, C]."""
    return np.stack([probes.probs(l, feats[:, l - 1]) for l in range(1, probes.n_layer + 1)], axis=1)


def rule_flops(rule: Rule, stop: np.ndarray, spent: np.ndarray, probes: Probes) -> np.ndarray:
    """FLOPs [N] of stopping at ``stop`` [N] given traced cumulative FLOPs [N, L]: the model's up
    to the stop layer plus the probes the rule evaluated."""
    n_probes = stop if rule.kind not in ("full", "layer") else np.ones_like(stop)
    return spent[np.arange(len(stop)), stop - 1] + n_probes * probes.flops()


# ----------------------------------------------------------------------------- fitting

def threshold_grid(kind: str, n_layer: int, n_classes: int) -> list:
    if kind in ("layer", "patience"):
        return list(range(1, n_layer + 1))
    if kind == "max-prob":
        lo = 1.0 / n_classes
        return sorted({round(float(x), 4) for x in np.concatenate([np.linspace(lo, 0.95, 15), [0.97, 0.98, 0.99, 0.995, 0.999]])})
    return sorted({round(float(x), 4) for x in np.concatenate([[0.001, 0.005, 0.01, 0.02, 0.05], np.linspace(0.1, 0.9, 9), [0.95, 0.98, 0.99]])})


def choose_thresholds(probs: np.ndarray, y: np.ndarray, spent: np.ndarray, probes: Probes,
                      max_drop: float = MAX_DROP_POINTS) -> dict:
    """Per rule kind, the cheapest value (mean FLOPs on this data) whose accuracy is within
    ``max_drop`` points of the last-layer probe's; and the sweep behind it."""
    L = probs.shape[1]
    full_acc = 100 * float((probs[:, -1].argmax(1) == y).mean())
    full_cost = float(rule_flops(Rule("full"), np.full(len(y), L), spent, probes).mean())
    out, sweep = {}, {}
    for kind in ("layer", "max-prob", "entropy", "patience"):
        rows = []
        for v in threshold_grid(kind, L, probs.shape[2]):
            r = Rule(kind, v)
            stop, pred = simulate(r, probs)
            rows.append({"value": v, "acc": 100 * float((pred == y).mean()), "mean_stop_layer": float(stop.mean()),
                         "compute_fraction": float(rule_flops(r, stop, spent, probes).mean()) / full_cost})
        ok = [r for r in rows if full_acc - r["acc"] <= max_drop]
        out[kind] = min(ok, key=lambda r: (r["compute_fraction"], -r["acc"]))["value"] if ok else None
        sweep[kind] = rows
    return {"thresholds": out, "full_acc": full_acc, "sweep": sweep}


def _standardise(X: np.ndarray):
    mu = X.mean(axis=0)
    sd = X.std(axis=0) + 1e-6
    return mu, sd


def fit_layer_probes(feats: np.ndarray, y: np.ndarray, n_classes: int, fit_idx, ho_idx, l2_grid=L2_GRID):
    """Per layer: standardise on the fit slice, fit each L2 strength (strongest first, warm
    start), keep the one with the best held-out accuracy (then log-loss). feats [N, L, C].
    Returns (W, b, mean, scale, chosen l2 [L], held-out accuracy [L])."""
    N, L, C = feats.shape
    W = np.zeros((L, C, n_classes), np.float32)
    B = np.zeros((L, n_classes), np.float32)
    MU = np.zeros((L, C), np.float32)
    SD = np.ones((L, C), np.float32)
    l2s, accs = [], []
    for l in range(L):
        mu, sd = _standardise(feats[fit_idx, l].astype(np.float64))
        Xf = (feats[fit_idx, l] - mu) / sd
        Xh = (feats[ho_idx, l] - mu) / sd
        best, init = None, None
        for l2 in sorted(l2_grid, reverse=True):
            w, b, _ = fit_logreg(Xf, y[fit_idx], n_classes, l2, init=init)
            init = (w, b)
            p = _softmax(Xh @ w + b)
            acc = float((p.argmax(1) == y[ho_idx]).mean())
            nll = float(-np.log(np.clip(p[np.arange(len(ho_idx)), y[ho_idx]], 1e-30, None)).mean())
            if best is None or (acc, -nll) > (best[0], -best[1]):
                best = (acc, nll, l2, w, b)
        W[l], B[l], MU[l], SD[l] = best[3], best[4], mu, sd
        l2s.append(best[2])
        accs.append(100 * best[0])
    return W, B, MU, SD, l2s, accs


def split_indices(n: int, holdout: float, seed: int):
    """(fit, held-out) index arrays: a seeded shuffle, ``holdout`` of it held out (at least 1)."""
    if not 0 < holdout < 1:
        raise MinadeptError(f"--holdout must be in (0, 1), got {holdout}")
    perm = np.random.default_rng(seed).permutation(n)
    k = max(1, int(round(holdout * n)))
    if n - k < 2:
        raise MinadeptError(f"too few examples ({n}) to hold out {holdout:.0%} and fit")
    return np.sort(perm[k:]), np.sort(perm[:k])


def train_probes(model, engine, settings_dict: dict, texts, labels, *, pooling: str = "auto",
                 holdout: float = 0.2, seed: int = 0, progress=None, traced=None):
    """Fit probes for ``model`` with ``engine``'s token exits (``settings_dict`` records them).
    ``pooling``: mean, last, or auto (both fitted, the better mean held-out accuracy over layers
    kept). ``traced``: a ``trace_texts`` result to reuse. Returns ``Probes``; ``info`` holds the
    L2 strengths, held-out accuracies of both poolings and the calibrated rule thresholds."""
    if pooling not in POOLINGS + ("auto",):
        raise MinadeptError(f"unknown --pool {pooling!r} (expected mean, last or auto)")
    known = sorted_labels(labels)
    if len(known) < 2:
        raise MinadeptError(f"need at least 2 labels to fit a classifier, got {known}")
    y = label_indices(labels, known)
    fit_idx, ho_idx = split_indices(len(texts), holdout, seed)
    poolings = POOLINGS if pooling == "auto" else (pooling,)
    feats, spent, n_tok, truncated = traced or trace_texts(engine, texts, poolings, progress)
    fitted = {m: fit_layer_probes(feats[m], y, len(known), fit_idx, ho_idx) for m in poolings}
    mean_acc = {m: float(np.mean(f[5])) for m, f in fitted.items()}
    chosen = max(poolings, key=lambda m: (mean_acc[m], m == "mean"))
    W, B, MU, SD, l2s, accs = fitted[chosen]
    probes = Probes(W=W, b=B, mean=MU, scale=SD, labels=known, pooling=chosen, exit_settings=settings_dict,
                    model_sha256=model_hashes(model))
    ho_probs = probe_probs(probes, feats[chosen][ho_idx])
    sel = choose_thresholds(ho_probs, y[ho_idx], spent[ho_idx], probes)
    probes.info = {"n_examples": len(texts), "n_fit": len(fit_idx), "n_heldout": len(ho_idx), "seed": seed,
                   "holdout": holdout, "truncated": int(truncated), "l2": l2s,
                   "heldout_acc": {m: [round(a, 2) for a in f[5]] for m, f in fitted.items()},
                   "heldout_mean_acc": {m: round(a, 2) for m, a in mean_acc.items()},
                   "pooling_choice": "auto" if pooling == "auto" else "given",
                   "thresholds": sel["thresholds"], "heldout_full_acc": round(sel["full_acc"], 2),
                   "max_drop_points": MAX_DROP_POINTS}
    return probes


# ----------------------------------------------------------------------------- command line

DEFAULT_PROBES = "sentiment"          # the probes shipped beside the embedded model


def _engine_settings(args, probes: Probes | None = None):
    """The token-exit settings: the policy flags given, else those the probes were fitted with."""
    from .settings import EngineSettings
    given = EngineSettings.from_args(args)
    flags = {k for k in EngineSettings.__dataclass_fields__ if getattr(args, k, None) is not None}
    if probes is not None and not flags:
        known = {k: v for k, v in probes.exit_settings.items() if k in EngineSettings.__dataclass_fields__}
        given = EngineSettings(**known)
    given.check()
    return given

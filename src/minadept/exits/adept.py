"""ADEPT's learned pieces as data: hidden-state mappers and the exit policy's weights.

Written by ``minadept calibrate`` (``exits/calibrate.py``) to ``adept.safetensors`` in the model
directory and read back here. With C = n_embd, L = n_layer, exit layers k = 1..L-1 (index k-1):

* exit mapper ("Jump to Conclusions"): ``h_L ~ h_k @ exit_w[k-1] + exit_b[k-1]``, the exit
  prediction is then ``ln_f`` and the LM head as usual;
* K/V mappers, low rank, one per (exit layer k, skipped block l) with k+2 <= l <= L: the
  LayerNorm-normalised residual stream entering block l of a token that exited at k is
  ``n_k + (n_k @ kv_u[p]) @ kv_v[p] + kv_c[p]`` with n_k = normalize(h_k) and p = ``pair_index``;
  ``ln_1``'s affine, then the K/V columns of ``c_attn``, follow (``propagate_kv_mapped``; the
  engine folds all three into one matrix per exit layer, ``propagate.StackedKV``). Block
  k+1 reads h_k itself. Measured on the embedded model: the K/V of skipped layers copied
  from h_k are far off at the last layers (relative error 0.4-1.0 at block 12), and a rank-24 map
  cuts that 3-5x; reduced-rank ridge regression keeps the parameters within budget;
* exit policy: ``P(Exit | s) = sigmoid(features(s) @ policy_w[k-1] + policy_b[k-1])`` with the
  features of ``policy_features`` (no LM-head product), Bradley-Terry / logistic regression on
  preferences from the reward T - W C (paper section 3; eq. lambda T - beta C with W = beta/lambda);
* ``threshold``: the calibrated default tau (exit when P(Exit) > tau).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import backend
from ..errors import MinadeptError
from ..reference import normalize

ADEPT_FILE = "adept.safetensors"
FORMAT_VERSION = "1"


TENSORS = ("exit_w", "exit_b", "kv_u", "kv_v", "kv_c", "policy_w", "policy_b")


def pair_index(k: int, block: int, n_layer: int) -> int:
    """Row of the K/V mapper of (exit layer k, skipped block ``block``), 1 <= k, k+2 <= block <=
    n_layer (block k+1 reads h_k itself), in the order k = 1, block = 3..L; k = 2, block = 4..L; ..."""
    before = sum(n_layer - 1 - j for j in range(1, k))      # pairs of exit layers 1..k-1
    return before + (block - k - 2)


def n_pairs(n_layer: int) -> int:
    return (n_layer - 1) * (n_layer - 2) // 2


def policy_features(h: np.ndarray, h_prev: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    """Exit-policy features of states after block k: h [A, C], h_prev [A, C] (after block k-1)
    -> [A, C + 2] float32: the LayerNorm-normalised h_k, log of its standard deviation, and the
    cosine of h_k with h_{k-1} (CALM's saturation). About 10 C FLOPs per token."""
    mu = h.mean(axis=-1, keepdims=True)
    d = h - mu
    var = (d * d).mean(axis=-1, keepdims=True)
    sd = np.sqrt(var + eps)
    num = np.einsum("ij,ij->i", h, h_prev)
    den = np.linalg.norm(h, axis=-1) * np.linalg.norm(h_prev, axis=-1)
    cos = num / np.maximum(den, 1e-12)
    return np.concatenate([d / sd, np.log(sd), cos[:, None]], axis=-1).astype(np.float32)


@dataclass(frozen=True)
class AdeptParams:
    """Calibrated mappers and policy for one model (shapes in the module docstring)."""
    exit_w: np.ndarray          # [L-1, C, C] float32
    exit_b: np.ndarray          # [L-1, C]
    kv_u: np.ndarray            # [P, C, r]  P = (L-1)(L-2)/2 pairs, rank r
    kv_v: np.ndarray            # [P, r, C]
    kv_c: np.ndarray            # [P, C]
    policy_w: np.ndarray        # [L-1, C+2]
    policy_b: np.ndarray        # [L-1]
    threshold: float
    info: dict = field(default_factory=dict)   # settings and fit statistics (JSON-able)

    @property
    def n_params(self) -> int:
        """Stored learned parameters (mappers + policy)."""
        return int(sum(getattr(self, n).size for n in TENSORS))

    def mapper_flops(self) -> tuple[int, int]:
        """(FLOPs of one exit-map application per token, extra FLOPs per token per propagated
        layer): 2 C^2 and 0 -- the K/V maps are linear, so the engine folds them into the
        propagation weights (``propagate.StackedKV``) and a propagated layer costs its 4 C^2
        either way (see ``flops.py`` for the conventions)."""
        C = self.exit_w.shape[1]
        return 2 * C * C, 0

    def exit_map(self, k: int, h: np.ndarray) -> np.ndarray:
        """h_k [N, C] -> estimate of h_L [N, C]."""
        return h @ self.exit_w[k - 1] + self.exit_b[k - 1]

    def kv_map(self, k: int, h: np.ndarray) -> np.ndarray:
        """h_k [N, C] -> estimated (normalised) inputs [L-k, N, C] of blocks k+1..L (block k+1
        reads h_k itself)."""
        n = normalize(h, 1e-5)                                             # [N, C]
        L = self.exit_w.shape[0] + 1
        out = np.empty((L - k, len(h), h.shape[1]), np.float32)
        out[0] = n
        if L - k > 1:
            p = [pair_index(k, blk, L) for blk in range(k + 2, L + 1)]
            corr = np.matmul(np.matmul(n[None], self.kv_u[p]), self.kv_v[p])     # [L-k-1, N, C]
            out[1:] = n[None] + corr + self.kv_c[p][:, None, :]
        return out

    def logit(self, k: int, h: np.ndarray, h_prev: np.ndarray) -> np.ndarray:
        """The policy's logit [A] float64 of the states after block k (h, h_prev [A, C]):
        ``policy_features(h, h_prev) @ w + b``, from the Cython kernel on the fast backend (decode
        calls this at every layer), else from ``adept_logit_numpy``."""
        return backend.adept_logit(h, h_prev, self.policy_w[k - 1], float(self.policy_b[k - 1]))

    def score(self, k: int, h: np.ndarray, h_prev: np.ndarray) -> np.ndarray:
        """P(Exit) [A] float64 of the states after block k: sigmoid of ``logit``."""
        return 1.0 / (1.0 + np.exp(-self.logit(k, h, h_prev)))


def adept_logit_numpy(h: np.ndarray, h_prev: np.ndarray, w: np.ndarray, b: float,
                      eps: float = 1e-5) -> np.ndarray:
    """The policy's logit ``policy_features(h, h_prev) @ w + b`` [A] float64 without building the
    feature matrix (NumPy twin of the ``adept_logit`` kernel). h, h_prev [A, C]; w [C + 2]."""
    C = h.shape[1]
    h64, p64 = h.astype(np.float64), h_prev.astype(np.float64)
    d = h64 - h64.mean(axis=-1, keepdims=True)
    sd = np.sqrt((d * d).mean(axis=-1) + eps)                              # [A]
    nh, npv = np.linalg.norm(h64, axis=-1), np.linalg.norm(p64, axis=-1)
    cos = np.where((nh > 0) & (npv > 0), np.einsum("ij,ij->i", h64, p64) / np.maximum(nh * npv, 1e-300), 0.0)
    return (d @ w[:C]) / sd + np.log(sd) * w[C] + cos * w[C + 1] + b


def adept_engine(model, policy, params: AdeptParams, *, exit_map: bool = True, kv_map: bool = True, **kw):
    """An ``Engine`` running ``policy`` with the learned exit and K/V maps of ``params`` (each
    switchable to the identity) and their FLOPs in the accounting; ``kw`` go to ``Engine``."""
    from ..engine import Engine
    return Engine(model, policy, exit_mapper=params.exit_map if exit_map else None,
                  kv_maps=params if kv_map else None, mapper_flops=params.mapper_flops(), **kw)


def save_adept(params: AdeptParams, path) -> None:
    """Write ``params`` as safetensors (float32 tensors; threshold, format version and the info
    dict in the metadata)."""
    from safetensors.numpy import save_file
    tensors = {name: np.ascontiguousarray(getattr(params, name), dtype=np.float32) for name in TENSORS}
    meta = {"format_version": FORMAT_VERSION, "threshold": repr(float(params.threshold)),
            "info": json.dumps(params.info, sort_keys=True)}
    save_file(tensors, str(path), metadata=meta)
    Path(path).chmod(0o644)                      # safetensors creates the file owner-only


def load_adept(path, config) -> AdeptParams:
    """Read an ``adept.safetensors`` written for a model with ``config``.

    ``path`` is the file or a directory holding ``adept.safetensors``. Raises MinadeptError if the
    file is missing or unreadable, is not an ADEPT file or has another format version, lacks a
    tensor, or a tensor's shape (naming both shapes), dtype or values (NaN/inf) or the threshold
    (outside [0, 1]) is wrong.
    """
    import os

    from ..config import GPT2Config
    if not isinstance(path, (str, os.PathLike)) or os.fspath(path) == "":
        raise MinadeptError(f"ADEPT policy path must be a file or directory path (str or os.PathLike), "
                            f"got {type(path).__name__} {path!r}")
    if not isinstance(config, GPT2Config):
        raise MinadeptError(f"config must be a GPT2Config (model.config), got {type(config).__name__}")
    p = Path(path)
    if p.is_dir():
        p = p / ADEPT_FILE
    if not p.is_file():
        raise MinadeptError(f"no calibrated ADEPT policy at {p} (run: minadept calibrate --text FILE)")
    meta, tensors = _read_adept_file(p)
    want = _check_adept_tensors(p, tensors, config)
    try:
        tau = float(meta["threshold"])
        info = json.loads(meta.get("info", "{}"))
    except (KeyError, ValueError):
        raise MinadeptError(f"{p}: bad metadata (threshold/info)") from None
    if not 0.0 <= tau <= 1.0:
        raise MinadeptError(f"{p}: stored threshold {tau} is not in [0, 1]")
    return AdeptParams(**{k: np.ascontiguousarray(tensors[k], dtype=np.float32) for k in want},
                       threshold=tau, info=info)


def _read_adept_file(p: Path) -> tuple[dict, dict]:
    """(metadata, tensors) of an ADEPT file, its format version checked."""
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(str(p), framework="numpy") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError):
        hint = (f" (pass {ADEPT_FILE} or its directory, not the .json written beside it)" if p.suffix == ".json"
                else f" (expected {ADEPT_FILE} from minadept calibrate)")
        raise MinadeptError(f"cannot read ADEPT policy file {p}: not a safetensors file{hint}") from None
    if "format_version" not in meta or "exit_w" not in tensors:
        raise MinadeptError(f"{p} is not an ADEPT policy file (written by minadept calibrate)")
    if meta.get("format_version") != FORMAT_VERSION:
        raise MinadeptError(f"{p}: ADEPT file format version {meta.get('format_version')!r}, "
                            f"expected {FORMAT_VERSION!r}")
    return meta, tensors


def _check_adept_tensors(p: Path, tensors: dict, config) -> dict:
    """Every tensor present, with the shape this model needs, a float dtype and finite values;
    returns the expected shapes by name."""
    L, C, P = config.n_layer, config.n_embd, n_pairs(config.n_layer)
    r = tensors["kv_u"].shape[-1] if "kv_u" in tensors and tensors["kv_u"].ndim == 3 else "r"
    want = {"exit_w": (L - 1, C, C), "exit_b": (L - 1, C), "kv_u": (P, C, r), "kv_v": (P, r, C),
            "kv_c": (P, C), "policy_w": (L - 1, C + 2), "policy_b": (L - 1,)}
    for name, shape in want.items():
        if name not in tensors:
            raise MinadeptError(f"{p}: missing tensor {name!r}")
        if tuple(tensors[name].shape) != shape:
            raise MinadeptError(f"{p}: tensor {name!r} has shape {tuple(tensors[name].shape)}, but this "
                                f"model (n_layer {L}, n_embd {C}) needs {shape}")
        if not np.issubdtype(tensors[name].dtype, np.floating):
            raise MinadeptError(f"{p}: tensor {name!r} has dtype {tensors[name].dtype}, expected float")
        if not np.isfinite(tensors[name]).all():
            raise MinadeptError(f"{p}: tensor {name!r} has NaN or infinite values")
    return want

"""GPT-2's math as small pure functions over float32 NumPy arrays (after picoGPT).

Shapes: T tokens, C = n_embd, H = n_head, D = head_dim = C / H, S cached positions.
Conv1D weights are kept as HF stores them, ``[in, out]``, so a linear layer is ``x @ w + b``.
"""
from __future__ import annotations

import numpy as np

from . import backend

_SQRT_2_OVER_PI = np.float32(np.sqrt(2.0 / np.pi))
_INV_SQRT_2 = np.float32(1.0 / np.sqrt(2.0))


#: Row limit for the softmax-top-2 kernel (exit checks of a few tokens).
FAST_MAX_ROWS = 8


def layer_norm(x: np.ndarray, g: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    """LayerNorm over the last axis: ``(x - mean) / sqrt(var + eps) * g + b`` (biased variance,
    as torch.nn.LayerNorm). x [..., C] float32, g/b [C] -> [..., C] float32."""
    K = backend.kernels()
    if K is not None and x.ndim == 2 and x.flags.c_contiguous:   # measured 2.5x NumPy at [128, 768]
        return K.layer_norm(x, g, b, eps)
    return layer_norm_numpy(x, g, b, eps)


def layer_norm_numpy(x, g, b, eps):
    """NumPy twin of the fast ``layer_norm`` kernel."""
    y = normalize(x, eps)
    y *= g
    y += b
    return y


def normalize(x: np.ndarray, eps: float) -> np.ndarray:
    """The affine-free part of LayerNorm. x [..., C] -> [..., C], zero mean, unit variance."""
    xc = x - x.mean(axis=-1, keepdims=True)
    var = np.mean(np.square(xc), axis=-1, keepdims=True)
    var += np.float32(eps)
    xc /= np.sqrt(var, out=var)
    return xc


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """GELU, tanh approximation (HF ``gelu_new`` / ``gelu_pytorch_tanh`` / ``gelu_fast``)."""
    K = backend.kernels()
    if K is not None and x.ndim == 2 and x.flags.c_contiguous:     # vectorised: 2x NumPy at any size
        return K.gelu_tanh(x)
    return gelu_tanh_numpy(x)


def gelu_tanh_numpy(x: np.ndarray) -> np.ndarray:
    """NumPy twin of the fast ``gelu_tanh`` kernel:
    ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``, computed in place in one buffer."""
    y = x * x
    y *= x
    y *= np.float32(0.044715)
    y += x
    y *= _SQRT_2_OVER_PI
    np.tanh(y, out=y)
    y += np.float32(1.0)
    y *= x
    y *= np.float32(0.5)
    return y


def erf(x: np.ndarray) -> np.ndarray:
    """Error function for float32 arrays (NumPy has none; SciPy is not a dependency).

    Abramowitz & Stegun 7.1.26 (max absolute error 1.5e-7, float32 round-off level),
    evaluated in float64 and returned as float32.
    """
    x64 = np.asarray(x, dtype=np.float64)
    s = np.sign(x64)
    a = np.abs(x64)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return (s * (1.0 - poly * np.exp(-a * a))).astype(np.float32)


def gelu_erf(x: np.ndarray) -> np.ndarray:
    """GELU, exact form ``0.5 x (1 + erf(x / sqrt 2))`` (HF ``gelu``)."""
    return 0.5 * x * (1.0 + erf(x * _INV_SQRT_2))


GELU = {"tanh": gelu_tanh, "erf": gelu_erf}


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax; rows that are all -inf are not allowed (causal rows never are)."""
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def split_heads(x: np.ndarray, n_head: int) -> np.ndarray:
    """[T, C] -> [H, T, D]."""
    T, C = x.shape
    return x.reshape(T, n_head, C // n_head).transpose(1, 0, 2)


def merge_heads(x: np.ndarray) -> np.ndarray:
    """[H, T, D] -> [T, C]."""
    H, T, D = x.shape
    return x.transpose(1, 0, 2).reshape(T, H * D)


#: Up to this many queries the fused kernel runs attention (decode, small active sets); above it
#: BLAS matrix products win, with the fast backend's ``causal_softmax`` between them.
FAST_ATTENTION_MAX_QUERIES = 8


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, q_pos: np.ndarray) -> np.ndarray:
    """Causal scaled dot-product attention of queries against cached keys/values.

    q [H, T, D] at absolute positions ``q_pos`` [T] (int); k, v [H, S, D] for positions 0..S-1.
    Query t sees keys at positions <= q_pos[t]. Returns [H, T, D] float32.
    """
    K = backend.kernels()
    if K is None or q.shape[1] == 0:
        return attention_numpy(q, k, v, q_pos)
    q_pos = np.ascontiguousarray(q_pos, dtype=np.int64)
    if q.shape[1] <= FAST_ATTENTION_MAX_QUERIES:
        return K.attention(q, k, v, q_pos)
    scores = q @ k.transpose(0, 2, 1)                                       # [H, T, S]
    return K.causal_softmax(scores, q_pos, 1.0 / np.sqrt(q.shape[-1])) @ v


def attention_numpy(q: np.ndarray, k: np.ndarray, v: np.ndarray, q_pos: np.ndarray,
                    dtype=np.float32) -> np.ndarray:
    """NumPy twin of the fast ``attention`` kernel (BLAS products, masked softmax).

    ``dtype=np.float64`` evaluates it in double precision (the kernel accumulates in double; the
    property tests compare it with this form), returning float32 either way."""
    if q.shape[1] == 0:
        return np.zeros(q.shape, np.float32)
    if dtype is not np.float32:
        q, k, v = q.astype(dtype), k.astype(dtype), v.astype(dtype)
    p = causal_softmax_numpy(q @ k.transpose(0, 2, 1), q_pos, 1.0 / np.sqrt(q.shape[-1]))
    return (p @ v).astype(np.float32, copy=False)                        # [H, T, D]


def causal_softmax_numpy(scores: np.ndarray, q_pos: np.ndarray, scale: float) -> np.ndarray:
    """NumPy twin of the fast ``causal_softmax`` kernel: raw scores q.k [H, T, S] -> softmax of
    ``scale * scores`` over keys s <= q_pos[t] per (head, query t), 0 for later keys. Computed in
    the dtype of ``scores``."""
    dtype = scores.dtype.type
    scores = scores * dtype(scale)
    S = scores.shape[-1]
    if S > 1 and (scores.shape[1] > 1 or q_pos[0] < S - 1):
        future = np.arange(S)[None, :] > q_pos[:, None]                    # [T, S]
        scores = np.where(future[None], dtype(-np.inf), scores)
    return softmax(scores)


def linear(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """x [T, in] @ w [in, out] + b [out] -> [T, out]."""
    y = x @ w
    y += b
    return y


def mlp(x: np.ndarray, c_fc_w, c_fc_b, c_proj_w, c_proj_b, gelu: str) -> np.ndarray:
    """GPT-2 MLP: ``c_proj(gelu(c_fc(x)))``. x [T, C] -> [T, 4C] -> [T, C]."""
    return linear(GELU[gelu](linear(x, c_fc_w, c_fc_b)), c_proj_w, c_proj_b)

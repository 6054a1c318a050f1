"""GPT-2 in plain NumPy, after picoGPT: small pure functions over float32 arrays and one
``forward``. This is the reference the engine, the compiled kernels and other implementations are
checked against; it never consults the backend.

Shapes: T tokens, C = n_embd, H = n_head, D = head_dim = C / H, S attended positions,
V = vocab_size. Conv1D weights are kept as HF stores them, ``[in, out]``, so a linear layer is
``x @ w + b``.
"""
from __future__ import annotations

import numpy as np

from .errors import MinadeptError
from .tokenizer import token_ids

_SQRT_2_OVER_PI = np.float32(np.sqrt(2.0 / np.pi))
_INV_SQRT_2 = np.float32(1.0 / np.sqrt(2.0))


def normalize(x: np.ndarray, eps: float) -> np.ndarray:
    """The affine-free part of LayerNorm: x [..., C] -> [..., C], zero mean, unit variance
    (biased variance, as torch.nn.LayerNorm)."""
    xc = x - x.mean(axis=-1, keepdims=True)
    var = np.mean(np.square(xc), axis=-1, keepdims=True)
    var += np.float32(eps)
    xc /= np.sqrt(var, out=var)
    return xc


def layer_norm(x: np.ndarray, g: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    """LayerNorm over the last axis: ``normalize(x) * g + b``. x [..., C], g/b [C] -> [..., C]."""
    y = normalize(x, eps)
    y *= g
    y += b
    return y


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """GELU, tanh form (HF ``gelu_new``, GPT-2's): ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``,
    computed in one buffer."""
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
    """Error function for float32 arrays (NumPy has none): Abramowitz & Stegun 7.1.26, max
    absolute error 1.5e-7 (float32 round-off level), evaluated in float64, returned as float32."""
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


def causal_softmax(scores: np.ndarray, q_pos: np.ndarray, scale: float) -> np.ndarray:
    """Raw scores q.k [H, T, S] -> softmax of ``scale * scores`` over the keys s <= q_pos[t] of
    each (head, query t), 0 for later keys. Computed in the dtype of ``scores``."""
    dtype = scores.dtype.type
    scores = scores * dtype(scale)
    S = scores.shape[-1]
    if S > 1 and (scores.shape[1] > 1 or q_pos[0] < S - 1):
        future = np.arange(S)[None, :] > q_pos[:, None]                    # [T, S]
        scores = np.where(future[None], dtype(-np.inf), scores)
    return softmax(scores)


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, q_pos: np.ndarray,
              dtype=np.float32) -> np.ndarray:
    """Causal scaled dot-product attention of queries q [H, T, D] at absolute positions ``q_pos``
    [T] against keys/values k, v [H, S, D] of positions 0..S-1: query t sees keys <= q_pos[t].
    Returns [H, T, D] float32; ``dtype=np.float64`` evaluates in double precision."""
    if q.shape[1] == 0:
        return np.zeros(q.shape, np.float32)
    if dtype is not np.float32:
        q, k, v = q.astype(dtype), k.astype(dtype), v.astype(dtype)
    p = causal_softmax(q @ k.transpose(0, 2, 1), q_pos, 1.0 / np.sqrt(q.shape[-1]))   # [H, T, S]
    return (p @ v).astype(np.float32, copy=False)


def linear(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """x [T, in] @ w [in, out] + b [out] -> [T, out]."""
    y = x @ w
    y += b
    return y


def mlp(x: np.ndarray, c_fc_w, c_fc_b, c_proj_w, c_proj_b, gelu: str) -> np.ndarray:
    """GPT-2 MLP: ``c_proj(gelu(c_fc(x)))``. x [T, C] -> [T, 4C] -> [T, C]."""
    return linear(GELU[gelu](linear(x, c_fc_w, c_fc_b)), c_proj_w, c_proj_b)


def block(blk, x: np.ndarray, config) -> np.ndarray:
    """One transformer block over a whole sequence (no cache): x [T, C] -> [T, C].
    ``blk`` holds ``h.<i>``'s weights (``checkpoint.Block``)."""
    a = layer_norm(x, blk.ln_1_g, blk.ln_1_b, config.layer_norm_epsilon)
    qkv = linear(a, blk.c_attn_w, blk.c_attn_b)                                     # [T, 3C]
    q, k, v = (split_heads(t, config.n_head) for t in np.split(qkv, 3, axis=-1))  # [H, T, D] each
    o = merge_heads(attention(q, k, v, np.arange(len(x))))                         # [T, C]
    x = x + linear(o, blk.attn_c_proj_w, blk.attn_c_proj_b)
    a = layer_norm(x, blk.ln_2_g, blk.ln_2_b, config.layer_norm_epsilon)
    return x + mlp(a, blk.c_fc_w, blk.c_fc_b, blk.mlp_c_proj_w, blk.mlp_c_proj_b, config.gelu)


def forward(model, ids) -> np.ndarray:
    """The plain GPT-2 forward: token ids [T] -> logits [T, V] float32 (``model`` as
    ``Model.load`` returns it). Matches transformers' GPT2LMHeadModel. Raises MinadeptError for
    ids that are not integers in [0, vocab_size) or more than n_positions of them."""
    p, cfg = model.params, model.config
    ids = token_ids(ids, cfg.vocab_size)
    if not 1 <= len(ids) <= cfg.n_positions:
        raise MinadeptError(f"reference.forward takes 1 to {cfg.n_positions} (n_positions) tokens, got {len(ids)}")
    x = p.wte[ids] + p.wpe[np.arange(len(ids))]                                    # [T, C]
    for blk in p.h:
        x = block(blk, x, cfg)
    x = layer_norm(x, p.ln_f_g, p.ln_f_b, cfg.layer_norm_epsilon)
    return x @ model.lm_head_t                      # lm_head [V, C] (tied to wte) as [C, V]: [T, V]

"""A loaded GPT-2 (config, weights, tokenizer) and its per-block forward pieces."""
from __future__ import annotations

from dataclasses import dataclass, fields
from functools import cached_property
from pathlib import Path

import numpy as np

from . import backend, halfprec
from . import reference as R
from .checkpoint import Block, Params, load_params, resolve_model
from .config import GPT2Config
from .errors import MinadeptError
from .tokenizer import Tokenizer


#: Models with more float32 weights than this (bytes) split their decode products over threads.
DECODE_SPLIT_MODEL_BYTES = backend.SMALL_MODEL_BYTES


@dataclass
class Model:
    """A GPT-2 ready to run: ``config``, ``params`` (float32, or with half-precision matrices),
    ``tokenizer``, where it came from and ``dtype``, the type its matrices were rounded to
    ("float32": none; see ``halfprec``)."""
    config: GPT2Config
    params: Params
    tokenizer: Tokenizer | None = None
    path: Path | None = None
    dtype: str = "float32"

    @classmethod
    def load(cls, source=None, *, tokenizer: bool = True, dtype: str = "float32") -> "Model":
        """Load from a directory, a Hugging Face id, or (None) the embedded default model.

        ``dtype`` "float16" or "bfloat16" rounds the blocks' four matrices and the LM head to
        that type, kept so in memory on the fast backend (no float32 copy of them), upcast once on
        the NumPy backend (``halfprec``); everything else stays float32.

        Raises MinadeptError for a missing directory, missing/corrupt files, shape mismatches, an
        unknown dtype or weights beyond its range (naming the tensor).
        """
        import os

        from .errors import MinadeptError
        if source is not None and (not isinstance(source, (str, os.PathLike)) or os.fspath(source) == ""):
            raise MinadeptError(f"model source must be a directory path or a Hugging Face id (str or os.PathLike) "
                                f"or None for the embedded model, got {type(source).__name__} {source!r}")
        if not isinstance(tokenizer, (bool, np.bool_)):
            raise MinadeptError(f"tokenizer must be a bool, got {type(tokenizer).__name__} {tokenizer!r}")
        halfprec.check_dtype(dtype)
        path = resolve_model(source)
        config = GPT2Config.from_json(path / "config.json")
        tok = Tokenizer.from_dir(path) if tokenizer else None
        params = load_params(path, config, dtype, keep_half=backend.kernels() is not None)
        return cls(config=config, params=params, tokenizer=tok, path=path, dtype=dtype)

    @property
    def n_params(self) -> int:
        """Number of weights (a tied ``lm_head`` counted once, as HF's ``num_parameters``)."""
        p = self.params
        n = p.wte.size + p.wpe.size + p.ln_f_g.size + p.ln_f_b.size
        n += sum(a.size for b in p.h for a in vars(b).values())
        return int(n + (0 if p.lm_head is p.wte else p.lm_head.size))

    def with_dtype(self, dtype: str, keep_half: bool | None = None) -> "Model":
        """A copy of this float32 model with its matrices rounded to ``dtype`` as ``load`` does:
        held in half precision when ``keep_half`` (default: on the fast backend), else upcast
        again (the NumPy backend's form). Raises MinadeptError for a model already rounded or a
        weight beyond the type's range."""
        from .checkpoint import round_params
        if self.dtype != "float32":
            raise MinadeptError(f"with_dtype needs a float32 model, this one is {self.dtype}")
        keep = backend.kernels() is not None if keep_half is None else bool(keep_half)
        params = round_params(self.params, halfprec.check_dtype(dtype), keep) if dtype != "float32" else self.params
        return Model(config=self.config, params=params, tokenizer=self.tokenizer, path=self.path, dtype=dtype)

    @property
    def keeps_half(self) -> bool:
        """Whether the matrices are held in half precision (``HalfMatrix``; the fast backend)."""
        return isinstance(self.params.h[0].c_attn_w, halfprec.HalfMatrix) if self.params.h else False

    def dtype_info(self) -> dict:
        """The weights' type for JSON summaries: ``dtype``, ``weights_in_memory`` (the type the
        matrices are held in: float32 on the NumPy backend) and ``half_conversion`` (float16:
        "f16c" or "scalar", bfloat16: "shift"; None when nothing is converted)."""
        held = self.dtype if self.keeps_half else "float32"
        conv = None if held == "float32" else ("shift" if held == "bfloat16" else backend.half_conversion())
        return {"dtype": self.dtype, "weights_in_memory": held, "half_conversion": conv}

    def describe_dtype(self) -> str:
        """One line on the weights' type and how they are computed (``halfprec.describe``)."""
        return halfprec.describe(self.dtype, self.keeps_half)

    @cached_property
    def lm_head_t(self):
        """``lm_head`` transposed, [C, V]: float32 C-contiguous, so ``x @ lm_head_t`` streams the
        weights in order (measured ~20% faster decode at 124M shapes than ``x @ lm_head.T``).
        With a half-precision ``dtype`` it holds the rounded values (``load``; a tied head is
        ``wte`` itself, rounded): on the fast backend a ``HalfMatrix`` whose bits are stored
        [V, C], as its kernels read it (each logit's weights contiguous)."""
        head = self.params.lm_head
        return head.T if isinstance(head, halfprec.HalfMatrix) else np.ascontiguousarray(head.T)

    @cached_property
    def decode_plan(self):
        """The fused single-token decode step (``minadept._decode.DecodePlan``) over these weights,
        or None when the extension is not built or the model's GELU is the erf form (the step
        implements the tanh form GPT-2 uses). Built once, on the first fast decode."""
        D = backend._load_decode()
        if D is None or self.config.gelu != "tanh":
            return None
        p = self.params
        bits = lambda a: a.kernel_bits if isinstance(a, halfprec.HalfMatrix) else a   # read in place
        blocks = [tuple(bits(getattr(b, f.name)) for f in fields(b)) for b in p.h]
        # Weights beyond the last-level cache (e.g. 124M: 497 MB) stream from memory at every
        # token, and two cores stream more than one: split products of 2 MB and up over the
        # threads. A small model (the embedded one: 27 MB) runs from cache, where waking a second
        # thread costs more than it saves and its spinning slows the next prefill's BLAS.
        split = 1 << 19 if 4 * self.n_params > DECODE_SPLIT_MODEL_BYTES else 1 << 62
        wte = p.wte.bits if isinstance(p.wte, halfprec.HalfMatrix) else p.wte         # rows [V, C]
        return D.DecodePlan(blocks, wte, p.wpe, p.ln_f_g, p.ln_f_b, bits(self.lm_head_t),
                            self.config.n_head, self.config.layer_norm_epsilon, split,
                            wdtype=self.dtype if self.keeps_half else "float32")

    # -- stacked ln_1 / c_attn K,V weights for batched KV propagation (ADEPT engine) --
    @cached_property
    def stacked_kv(self):
        """(ln_1 g [L, C], ln_1 b [L, C], W_kv [L, C, 2C], b_kv [L, 2C]) over all blocks."""
        C = self.config.n_embd
        h = self.params.h
        return (np.stack([b.ln_1_g for b in h]), np.stack([b.ln_1_b for b in h]),
                np.stack([b.c_attn_w[:, C:] for b in h]), np.stack([b.c_attn_b[C:] for b in h]))


def embed(params: Params, ids: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Token plus position embeddings: ids [T], pos [T] -> h_0 [T, C] float32."""
    return params.wte[ids] + params.wpe[pos]


def qkv(blk: Block, x: np.ndarray, config: GPT2Config):
    """The attention inputs of a block: x [T, C] (residual stream) -> q, k, v [H, T, D]."""
    a = backend.layer_norm(x, blk.ln_1_g, blk.ln_1_b, config.layer_norm_epsilon)
    y = backend.linear(a, blk.c_attn_w, blk.c_attn_b)                        # [T, 3C]
    C = config.n_embd
    return (R.split_heads(y[:, :C], config.n_head), R.split_heads(y[:, C:2 * C], config.n_head),
            R.split_heads(y[:, 2 * C:], config.n_head))


def write_kv(kv_layer: np.ndarray, pos: np.ndarray, k: np.ndarray, v: np.ndarray) -> None:
    """Store k, v [H, T, D] at positions ``pos`` [T] of one layer's cache [2, H, n_ctx, D]."""
    if len(pos) and pos[-1] - pos[0] + 1 == len(pos):      # contiguous: a slice, not a gather
        kv_layer[0, :, pos[0]:pos[-1] + 1] = k
        kv_layer[1, :, pos[0]:pos[-1] + 1] = v
    else:
        kv_layer[0][:, pos] = k
        kv_layer[1][:, pos] = v


def block_rest(blk: Block, x: np.ndarray, q: np.ndarray, keys: np.ndarray, values: np.ndarray,
               pos: np.ndarray, config: GPT2Config) -> np.ndarray:
    """The rest of a block once q and the cache are ready: attention over ``keys``/``values``
    [H, S, D], output projection, residual, MLP, residual. x [T, C] -> [T, C]."""
    o = R.merge_heads(backend.attention(q, keys, values, pos))                   # [T, C]
    x = x + backend.linear(o, blk.attn_c_proj_w, blk.attn_c_proj_b)
    a = backend.layer_norm(x, blk.ln_2_g, blk.ln_2_b, config.layer_norm_epsilon)
    m = backend.gelu(backend.linear(a, blk.c_fc_w, blk.c_fc_b), config.gelu)      # [T, 4C]
    return x + backend.linear(m, blk.mlp_c_proj_w, blk.mlp_c_proj_b)


def final_norm(params: Params, h: np.ndarray, config: GPT2Config) -> np.ndarray:
    """``ln_f``: h [T, C] -> [T, C]."""
    return backend.layer_norm(h, params.ln_f_g, params.ln_f_b, config.layer_norm_epsilon)


def lm_head(model: Model, x: np.ndarray) -> np.ndarray:
    """Logits of already-normalised states: x [T, C] -> [T, V] float32 (tied to wte in GPT-2)."""
    return backend.matmul(x, model.lm_head_t)

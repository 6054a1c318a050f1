"""Half-precision weights (``--dtype float16`` or ``bfloat16``): which tensors, how they are
rounded, stored, checked and read back.

``Model.load(..., dtype="float16")`` rounds (to nearest, ties to even) the four matrices of every
block (``attn.c_attn``, ``attn.c_proj``, ``mlp.c_fc``, ``mlp.c_proj``) and ``wte``, which is both
the token embedding and GPT-2's tied LM head (an untied ``lm_head`` is rounded too), to that type.
Everything else stays float32: the position embeddings, layer norms, biases, attention and the KV
cache, and ADEPT's exit and K/V maps.

On the fast backend the rounded matrices stay in half precision in memory, as ``HalfMatrix``
(the bit patterns as uint16: NumPy has no bfloat16), with no float32 copy, stored [out, in] as the
kernels read them: the fused decode step reads them directly, converting in registers and summing
in float32, the embedding converts one row of ``wte``, and prefill multiplies a few rows through
the same kernel or upcasts one matrix at a time for a BLAS product. On the NumPy backend they are
upcast once, at load: float32 arrays holding the rounded values, the same numbers computed in
float32 (the reference the fast path is tested against).
"""
from __future__ import annotations

import numpy as np

from .errors import MinadeptError

#: The weight types ``--dtype`` accepts; float32 is the default and changes nothing.
DTYPES = ("float32", "float16", "bfloat16")
#: Codes of the half-precision kernels (``_fast/common.pxi``: W_F16, W_BF16).
KINDS = {"float16": 1, "bfloat16": 2}
#: The largest finite float16.
FLOAT16_MAX = 65504.0
#: The ``checkpoint.Block`` fields kept in half precision (the LM head is the fifth matrix).
MATRIX_FIELDS = ("c_attn_w", "attn_c_proj_w", "c_fc_w", "mlp_c_proj_w")


def describe(dtype: str, held: bool) -> str:
    """One line on what ``dtype`` means for a model whose matrices are ``held`` in it (the fast
    backend) or upcast at load (the NumPy backend), for ``info`` and the run summaries."""
    if dtype == "float32":
        return "dtype float32 (every weight float32)"
    from . import backend
    if not held:
        if backend.active() == "numpy":
            return f"dtype {dtype} weights, computed in float32 on the NumPy backend"
        return f"dtype {dtype} weights, upcast to float32 at load (computed in float32)"
    conv = "a 16-bit shift" if dtype == "bfloat16" else f"{backend.half_conversion()} conversion"
    return (f"dtype {dtype} weights (block matrices and wte, the token embedding and LM head, held in "
            f"{dtype}, converted to float32 in registers by {conv}, sums in float32; position "
            f"embeddings, norms, biases, attention float32)")


def check_dtype(dtype) -> str:
    """``dtype`` if it is one of DTYPES, else MinadeptError."""
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise MinadeptError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return dtype


class HalfMatrix:
    """A weight matrix rounded to float16 or bfloat16 and kept so: ``bits`` [rows, cols] uint16
    (the bit patterns; the matrix multiplies as ``x @ m``, rows = in, cols = out), stored [out, in]
    (``bits`` the transposed view of a C-contiguous array: ``kernel_bits``), ``dtype`` "float16"
    or "bfloat16".

    NumPy code that is not written for it still computes correctly: ``np.asarray``, ``x @ m``
    and indexing (``m[:, C:]``) see the float32 values (an upcast copy each time); the compiled
    kernels read ``bits`` in place."""

    __slots__ = ("bits", "dtype")

    def __init__(self, bits: np.ndarray, dtype: str):
        if bits.dtype != np.uint16 or bits.ndim != 2 or dtype not in KINDS:
            raise ValueError(f"HalfMatrix: need 2-D uint16 bit patterns and float16 or bfloat16, "
                             f"got {bits.dtype} {bits.shape} {dtype!r}")
        self.bits, self.dtype = bits, dtype

    shape = property(lambda self: self.bits.shape)
    ndim = property(lambda self: 2)
    size = property(lambda self: self.bits.size)
    nbytes = property(lambda self: self.bits.nbytes)
    kind = property(lambda self: KINDS[self.dtype], doc="the kernels' code of ``dtype``")
    T = property(lambda self: HalfMatrix(self.bits.T, self.dtype), doc="the transpose, a view")

    @property
    def kernel_bits(self) -> np.ndarray:
        """The bit patterns as the compiled kernels read them: [cols, rows] ([out, in]: each
        output's weights contiguous), C-contiguous, the transpose of ``bits``; ValueError when
        the matrix is not stored so (``weight`` stores every matrix so)."""
        if not self.bits.T.flags.c_contiguous:
            raise ValueError("HalfMatrix: not stored [out, in] C-contiguous, as the kernels read it")
        return self.bits.T

    def float32(self) -> np.ndarray:
        """The values as a new float32 array [rows, cols] (exact)."""
        return upcast(self.bits, self.dtype)

    def __array__(self, dtype=None, copy=None):
        if copy is False:
            raise ValueError("a HalfMatrix has no float32 array to share: it needs a copy")
        out = self.float32()
        return out if dtype is None else out.astype(dtype, copy=False)

    def __getitem__(self, key) -> np.ndarray:
        return upcast(self.bits[key], self.dtype)

    def __repr__(self) -> str:
        return f"HalfMatrix({self.dtype}, shape={self.shape})"


def upcast(bits: np.ndarray, dtype: str) -> np.ndarray:
    """Bit patterns (uint16, any shape and strides) of ``dtype`` -> new float32 array, exactly:
    the compiled conversion (F16C or its portable twin; bfloat16 a 16-bit shift) when the fast
    backend is active, else NumPy."""
    from . import backend
    kern = backend.kernels()
    if kern is None:
        if dtype == "float16":
            return bits.view(np.float16).astype(np.float32)
        return (bits.astype(np.uint32) << 16).view(np.float32)
    bits = np.asarray(bits)
    if bits.ndim == 0:                                  # one element (a scalar index): a NumPy scalar
        return kern.half_to_float32(bits.reshape(1), KINDS[dtype])[0]
    if not bits.flags.c_contiguous and bits.T.flags.c_contiguous:
        return kern.half_to_float32(bits.T, KINDS[dtype]).T
    return kern.half_to_float32(np.ascontiguousarray(bits), KINDS[dtype])


def round_bits(name: str, t: np.ndarray, dtype: str) -> np.ndarray:
    """The finite tensor ``t`` (float32 or float16) rounded to ``dtype``, to nearest even -> its
    bit patterns, uint16 of t's shape. A float16 tensor kept as float16 is viewed, not copied.
    Raises MinadeptError naming ``name`` for NaN/infinite values or values beyond the type's range
    (|x| > 65504 for float16)."""
    if not np.isfinite(t).all():
        raise MinadeptError(f"weights: tensor {name} has NaN or infinite values")
    if dtype == "float16":
        if t.dtype != np.float16:
            big = max(float(t.max(initial=0.0)), -float(t.min(initial=0.0)))
            if big > FLOAT16_MAX:
                raise MinadeptError(f"weights: tensor {name} has values outside the float16 range "
                                    f"(|x| up to {big:g} > {FLOAT16_MAX:g}); use --dtype bfloat16 or float32")
            t = t.astype(np.float16)
        return np.ascontiguousarray(t).view(np.uint16)
    u = np.ascontiguousarray(t, dtype=np.float32).view(np.uint32)
    r = (u >> 16) & np.uint32(1)
    r += np.uint32(0x7FFF)
    r += u
    bits = (r >> 16).astype(np.uint16)
    if ((bits & 0x7FFF) == 0x7F80).any():
        raise MinadeptError(f"weights: tensor {name} has values outside the bfloat16 range; use --dtype float32")
    return bits


def weight(name: str, t: np.ndarray, dtype: str, keep: bool, transposed: bool = False):
    """Matrix ``t`` rounded to ``dtype`` (checked as ``round_bits``): a HalfMatrix of t's shape
    when ``keep`` (the fast backend), else its float32 upcast.

    A HalfMatrix is stored as the compiled kernels read it, [out, in] C-contiguous (each output's
    weights contiguous; ``HalfMatrix.kernel_bits``): a Conv1D matrix ``t`` [in, out] (the blocks')
    is copied transposed (in half precision), a ``transposed`` one, t [out, in] used as its
    transpose (the LM head [V, C]), is kept as given. The float32 upcast is C-contiguous, or for
    ``transposed`` the transposed view of a C-contiguous [cols, rows] array, as before."""
    bits = round_bits(name, t, dtype)
    if not keep:
        out = upcast(bits, dtype)
        return np.ascontiguousarray(out.T).T if transposed else np.ascontiguousarray(out)
    if not transposed:
        bits = np.ascontiguousarray(bits.T).T
    return HalfMatrix(bits, dtype)

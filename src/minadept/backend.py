"""The one backend boundary: NumPy reference or compiled kernels (``MINADEPT_BACKEND=auto|numpy|fast``).

``auto`` uses the compiled extension when it imports, else NumPy; ``fast`` without the extension
is an error, never a silent fallback; ``numpy`` forces the pure path. Every dispatch decision and
its size threshold lives here (the functions below); the reference maths (``reference.py``) never
consults this module. ``using(name)`` switches the backend for a block (tests), and the thread
helpers pin BLAS and OpenMP.
"""
from __future__ import annotations

import os
from contextlib import contextmanager

import numpy as np

from . import reference
from .errors import MinadeptError

#: Row limit for the softmax-top-2 kernel (exit checks of a few tokens).
FAST_MAX_ROWS = 8
#: Up to this many queries the attention kernel runs (decode, small active sets); above it BLAS
#: matrix products win, with the ``causal_softmax`` kernel between them.
FAST_ATTENTION_MAX_QUERIES = 8


#: The compiled modules, both needed by the fast backend: setup.py builds ``_fast/kernels.pyx``
#: (the array kernels) and ``_fast/decode.pyx`` (the fused decode step, ``DecodePlan``).
FAST_MODULES = ("minadept._kernels", "minadept._decode")


def _import_fast() -> tuple:
    """(kernels module or None, decode module or None) as they import now."""
    try:
        from . import _kernels  # type: ignore[attr-defined]
    except ImportError:
        _kernels = None
    try:
        from . import _decode  # type: ignore[attr-defined]
    except ImportError:
        _decode = None
    return _kernels, _decode


def fast_missing() -> list[str]:
    """Names of the compiled modules that do not import (empty when the fast backend can run)."""
    return [name for name, mod in zip(FAST_MODULES, _import_fast()) if mod is None]


def _load_fast():
    """The compiled array-kernel module (``minadept._kernels``), or None unless both compiled
    modules import."""
    kernels_mod, decode_mod = _import_fast()
    return kernels_mod if kernels_mod is not None and decode_mod is not None else None


def _load_decode():
    """The compiled decode-step module (``minadept._decode``, ``DecodePlan``), or None unless
    both compiled modules import."""
    kernels_mod, decode_mod = _import_fast()
    return decode_mod if kernels_mod is not None and decode_mod is not None else None


def select(requested: str | None = None):
    """Return (name, kernels module or None). Raises MinadeptError for an unknown value or ``fast``
    when the extension (both compiled modules) is not built."""
    want = (requested or os.environ.get("MINADEPT_BACKEND") or "auto").lower()
    if want not in ("auto", "numpy", "fast"):
        raise MinadeptError(f"MINADEPT_BACKEND must be auto, numpy or fast, got {want!r}")
    if want == "numpy":
        return "numpy", None
    fast = _load_fast()
    if fast is None and want == "fast":
        missing = fast_missing() or list(FAST_MODULES)
        raise MinadeptError(f"MINADEPT_BACKEND=fast but the compiled extension is not built: "
                            f"{' and '.join(missing)} missing (reinstall with pip install -e . "
                            f"and a C compiler)")
    return ("fast", fast) if fast is not None else ("numpy", None)


_state: tuple | None = None


def use(requested: str | None = None):
    """Select the backend (``requested`` or $MINADEPT_BACKEND) for this process; returns its name."""
    global _state
    _state = select(requested)
    return _state[0]


def current() -> tuple:
    global _state
    if _state is None:
        try:
            _state = select()
        except MinadeptError:          # reported by the CLI via use(); the library falls back
            _state = ("numpy", None)
    return _state


def kernels():
    """The compiled array-kernel module (``minadept._kernels``), or None on the NumPy backend."""
    return current()[1]


def active() -> str:
    """The backend in use: "numpy" or "fast"."""
    return current()[0]


@contextmanager
def using(requested: str):
    """Run a block on backend ``requested`` ("numpy" or "fast"), then restore the previous one.
    Raises MinadeptError for "fast" without the extension."""
    global _state
    saved = current()
    _state = select(requested)
    try:
        yield _state[0]
    finally:
        _state = saved


# ----------------------------------------------------------------------------- dispatch

#: Up to this many rows, a product with half-precision weights runs the half-precision kernel
#: (``half_matmul``: the matrix read once, converted in registers); above, the matrix is upcast to
#: float32 for one BLAS product. Measured at 124M shapes (48 block products, one thread): kernel
#: 18 / 57 / 95 / 141 ms, upcast + BLAS 24 / 82 / 109 / 121 ms for 1 / 8 / 16 / 24 rows.
HALF_KERNEL_MAX_ROWS = 16


def half_conversion() -> str:
    """The float16 conversion the compiled kernels use: "f16c" (the CPU instruction) or "scalar"
    (the portable integer conversion); "none (NumPy backend)" without them."""
    kern = kernels()
    return kern.HALF_CONVERSION if kern is not None else "none (NumPy backend)"


#: Above HALF_KERNEL_MAX_ROWS rows, a half-precision matrix wider than this is upcast this many
#: columns at a time (the float32 copy of the 124M LM head: 25 MB at a time instead of 154 MB;
#: measured as fast as one upcast, 256 rows: 239-344 vs 249-589 ms on a busy machine).
HALF_UPCAST_COLUMNS = 8192


def matmul(x: np.ndarray, w) -> np.ndarray:
    """x [T, K] float32 @ w [K, N] -> [T, N] float32. w is a float32 array, or a
    ``halfprec.HalfMatrix``: then up to ``HALF_KERNEL_MAX_ROWS`` rows through the half-precision
    kernel, more as BLAS products with w upcast (a float32 copy of w, or of
    ``HALF_UPCAST_COLUMNS`` of its columns at a time, for that product only)."""
    from .halfprec import HalfMatrix
    if not isinstance(w, HalfMatrix):
        return x @ w
    kern = kernels()
    if kern is not None and x.ndim == 2 and len(x) <= HALF_KERNEL_MAX_ROWS and w.bits.T.flags.c_contiguous:
        return kern.half_matmul(np.ascontiguousarray(x, dtype=np.float32), w.kernel_bits, w.kind)
    if x.ndim != 2 or w.shape[1] <= HALF_UPCAST_COLUMNS:
        return x @ w.float32()
    out = np.empty((len(x), w.shape[1]), np.float32)
    for n0 in range(0, w.shape[1], HALF_UPCAST_COLUMNS):
        cols = slice(n0, n0 + HALF_UPCAST_COLUMNS)
        np.matmul(x, w[:, cols], out=out[:, cols])
    return out


def linear(x: np.ndarray, w, b: np.ndarray) -> np.ndarray:
    """``reference.linear`` (x [T, in] @ w [in, out] + b) with ``matmul``'s dispatch for
    half-precision w."""
    y = matmul(x, w)
    y += b
    return y


def layer_norm(x: np.ndarray, g: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    """``reference.layer_norm`` or its kernel (2-D C-contiguous input: measured 2.5x NumPy at
    [128, 768])."""
    kern = kernels()
    if kern is not None and x.ndim == 2 and x.flags.c_contiguous:
        return kern.layer_norm(x, g, b, eps)
    return reference.layer_norm(x, g, b, eps)


def gelu(x: np.ndarray, form: str) -> np.ndarray:
    """GELU of ``form`` ("tanh" or "erf"); the tanh form from its vectorised kernel (2x NumPy at
    any size) when the input is 2-D C-contiguous."""
    kern = kernels()
    if form == "tanh" and kern is not None and x.ndim == 2 and x.flags.c_contiguous:
        return kern.gelu_tanh(x)
    return reference.GELU[form](x)


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, q_pos: np.ndarray) -> np.ndarray:
    """``reference.attention``: the fused kernel up to ``FAST_ATTENTION_MAX_QUERIES`` queries, BLAS
    products around the ``causal_softmax`` kernel above."""
    kern = kernels()
    if kern is None or q.shape[1] == 0:
        return reference.attention(q, k, v, q_pos)
    q_pos = np.ascontiguousarray(q_pos, dtype=np.int64)
    if q.shape[1] <= FAST_ATTENTION_MAX_QUERIES:
        return kern.attention(q, k, v, q_pos)
    scores = q @ k.transpose(0, 2, 1)                                       # [H, T, S]
    return kern.causal_softmax(scores, q_pos, 1.0 / np.sqrt(q.shape[-1])) @ v


def softmax_top2(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(top-1 probability [A], top-1 minus top-2 [A]) of the softmax of logits [A, V]; the
    kernel for up to ``FAST_MAX_ROWS`` rows."""
    kern = kernels()
    if kern is not None and len(logits) <= FAST_MAX_ROWS:
        return kern.softmax_top2(np.ascontiguousarray(logits))
    from .exits.policies import softmax_top2_numpy
    return softmax_top2_numpy(logits)


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of rows a[i], b[i] ([N, C]) clipped to [-1, 1] (kernel or ``policies.cosine_rows``)."""
    kern = kernels()
    if kern is not None:
        return kern.cosine_rows(np.ascontiguousarray(a), np.ascontiguousarray(b))
    from .exits.policies import cosine_rows as twin
    return twin(a, b)


def adept_logit(h: np.ndarray, h_prev: np.ndarray, w: np.ndarray, b: float) -> np.ndarray:
    """The learned policy's logit [A] float64 (kernel or ``adept.adept_logit_numpy``)."""
    kern = kernels()
    if kern is not None:
        return kern.adept_logit(np.ascontiguousarray(h, dtype=np.float32),
                             np.ascontiguousarray(h_prev, dtype=np.float32), w, b, 1e-5)
    from .exits.adept import adept_logit_numpy
    return adept_logit_numpy(h, h_prev, w, b)



_blas_libs: list | None = None


class single_threaded_blas:
    """Context manager: every loaded BLAS library (NumPy's, SciPy's) runs on one thread inside it,
    and gets its thread count back on exit. The fused decode step splits its large products
    over OpenMP threads itself; a BLAS that also spawned threads would oversubscribe the cores
    (measured 2.6 vs 2.0 ms per embedded-model token). Costs a few microseconds per use."""

    def __enter__(self):
        global _blas_libs
        if _blas_libs is None:
            from threadpoolctl import ThreadpoolController
            _blas_libs = [lc for lc in ThreadpoolController().lib_controllers if lc.user_api == "blas"]
        self.saved = [lc.get_num_threads() for lc in _blas_libs]
        for lc, n in zip(_blas_libs, self.saved):
            if n != 1:
                lc.set_num_threads(1)
        return self

    def __exit__(self, *exc):
        for lc, n in zip(_blas_libs, self.saved):
            if n != 1:
                lc.set_num_threads(n)
        return False


#: Models with more weight bytes than this default to every core, smaller ones to one thread
#: (``bench/bench_threads.py``, README "--threads"): a second thread pays on an idle machine
#: (2-core, embedded model prefill 1.44x, 124M prefill 1.78x / decode 1.12x) and costs dearly on
#: a busy one (124M decode 0.40x with one busy neighbour); the small model has the least to gain.
#: The same size splits the fused decode step's products over threads.
SMALL_MODEL_BYTES = 64 << 20


def available_cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_threads(weight_bytes: int) -> int:
    """BLAS/OpenMP threads for a model of ``weight_bytes`` bytes when the user sets none: 1 up
    to ``SMALL_MODEL_BYTES``, every available core above."""
    return 1 if weight_bytes <= SMALL_MODEL_BYTES else available_cores()

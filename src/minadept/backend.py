"""NumPy vs Cython kernel selection (``MINADEPT_BACKEND=auto|numpy|fast``).

``auto`` uses the compiled extension when it imports, else NumPy; ``fast`` without the extension
is an error, never a silent fallback; ``numpy`` forces the pure path.
"""
from __future__ import annotations

import os

from .errors import MinadeptError


def _load_fast():
    try:
        from . import _fast_kernels  # type: ignore[attr-defined]
        return _fast_kernels
    except ImportError:
        return None


def select(requested: str | None = None):
    """Return (name, module or None). Raises MinadeptError for an unknown value or ``fast``
    when the extension is not built."""
    want = (requested or os.environ.get("MINADEPT_BACKEND") or "auto").lower()
    if want not in ("auto", "numpy", "fast"):
        raise MinadeptError(f"MINADEPT_BACKEND must be auto, numpy or fast, got {want!r}")
    if want == "numpy":
        return "numpy", None
    fast = _load_fast()
    if fast is None and want == "fast":
        raise MinadeptError("MINADEPT_BACKEND=fast but the compiled extension minadept._fast_kernels "
                            "is not built (reinstall with pip install -e . and a C compiler)")
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
    """The compiled kernel module, or None on the NumPy backend."""
    return current()[1]


def active() -> str:
    """The backend in use: "numpy" or "fast"."""
    return current()[0]


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
#: (``bench/bench_threads.py``). A small model runs from cache, where a second BLAS/OpenMP
#: thread costs more than it saves (embedded model, 27 MB: 2 threads decode 0.5x and prefill 0.3x
#: of 1 thread on a busy machine); a large one streams its weights from memory at every token,
#: and two cores stream more than one when they are free (124M shapes, 475 MB, idle: 22 against
#: 27 ms per decode token). The same size splits the fused decode step's products over threads.
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

"""minadept: a minimal NumPy GPT-2 with ADEPT token-level early exit (arXiv 2601.03700)."""
__version__ = "0.1.0"

import os as _os

# OpenBLAS's worker threads spin for 2^28 cycles (about 0.1 s) after each BLAS call before they
# sleep. After a prefill (BLAS products) they spin through the first decode steps, which want
# both cores for themselves (measured at 124M shapes, float16, 2 threads: the first 16 tokens after
# a 128-token prefill at 80 instead of 107 tokens/s). 2^18 cycles (about 0.1 ms) stops that, at
# no measured cost to prefill. It takes effect only when OpenBLAS loads after this line (the CLI;
# a program that imports minadept before NumPy); a value already set is kept.
_os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "18")

from .config import GPT2Config
from .engine import Engine
from .errors import MinadeptError
from .model import Model

__all__ = ["GPT2Config", "Engine", "MinadeptError", "Model", "__version__"]

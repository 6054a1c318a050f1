"""minadept: a minimal NumPy GPT-2 with ADEPT token-level early exit (arXiv 2601.03700)."""
__version__ = "0.1.0"

from .config import GPT2Config
from .engine import Engine
from .errors import MinadeptError
from .model import Model

__all__ = ["GPT2Config", "Engine", "MinadeptError", "Model", "__version__"]

"""GPT-2 hyper-parameters read from a Hugging Face ``config.json``."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from .errors import MinadeptError

#: HF ``activation_function`` values and the GELU form each one means (transformers' ACT2FN).
ACTIVATIONS = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh", "gelu": "erf"}


@dataclass(frozen=True)
class GPT2Config:
    """Shape of a GPT-2 model (field names as in transformers' ``GPT2Config``).

    ``gelu`` is the activation form: ``"tanh"`` (HF ``gelu_new``, ``gelu_pytorch_tanh``,
    ``gelu_fast``) or ``"erf"`` (HF ``gelu``).
    """

    n_layer: int
    n_head: int
    n_embd: int
    vocab_size: int
    n_positions: int
    layer_norm_epsilon: float = 1e-5
    activation_function: str = "gelu_new"
    tie_word_embeddings: bool = True

    def __post_init__(self):
        for name in ("n_layer", "n_head", "n_embd", "vocab_size", "n_positions"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise MinadeptError(f"config.json: {name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise MinadeptError(f"config.json: n_embd ({self.n_embd}) is not divisible by n_head ({self.n_head})")
        if self.activation_function not in ACTIVATIONS:
            raise MinadeptError(
                f"config.json: activation_function {self.activation_function!r} is not supported "
                f"(expected one of {', '.join(ACTIVATIONS)})")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def gelu(self) -> str:
        return ACTIVATIONS[self.activation_function]

    @classmethod
    def from_dict(cls, d: dict) -> "GPT2Config":
        """Build from a parsed HF config; unknown keys are ignored, ``n_inner`` must be 4*n_embd."""
        missing = [k for k in ("n_layer", "n_head", "n_embd", "vocab_size", "n_positions") if k not in d]
        if missing:
            raise MinadeptError(f"config.json: missing {', '.join(missing)}")
        if d.get("model_type", "gpt2") != "gpt2":
            raise MinadeptError(f"config.json: model_type {d['model_type']!r} is not gpt2")
        n_inner = d.get("n_inner")
        if n_inner is not None and n_inner != 4 * d["n_embd"]:
            raise MinadeptError(f"config.json: n_inner {n_inner} is not supported (only 4*n_embd)")
        for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention"):
            if d.get(flag):
                raise MinadeptError(f"config.json: {flag}=true is not supported")
        if d.get("scale_attn_weights") is False:
            raise MinadeptError("config.json: scale_attn_weights=false is not supported")
        eps = d.get("layer_norm_epsilon", 1e-5)
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
            raise MinadeptError(f"config.json: layer_norm_epsilon must be a positive number, got {eps!r}")
        return cls(
            n_layer=d["n_layer"], n_head=d["n_head"], n_embd=d["n_embd"],
            vocab_size=d["vocab_size"], n_positions=d["n_positions"],
            layer_norm_epsilon=float(eps),
            activation_function=d.get("activation_function", "gelu_new"),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
        )

    @classmethod
    def from_json(cls, path: str | Path) -> "GPT2Config":
        """Read ``config.json``. Raises MinadeptError if missing, unparsable or unsupported."""
        path = Path(path)
        if not path.is_file():
            raise MinadeptError(f"missing {path}")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise MinadeptError(f"{path} is not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise MinadeptError(f"{path} is not a JSON object")
        return cls.from_dict(d)

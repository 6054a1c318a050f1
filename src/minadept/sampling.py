"""Choosing the next token from logits: greedy, temperature, top-k, top-p (nucleus)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import MinadeptError


@dataclass(frozen=True)
class SamplingSettings:
    """temperature 0 = greedy (ties go to the lowest token id, as ``np.argmax``); top_k None =
    no limit (must be >= 1 otherwise); top_p 1.0 = no nucleus cut. Raises MinadeptError for invalid values."""
    temperature: float = 0.8
    top_k: int | None = 40
    top_p: float = 1.0

    def __post_init__(self):
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)):
            raise MinadeptError(f"--temperature must be a number, got {type(t).__name__} {t!r}")
        if math.isnan(t) or t < 0 or math.isinf(t):
            raise MinadeptError(f"--temperature must be a finite number >= 0, got {t}")
        if self.top_k is not None and self.top_k < 1:
            raise MinadeptError(f"--top-k must be >= 1, got {self.top_k}")
        if math.isnan(self.top_p) or not (0.0 < self.top_p <= 1.0):
            raise MinadeptError(f"--top-p must be in (0, 1], got {self.top_p}")


def allowed_probs(logits: np.ndarray, s: SamplingSettings) -> np.ndarray:
    """The sampling distribution [V] float64 after temperature, top-k and top-p; tokens outside
    the allowed set have probability exactly 0. (HF order: temperature, then top-k, then top-p.)"""
    z = logits.astype(np.float64)
    if not np.isfinite(z.max()):
        raise MinadeptError("logits have no finite maximum (NaN or +inf); cannot sample")
    if s.top_k is not None and s.top_k < z.size:      # on the raw logits: the shift below can
        kth = np.partition(z, -s.top_k)[-s.top_k]     # round near-equal logits into a tie
        z = np.where(z < kth, -np.inf, z)
    # Shift before dividing: z - max <= 0 stays finite or -inf at any temperature, so a temperature
    # far below 1 (even a subnormal one) concentrates the mass on the top logit(s) instead of
    # overflowing to inf - inf = NaN.
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        z = (z - z.max()) / s.temperature
    with np.errstate(under="ignore"):
        p = np.exp(z - z.max())
    p /= p.sum()
    if s.top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        cum = np.cumsum(p[order])
        keep = int(np.searchsorted(cum, s.top_p) + 1)      # smallest prefix with mass >= top_p
        cut = np.zeros_like(p)
        cut[order[:keep]] = p[order[:keep]]
        p = cut / cut.sum()
    return p


def sample(logits: np.ndarray, s: SamplingSettings, rng: np.random.Generator) -> int:
    """Next token id from logits [V] float32."""
    if s.temperature == 0:
        return int(np.argmax(logits))
    p = allowed_probs(logits, s)
    return int(rng.choice(p.size, p=p))

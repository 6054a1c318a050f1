"""Exit policies: given the state of each still-active token after block k, Continue or Exit.

A policy scores tokens (a measure) and compares the score with a threshold from a schedule: a token
exits when ``score > threshold`` (strictly), so threshold 1 never exits for the probability and
cosine measures. Policies return decisions as arrays and keep no timing or logging.

Measures (CALM, Schuster et al. 2022, section 3.5): ``confidence`` (softmax top-1 of the exit
prediction), ``margin`` (top-1 minus top-2), ``saturation`` (cosine of h_k and h_{k-1}).
Baselines: ``none`` (full depth), ``fixed`` (every token exits at layer K). The learned ADEPT
policy (``adept``, weights from ``minadept calibrate``) uses the same ``decide`` interface.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .. import backend
from ..config import GPT2Config
from ..errors import MinadeptError
from ..flops import head_flops


@dataclass(slots=True)
class ExitState:
    """State s = (h, q, k, v) of the A still-active tokens after block ``layer`` (1-based)."""
    layer: int                     # k in 1..n_layer-1
    h: np.ndarray                  # [A, C] h_k
    h_prev: np.ndarray             # [A, C] h_{k-1}
    q: np.ndarray                  # [H, A, D] this block's queries
    k: np.ndarray                  # [H, A, D] keys
    v: np.ndarray                  # [H, A, D] values
    positions: np.ndarray          # [A] absolute positions
    step: int                      # generated-token index (0 for the prompt), for schedules
    predict: Callable              # h [A, C] -> exit logits [A, V] (ln_f, mapper, LM head)


# ----------------------------------------------------------------------------- threshold schedules

@dataclass(frozen=True)
class Constant:
    """The same threshold at every position."""
    tau: float

    def __call__(self, step: int) -> float:
        return self.tau


@dataclass(frozen=True)
class Decay:
    """CALM's decaying threshold (Schuster et al. 2022, eq. 5):
    ``clip(0.9 tau + 0.1 exp(-temperature * step / horizon), 0, 1)`` over generated position.

    Departs from CALM at tau >= 1: the formula would dip below 1 after the first generated token
    and let tokens exit, while every schedule here keeps tau = 1 meaning "never exit"."""
    tau: float
    horizon: int = 128
    temperature: float = 4.0

    def __call__(self, step: int) -> float:
        if self.tau >= 1.0:
            return 1.0
        t = 0.9 * self.tau + 0.1 * math.exp(-self.temperature * step / max(1, self.horizon))
        return min(1.0, max(0.0, t))


# ----------------------------------------------------------------------------- policies

class Policy:
    """Base class. ``decide`` returns (exit mask [A] bool, exit logits [A, V] or None)."""
    name = "base"
    min_exit_layer = 1

    def decide(self, state: ExitState):
        raise NotImplementedError

    def check_flops(self, config: GPT2Config) -> int:
        """FLOPs of one exit check for one token."""
        return 0

    def never_exits(self, step: int) -> bool:
        """True if no token can exit at generated-token index ``step``: the engine then runs no
        checks at all (and counts none)."""
        return False

    def settings(self) -> dict:
        return {"exit": self.name, "min_exit_layer": self.min_exit_layer}


class NoExit(Policy):
    """Full depth: never exits (``--exit none``)."""
    name = "none"

    def decide(self, state):
        return np.zeros(len(state.h), dtype=bool), None


class Fixed(Policy):
    """Every token exits at layer ``exit_layer`` (``--exit fixed --exit-layer K``)."""
    name = "fixed"

    def __init__(self, exit_layer: int):
        self.exit_layer = exit_layer

    def decide(self, state):
        return np.full(len(state.h), state.layer == self.exit_layer), None

    def settings(self):
        return {"exit": self.name, "exit_layer": self.exit_layer}


class ThresholdPolicy(Policy):
    """score(state) > schedule(step) -> Exit."""

    def __init__(self, schedule, min_exit_layer: int = 1):
        self.schedule = schedule
        self.min_exit_layer = min_exit_layer

    def score(self, state: ExitState):
        """(score [A] float, logits [A, V] or None)."""
        raise NotImplementedError

    def decide(self, state):
        score, logits = self.score(state)
        return score > self.schedule(state.step), logits

    def never_exits(self, step):
        return self.schedule(step) >= 1.0          # every score is <= 1: "score > 1" never holds

    def settings(self):
        s = {"exit": self.name, "min_exit_layer": self.min_exit_layer, "threshold": self.schedule.tau}
        if isinstance(self.schedule, Decay):
            s.update(schedule="decay", schedule_horizon=self.schedule.horizon,
                     schedule_temperature=self.schedule.temperature)
        return s


def softmax_top2_numpy(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(top-1 probability [N], top-1 minus top-2 probability [N]) of the softmax of logits [N, V]
    (NumPy twin of the ``softmax_top2`` kernel)."""
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    p = e / e.sum(axis=-1, keepdims=True)
    top2 = np.partition(p, -2, axis=-1)[:, -2:]
    return top2[:, 1], top2[:, 1] - top2[:, 0]


class _HeadMeasure(ThresholdPolicy):
    """A measure of the exit prediction's softmax (CALM): needs an LM-head product per check."""
    which = 0                      # index into backend.softmax_top2's (top-1, margin)

    def score(self, state):
        logits = state.predict(state.h)
        return backend.softmax_top2(logits)[self.which], logits

    def check_flops(self, config):
        return head_flops(config)


class Confidence(_HeadMeasure):
    """Softmax top-1 probability of the exit prediction (CALM 'softmax response')."""
    name, which = "confidence", 0


class Margin(_HeadMeasure):
    """Top-1 minus top-2 softmax probability of the exit prediction (CALM)."""
    name, which = "margin", 1


class Saturation(ThresholdPolicy):
    """Cosine similarity of h_k and h_{k-1} (CALM's hidden-state saturation)."""
    name = "saturation"

    def score(self, state):
        return backend.cosine_rows(state.h, state.h_prev), None

    def check_flops(self, config):
        return 6 * config.n_embd


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of rows a[i], b[i] ([N, C]) in float64, clipped to [-1, 1], 0 for a zero row, NaN
    kept -> [N] float32 (NumPy twin of the fast kernel). Tiny but nonzero norms are exact: rows
    of norms 1 and 1e-38 in the same direction have cosine 1."""
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    ab = np.einsum("ij,ij->i", a64, b64)
    aa, bb = np.einsum("ij,ij->i", a64, a64), np.einsum("ij,ij->i", b64, b64)
    with np.errstate(invalid="ignore", divide="ignore"):
        c = np.where((aa == 0) | (bb == 0), 0.0, ab / (np.sqrt(aa) * np.sqrt(bb)))
    return np.clip(c, -1.0, 1.0).astype(np.float32)


class Adept(ThresholdPolicy):
    """ADEPT's learned exit policy: P(Exit | s) from cheap features of the state (no LM head),
    weights from ``adept.safetensors`` (see ``exits/adept.py``); exits when P(Exit) > tau."""
    name = "adept"

    def __init__(self, schedule, params, min_exit_layer: int = 1):
        super().__init__(schedule, min_exit_layer)
        self.params = params

    def decide(self, state):
        """P(Exit) > tau, decided on the logit (z > log(tau / (1 - tau))): the same decisions
        without a sigmoid per check; tau = 1 never exits and skips the features altogether."""
        tau = self.schedule(state.step)
        if tau >= 1.0:
            return np.zeros(len(state.h), dtype=bool), None
        cut = math.log(tau / (1.0 - tau)) if tau > 0.0 else -math.inf
        return self.params.logit(state.layer, state.h, state.h_prev) > cut, None

    def check_flops(self, config):
        return 2 * (config.n_embd + 2) + 10 * config.n_embd


@dataclass(frozen=True)
class PolicySpec:
    """One exit policy as the CLI, the sweeps and ``make_policy`` see it. Adding a policy is a
    class above and an entry here."""
    cls: type
    default_threshold: float | None = None     # threshold policies without a calibration
    sweep: tuple = ()                          # thresholds ``eval --sweep`` runs


POLICIES = {
    "none": PolicySpec(NoExit),
    "fixed": PolicySpec(Fixed),                # the sweep runs every second exit layer
    "confidence": PolicySpec(Confidence, 0.9, (0.5, 0.7, 0.8, 0.9, 0.95, 0.99)),
    "margin": PolicySpec(Margin, 0.8, (0.3, 0.5, 0.7, 0.8, 0.9, 0.98)),
    "saturation": PolicySpec(Saturation, 0.99, (0.9, 0.95, 0.97, 0.98, 0.99, 0.995)),
    "adept": PolicySpec(Adept, None, (0.5, 0.7, 0.8, 0.9, 0.95, 0.99)),   # default: the calibrated tau
}
THRESHOLD_DEFAULTS = {n: s.default_threshold for n, s in POLICIES.items() if s.default_threshold is not None}


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _check_policy_types(name, config, threshold, exit_layer, min_exit_layer, horizon, adept) -> None:
    """The types ``make_policy`` accepts; raises MinadeptError naming the first bad argument."""
    from .adept import AdeptParams
    if not isinstance(name, str):
        raise MinadeptError(f"exit policy name must be a str (one of {', '.join(POLICIES)}), got {type(name).__name__}")
    if not isinstance(config, GPT2Config):
        raise MinadeptError(f"config must be a GPT2Config (model.config), got {type(config).__name__}")
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.integer, np.floating))):
        raise MinadeptError(f"--threshold must be a number in [0, 1], got {type(threshold).__name__} {threshold!r}")
    for flag, value in (("--exit-layer", exit_layer), ("--min-exit-layer", min_exit_layer)):
        if value is not None and not _is_int(value):
            raise MinadeptError(f"{flag} must be an integer in [1, {config.n_layer}] (n_layer), "
                                f"got {type(value).__name__} {value!r}")
    if not _is_int(horizon) or horizon < 1:
        raise MinadeptError(f"horizon must be an integer >= 1 (generated tokens), got {horizon!r}")
    if adept is not None and not isinstance(adept, AdeptParams):
        raise MinadeptError(f"adept must be an AdeptParams (load_adept(...)) or None, got {type(adept).__name__}")


def _baseline(name, threshold, exit_layer, min_exit_layer) -> Policy:
    """``none`` or ``fixed``, which take no threshold; raises MinadeptError for a setting they
    do not use."""
    if name == "none":
        for flag, value in (("--threshold", threshold), ("--exit-layer", exit_layer),
                            ("--min-exit-layer", min_exit_layer)):
            if value is not None:
                raise MinadeptError(f"{flag} has no effect with --exit none")
        return NoExit()
    if name == "fixed":
        if exit_layer is None:
            raise MinadeptError("--exit fixed needs --exit-layer K")
        if threshold is not None or min_exit_layer is not None:
            raise MinadeptError("--exit fixed takes --exit-layer only, not --threshold or --min-exit-layer")
        return Fixed(exit_layer)


def make_policy(name: str, config: GPT2Config, *, threshold: float | None = None,
                exit_layer: int | None = None, min_exit_layer: int | None = None,
                schedule: str = "constant", horizon: int = 128, adept=None) -> Policy:
    """Build a policy from CLI-style settings, checking them against ``config``.

    ``adept``: the calibrated ``AdeptParams`` (needed by ``adept``; its threshold is the default).
    Raises MinadeptError for an unknown name, ``adept`` without calibration, tau outside [0, 1], an exit layer outside
    [1, n_layer], min_exit_layer outside [1, n_layer], or a setting the policy does not use.
    """
    _check_policy_types(name, config, threshold, exit_layer, min_exit_layer, horizon, adept)
    L = config.n_layer
    if name not in POLICIES:
        raise MinadeptError(f"unknown exit policy {name!r} (expected one of {', '.join(POLICIES)})")
    if threshold is not None and not (0.0 <= threshold <= 1.0):   # NaN fails too
        raise MinadeptError(f"--threshold must be in [0, 1], got {threshold}")
    if exit_layer is not None and not (1 <= exit_layer <= L):
        raise MinadeptError(f"--exit-layer must be in [1, {L}] (n_layer), got {exit_layer}")
    if min_exit_layer is not None and not (1 <= min_exit_layer <= L):
        raise MinadeptError(f"--min-exit-layer must be in [1, {L}] (n_layer), got {min_exit_layer}")
    if not isinstance(schedule, str) or schedule not in ("constant", "decay"):
        raise MinadeptError(f"unknown threshold schedule {schedule!r} (expected constant or decay)")
    if name in ("none", "fixed"):
        return _baseline(name, threshold, exit_layer, min_exit_layer)
    if exit_layer is not None:
        raise MinadeptError(f"--exit-layer is for --exit fixed, not --exit {name}")
    if name == "adept":
        if adept is None:
            raise MinadeptError("--exit adept needs a calibrated adept.safetensors (run: minadept calibrate)")
        default = adept.threshold
    else:
        default = THRESHOLD_DEFAULTS[name]
    tau = default if threshold is None else threshold
    sched = Constant(tau) if schedule == "constant" else Decay(tau, horizon=horizon)
    first = 1 if min_exit_layer is None else min_exit_layer
    return Adept(sched, adept, first) if name == "adept" else POLICIES[name].cls(sched, first)

"""Engine settings in one place: ``EngineSettings`` (what the CLI's policy flags say) and
``build_engine(model, settings)``, used by the CLI, ``eval``'s sweep, ``calibrate`` and the
benchmarks. Every check of a setting lives here or in ``make_policy``; the CLI only prints.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from .errors import MinadeptError


@dataclass(frozen=True)
class EngineSettings:
    """An exit policy and a KV mode, as the policy flags name them (``--exit``, ``--threshold``,
    ``--exit-layer``, ``--min-exit-layer``, ``--schedule``, ``--kv``, ``--kv-fill``, ``--adept``,
    ``--exit-map``, ``--kv-map``). None means the default of the policy or the model."""
    exit: str = "none"
    threshold: float | None = None
    exit_layer: int | None = None
    min_exit_layer: int | None = None
    schedule: str = "constant"
    horizon: int = 128                 # generated tokens the decay schedule spans
    kv: str = "propagate"
    kv_fill: str = "eager"
    adept: str | None = None           # calibration file or its directory (default: the model's)
    exit_map: str | None = None        # learned (default) or identity, with exit adept
    kv_map: str | None = None          # learned (default, with kv propagate) or identity

    @classmethod
    def from_args(cls, args, **overrides) -> "EngineSettings":
        """The settings of parsed CLI arguments (attributes named as the fields)."""
        names = {f for f in cls.__dataclass_fields__}
        found = {k: getattr(args, k) for k in names if getattr(args, k, None) is not None}
        found.update(overrides)
        return cls(**found)

    def with_(self, **changes) -> "EngineSettings":
        return replace(self, **changes)

    def check(self, sweep: bool = False) -> None:
        """Impossible combinations, before anything is loaded (``sweep``: settings of one eval
        --sweep, which runs every policy itself). Raises MinadeptError naming the flag."""
        if self.kv_fill == "lazy" and self.kv != "propagate":
            raise MinadeptError(f"--kv-fill lazy works only with --kv propagate, not --kv {self.kv}")
        for flag, value in (("--exit-map", self.exit_map), ("--kv-map", self.kv_map), ("--adept", self.adept)):
            if value is not None and self.exit != "adept" and not (flag == "--adept" and sweep):
                raise MinadeptError(f"{flag} works only with --exit adept" + (" or eval --sweep" if flag == "--adept" else ""))
        for flag, value in (("--exit-map", self.exit_map), ("--kv-map", self.kv_map)):
            if value not in (None, "learned", "identity"):
                raise MinadeptError(f"{flag} must be learned or identity, got {value!r}")
        if self.kv_map == "learned" and self.kv != "propagate":
            raise MinadeptError(f"--kv-map learned works only with --kv propagate (--kv {self.kv} computes K/V its own way)")
        if self.adept is not None and not str(self.adept).strip():
            raise MinadeptError("--adept is empty (give the policy file or its directory)")
        if sweep:
            for flag, value in (("--exit", None if self.exit == "none" else self.exit), ("--threshold", self.threshold),
                                ("--exit-layer", self.exit_layer), ("--min-exit-layer", self.min_exit_layer),
                                ("--exit-map", self.exit_map), ("--kv-map", self.kv_map)):
                if value is not None:
                    raise MinadeptError(f"{flag} has no effect with --sweep (it runs every policy at its own settings)")

    def as_dict(self) -> dict:
        return asdict(self)


def load_calibration(model, settings: EngineSettings):
    """The ``AdeptParams`` that ``settings`` asks for (``--adept`` or the model's own), or None
    when the policy is not adept. Raises MinadeptError when there is none."""
    if settings.exit != "adept":
        return None
    from .exits.adept import ADEPT_FILE, load_adept
    return load_adept(settings.adept or model.path / ADEPT_FILE, model.config)


def build_engine(model, settings: EngineSettings = EngineSettings(), adept=None):
    """The ``Engine`` for ``settings`` on ``model``. ``adept``: calibrated ``AdeptParams`` already
    in memory (else loaded as ``load_calibration`` does). Raises MinadeptError for bad settings."""
    from .engine import Engine
    from .exits.policies import make_policy
    settings.check()
    if settings.exit == "adept" and adept is None:
        adept = load_calibration(model, settings)
    policy = make_policy(settings.exit, model.config, threshold=settings.threshold, exit_layer=settings.exit_layer,
                         min_exit_layer=settings.min_exit_layer, schedule=settings.schedule,
                         horizon=settings.horizon, adept=adept)
    if settings.exit != "adept":
        return Engine(model, policy, kv=settings.kv, fill=settings.kv_fill)
    use_kv_map = settings.kv_map != "identity" and settings.kv == "propagate"
    return Engine(model, policy, kv=settings.kv, fill=settings.kv_fill,
                  exit_mapper=adept.exit_map if settings.exit_map != "identity" else None,
                  kv_maps=adept if use_kv_map else None, mapper_flops=adept.mapper_flops())

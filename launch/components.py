"""The experiment's objective and sample-grid sections, and the old keys they replace.

``objective:`` picks a registered training objective (:data:`dimsum.diffusion.OBJECTIVES`) and its
options; ``grid:`` says when the trainer draws an EMA sample grid and with which registered sampler
(:data:`dimsum.sampling.SAMPLERS`). A new objective or sampler needs no edit here: the objective's options
are read off its constructor, the sampler's settings are ``SamplerConfig`` fields.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import typing
import warnings
from collections.abc import Mapping
from typing import Any

from dimsum.config import Config, ConfigError
from dimsum.diffusion import OBJECTIVES, Objective, build_objective
from dimsum.sampling import SamplerConfig


@dataclasses.dataclass
class _Objective(Config):
    """The part of :data:`ObjectiveConfig` that is not an option: ``kind`` and what is done with it."""

    kind: str = "flow"

    def validate(self) -> None:
        self.check(self.kind in OBJECTIVES, "kind", "expected one of " + ", ".join(map(repr, OBJECTIVES)))
        default = type(self)()
        for name in self._unused():
            self.check(getattr(self, name) == getattr(default, name), name,
                       f"not an option of objective {self.kind!r} (its options: {', '.join(self.options())})")
        try:
            self.build()
        except ValueError as err:
            raise ConfigError("kind", self.kind, str(err)) from None

    def options(self) -> dict[str, Any]:
        """The fields the objective's constructor takes, with their values."""
        accepted = inspect.signature(OBJECTIVES[self.kind]).parameters
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name in accepted}

    def _unused(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self) if f.name != "kind" and f.name not in self.options()]

    def build(self) -> Objective:
        return build_objective(self.kind, **self.options())


def option_fields(objectives: Mapping[str, type]) -> list[tuple[str, Any, Any]]:
    """One field per constructor option of the registered objectives, typed and defaulted as the constructor
    declares it (an option that two objectives share must agree on both)."""
    fields: dict[str, tuple[Any, Any]] = {}
    for kind, objective in objectives.items():
        hints = typing.get_type_hints(objective.__init__)
        for name, parameter in inspect.signature(objective).parameters.items():
            if parameter.default is inspect.Parameter.empty or name not in hints:
                raise TypeError(f"objective {kind!r}: option {name!r} needs a type annotation and a default")
            spec = (hints[name], parameter.default)
            if fields.setdefault(name, spec) != spec:
                raise TypeError(f"objective {kind!r}: option {name!r} differs from another objective's")
    return [(name, tp, dataclasses.field(default=default)) for name, (tp, default) in fields.items()]


# ``objective:``: ``kind`` names a registered objective; every other field is an option of some registered
# objective (only the chosen one's are passed to it). The fields are read off the constructors, so a new
# objective's options need no edit here and YAML keys stay flat (``objective.timesteps``).
ObjectiveConfig = dataclasses.make_dataclass("ObjectiveConfig", option_fields(OBJECTIVES),
                                             bases=(_Objective,))
ObjectiveConfig.__module__ = __name__  # pickled by reference (submitit ships the experiment config)


def _grid_sampler() -> SamplerConfig:
    return SamplerConfig(method="euler")


@dataclasses.dataclass
class GridConfig(Config):
    """An EMA sample grid from every checkpoint whose step is a multiple of ``every`` (0: never): ``count``
    images, guided with ``cfg_scale`` when the model is class-conditional, drawn by ``sampler``."""

    every: int = 0
    count: int = 64
    cfg_scale: float = 4.0
    sampler: SamplerConfig = dataclasses.field(default_factory=_grid_sampler)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], path: str = "") -> GridConfig:
        sampler = data.get("sampler")
        if isinstance(sampler, Mapping) and "method" not in sampler:  # the grid's default method
            data = {**data, "sampler": {"method": _grid_sampler().method, **sampler}}
        return super().from_dict(data, path)

    def validate(self) -> None:
        self.check(self.every >= 0, "every", "expected >= 0")
        self.check(self.count > 0, "count", "expected a positive integer")
        self.check(math.isfinite(self.cfg_scale), "cfg_scale", "expected a finite number")
        self.check(self.cfg_scale >= 1.0, "cfg_scale", "expected >= 1 (1 disables guidance)")


@dataclasses.dataclass
class QualityConfig(Config):
    """The digits quality metrics (:mod:`launch.generate.quality`) at every sample grid (none without
    grids): ``count`` samples from the grid's checkpoint (EMA) and sampler, guided with ``cfg_scale``,
    scored by the digits judge cached in ``cache_dir`` (None: ``$DIMSUM_CACHE/judge``, else
    ``~/.cache/dimsum/judge``). The guidance is an FID-like 1.5 rather than the showcase grid's 4: strong
    guidance buys class accuracy with diversity, and FD then rises as training goes on. Only for the
    digits demo data, hence off by default; the trainer refuses it on other data before the first step."""

    enabled: bool = False
    count: int = 200
    cfg_scale: float = 1.5
    cache_dir: str | None = None

    def validate(self) -> None:
        self.check(self.count >= 4, "count", "expected >= 4 samples (precision/recall use 3 neighbours)")
        self.check(math.isfinite(self.cfg_scale) and self.cfg_scale >= 1.0, "cfg_scale",
                   "expected a finite number >= 1 (1 disables guidance)")


# old key (section, field) -> new dotted place; the old keys keep working, with a one-line warning
DEPRECATED_KEYS: dict[tuple[str, str], tuple[str, ...]] = {
    ("train", "path"): ("objective", "path"),
    ("train", "time_sampling"): ("objective", "time_sampling"),
    ("train", "sample_every"): ("grid", "every"),
    ("train", "sample_count"): ("grid", "count"),
    ("train", "sample_steps"): ("grid", "sampler", "steps"),
    ("train", "sample_cfg_scale"): ("grid", "cfg_scale"),
}


def migrate_deprecated(data: Mapping[str, Any], *,
                       warn: bool = True) -> tuple[dict[str, Any], dict[str, str]]:
    """``data`` with the old keys moved to their new places (an explicit new key wins), and a map from each
    new dotted key back to the old one it came from, so that an error can name the key the user wrote."""
    out = {key: dict(value) if isinstance(value, Mapping) else value for key, value in data.items()}
    renamed: dict[str, str] = {}
    for (section, field), place in DEPRECATED_KEYS.items():
        old = out.get(section)
        if not isinstance(old, dict) or field not in old:
            continue
        node = out
        for part in place[:-1]:
            child = node.get(part)
            if not isinstance(child, Mapping | None):
                break  # a malformed section: its own validation names it
            node[part] = node = dict(child or {})
        else:
            node.setdefault(place[-1], old.pop(field))
            renamed[".".join(place)] = f"{section}.{field}"
            if warn:
                warnings.warn(f"config: {section}.{field} is deprecated; use {'.'.join(place)}",
                              FutureWarning, stacklevel=3)
    return out, renamed

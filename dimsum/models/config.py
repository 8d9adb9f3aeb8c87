""":class:`ModelConfig`, the fields every model family shares, and the tables it is read against.

``FAMILIES`` maps a family name to its :class:`FamilySpec` (config class, build, FLOPs count, sizes) and
``REGISTRY`` maps a size name ("DiMSUM-L/2") to its complete config. Both are filled by
``dimsum.models`` from the family packages; this module imports no family, so families can import it.

A size entry is a complete config; ``model_config(name, **overrides)`` and YAML ``model: {name: ...,
field: ...}`` both start from the entry and override single fields, so an experiment never restates a
whole architecture. YAML keys stay flat: ``model.scan_order`` is a field of the DiMSUM config.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from dimsum.config import Config, ConfigError


@dataclasses.dataclass
class ModelConfig(Config):
    """Architecture of one network. ``family`` picks the config class, the network and its FLOPs count.

    Building from a dict (``ModelConfig.from_dict``) returns the family's subclass.
    """

    name: str = "DiMSUM-debug"
    family: str = "dimsum"
    depth: int = 4
    hidden_size: int = 128
    patch_size: int = 2
    input_size: int = 32
    in_channels: int = 4
    num_classes: int = 1000
    label_dropout: float = 0.15
    attn_heads: int = 16

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], path: str = "") -> ModelConfig:
        if cls is not ModelConfig:
            return super().from_dict(data, path)
        name = data.get("name", cls.name)
        family = data.get("family", REGISTRY[name].family if name in REGISTRY else cls.family)
        try:
            spec = family_spec(family)
        except ConfigError as err:
            raise err.under(path) from None
        return spec.config.from_dict(_without_other_families_defaults(data, spec.config), path)

    @classmethod
    def defaults_for(cls, data: Mapping[str, Any]) -> dict[str, Any]:
        name = data.get("name", cls.name)
        if name not in REGISTRY:
            raise ConfigError("name", name, f"expected a registered model: {', '.join(REGISTRY)}")
        own = {f.name for f in dataclasses.fields(cls)}
        return {k: v for k, v in REGISTRY[name].to_dict().items() if k in own}

    def validate(self) -> None:
        spec = FAMILIES.get(self.family)
        self.check(spec is not None and type(self) is spec.config, "family",
                   f"expected the family of {type(self).__name__} (registered: {', '.join(FAMILIES)})")
        for field in ("depth", "hidden_size", "patch_size", "input_size", "in_channels", "num_classes",
                      "attn_heads"):
            self.check(getattr(self, field) > 0, field, "expected a positive integer")
        self.check(0.0 <= self.label_dropout < 1.0, "label_dropout", "expected 0 <= p < 1")
        self.check(self.input_size % self.patch_size == 0, "input_size",
                   f"expected a multiple of patch_size={self.patch_size}")
        self.check(self.hidden_size % self.attn_heads == 0, "attn_heads",
                   f"expected a divisor of hidden_size={self.hidden_size}")

    @property
    def grid_size(self) -> int:
        return self.input_size // self.patch_size

    def check_input(self, x: torch.Tensor) -> None:
        """Name the shape a network of this config takes (else the error comes from deep inside it)."""
        expected = (self.in_channels, self.input_size, self.input_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"{self.name}: expected x of shape (B, {', '.join(map(str, expected))}), "
                             f"got {tuple(x.shape)}")


@dataclasses.dataclass(frozen=True)
class FamilySpec:
    """Everything the rest of the code needs to know about one model family.

    ``build(cfg, out_channels)`` returns the network; ``forward_gmacs(cfg, out_channels)`` its analytic
    multiply-accumulates per image (see :mod:`dimsum.models.flops`); ``sizes`` are its named configs.
    ``out_channels`` is what the objective asks for (``in_channels`` for flow matching);
    ``default_out_channels(in_channels)`` is the width without one: that of the family's released
    models, which ``dimsum models`` counts.
    """

    name: str
    config: type[ModelConfig]
    build: Callable[[Any, int], nn.Module]
    forward_gmacs: Callable[[Any, int], float]
    sizes: tuple[ModelConfig, ...]
    default_out_channels: Callable[[int], int] = operator.pos


FAMILIES: dict[str, FamilySpec] = {}
REGISTRY: dict[str, ModelConfig] = {}


def register_family(spec: FamilySpec) -> None:
    """Add a family and its sizes; names must be new, so two families cannot shadow each other."""
    if spec.name in FAMILIES:
        raise ValueError(f"model family {spec.name!r} is registered twice")
    for size in spec.sizes:
        if size.name in REGISTRY or size.family != spec.name or type(size) is not spec.config:
            raise ValueError(f"{spec.name}: size {size.name!r} is taken or not a {spec.config.__name__}")
    FAMILIES[spec.name] = spec
    REGISTRY.update((size.name, size) for size in spec.sizes)


def family_spec(family: str) -> FamilySpec:
    """The registered family ``family``; an unknown name is a config error, never a default."""
    if family not in FAMILIES:
        raise ConfigError("family", family, f"expected a registered family: {', '.join(FAMILIES)}")
    return FAMILIES[family]


def model_config(name: str, **overrides: Any) -> ModelConfig:
    """The registry entry ``name`` with single fields overridden, validated (of its family's class)."""
    return ModelConfig.from_dict({"name": name, **overrides})


def _without_other_families_defaults(data: Mapping[str, Any], config: type[ModelConfig]) -> dict[str, Any]:
    """Drop keys that only another family's config has, when they hold that config's default.

    Configs written before the families had their own classes list every family's fields (a DiT run's
    ``config.yaml`` has ``scan_order: sweep-4``); those must still load. A non-default value of another
    family's field is kept, so it fails as an unknown key instead of being ignored.
    """
    own = {f.name for f in dataclasses.fields(config)}
    foreign = {f.name: f.default for spec in FAMILIES.values() for f in dataclasses.fields(spec.config)
               if f.name not in own}
    return {k: v for k, v in data.items() if k not in foreign or v != foreign[k]}

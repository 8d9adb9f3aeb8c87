"""The one registry of model sizes, and :class:`ModelConfig`, the model's typed config.

A registry entry is a complete :class:`ModelConfig`; ``create_model(name, **overrides)`` and YAML
``model: {name: ..., field: ...}`` both start from the entry and override single fields, so an
experiment never has to restate a whole architecture.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import nn

from dimsum.config import Config, ConfigError


@dataclasses.dataclass
class ModelConfig(Config):
    """Architecture of one network. ``family`` picks DiMSUM or the DiT baseline."""

    name: str = "DiMSUM-debug"
    family: Literal["dimsum", "dit"] = "dimsum"
    depth: int = 4
    hidden_size: int = 128
    patch_size: int = 2
    input_size: int = 32
    in_channels: int = 4
    num_classes: int = 1000
    label_dropout: float = 0.15
    attn_every: int = 4
    fusion_heads: int = 8
    attn_heads: int = 16
    drop_path: float = 0.0
    scan_order: Literal["sweep-4", "sweep-8", "zigzag-8", "jpeg-8", "window", "bi"] = "sweep-4"
    cond_mamba: Literal["initial_state", "released", "none"] = "initial_state"
    wavelet_layout: Literal["subband", "released"] = "subband"
    backend: Literal["auto", "torch", "cuda"] = "auto"

    @classmethod
    def defaults_for(cls, data: Mapping[str, Any]) -> dict[str, Any]:
        name = data.get("name", cls.name)
        if name not in REGISTRY:
            raise ConfigError("name", name, f"expected a registered model: {', '.join(REGISTRY)}")
        return REGISTRY[name].to_dict()

    def validate(self) -> None:
        for field in ("depth", "hidden_size", "patch_size", "input_size", "in_channels", "num_classes",
                      "attn_every", "fusion_heads", "attn_heads"):
            self.check(getattr(self, field) > 0, field, "expected a positive integer")
        self.check(0.0 <= self.label_dropout < 1.0, "label_dropout", "expected 0 <= p < 1")
        self.check(0.0 <= self.drop_path < 1.0, "drop_path", "expected 0 <= p < 1")
        self.check(self.input_size % self.patch_size == 0, "input_size",
                   f"expected a multiple of patch_size={self.patch_size}")
        self.check(self.hidden_size % self.attn_heads == 0, "attn_heads",
                   f"expected a divisor of hidden_size={self.hidden_size}")
        if self.family == "dimsum":
            grid = self.input_size // self.patch_size
            self.check(grid % 4 == 0, "input_size",
                       f"expected input_size/patch_size divisible by 4 (two Haar levels); grid is {grid}")
            self.check(self.hidden_size % 2 == 0 and (self.hidden_size // 2) % self.fusion_heads == 0,
                       "fusion_heads", f"expected a divisor of hidden_size/2={self.hidden_size // 2}")

    @property
    def grid_size(self) -> int:
        return self.input_size // self.patch_size



def _dimsum(name: str, depth: int, hidden: int, patch: int = 2, **kw: Any) -> ModelConfig:
    return ModelConfig(name=name, family="dimsum", depth=depth, hidden_size=hidden, patch_size=patch,
                       drop_path=kw.pop("drop_path", 0.1), **kw)


def _dit(name: str, depth: int, hidden: int, heads: int, patch: int = 2) -> ModelConfig:
    return ModelConfig(name=name, family="dit", depth=depth, hidden_size=hidden, patch_size=patch,
                       attn_heads=heads)


REGISTRY: dict[str, ModelConfig] = {
    cfg.name: cfg
    for cfg in (
        _dimsum("DiMSUM-debug", 4, 64, fusion_heads=4, attn_heads=4, drop_path=0.0),
        _dimsum("DiMSUM-S/2", 8, 384, fusion_heads=8, attn_heads=6),
        _dimsum("DiMSUM-B/2", 12, 768),
        _dimsum("DiMSUM-L/2", 16, 1024),
        _dimsum("DiMSUM-XL/2", 24, 1152),
        _dimsum("DiMSUM-L/4", 16, 1024, patch=4),
        _dit("DiT-S/2", 12, 384, 6),
        _dit("DiT-B/2", 12, 768, 12),
        _dit("DiT-L/2", 24, 1024, 16),
        _dit("DiT-XL/2", 28, 1152, 16),
    )
}


def model_config(name: str, **overrides: Any) -> ModelConfig:
    """The registry entry ``name`` with single fields overridden, validated."""
    return ModelConfig.from_dict({"name": name, **overrides})


def build_model(cfg: ModelConfig) -> nn.Module:
    """Instantiate the network described by ``cfg`` (on the current default device)."""
    if cfg.family == "dit":
        from dimsum.models.dit.model import DiT

        return DiT(cfg)
    from dimsum.models.dimsum.model import DiMSUM

    return DiMSUM(cfg)


def create_model(name: str, **overrides: Any) -> nn.Module:
    """``create_model("DiMSUM-L/2", depth=4)``: any registry entry with any field overridden."""
    return build_model(model_config(name, **overrides))


def count_parameters(cfg: ModelConfig) -> int:
    """Exact parameter count, built on the meta device so XL/2 allocates nothing."""
    with torch.device("meta"):
        model = build_model(cfg)
    return sum(p.numel() for p in model.parameters())

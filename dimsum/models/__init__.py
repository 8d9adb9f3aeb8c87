"""Model families behind one registry: ``build_model(cfg)``, ``forward_gmacs(cfg)``, ``REGISTRY`` of sizes.

How to add a family (say a U-Net of Mamba blocks, ``unet``): create ``dimsum/models/unet/`` with a
``config.py`` holding ``UNetConfig(ModelConfig)`` (``family: str = "unet"`` plus its own fields, checked
in ``validate``), a ``model.py`` whose network takes ``(cfg, out_channels)`` and maps ``(x, t, y)`` to
``out_channels`` maps (reuse :mod:`dimsum.nn` and :mod:`dimsum.ssm`), a ``flops.py`` with
``forward_gmacs(cfg, out_channels)`` built on :mod:`dimsum.models.flops`, and an ``__init__.py`` that
defines ``FAMILY = FamilySpec(name="unet", config=UNetConfig, build=UNet, forward_gmacs=...,
sizes=(...))``. Then add ``UNET`` to the tuple below: YAML (``model: {name: UNet-B/2}``), ``dimsum
models``, parameter counts and MFU pick it up from here. An unregistered family is a config error.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dimsum.models.config import (
    FAMILIES,
    REGISTRY,
    FamilySpec,
    ModelConfig,
    family_spec,
    model_config,
    register_family,
)
from dimsum.models.dimsum import FAMILY as DIMSUM
from dimsum.models.dit import FAMILY as DIT
from dimsum.models.lamamba import FAMILY as LAMAMBA

for _family in (DIMSUM, DIT, LAMAMBA):
    register_family(_family)

__all__ = ["FAMILIES", "REGISTRY", "FamilySpec", "ModelConfig", "build_model", "count_parameters",
           "create_model", "family_spec", "forward_gmacs", "model_config"]


def build_model(cfg: ModelConfig, out_channels: int | None = None) -> nn.Module:
    """Instantiate the network described by ``cfg`` (on the current default device).

    ``out_channels`` is what the objective needs (``Objective.out_channels``); None means the family's
    default (``FamilySpec.default_out_channels``: ``cfg.in_channels``, the flow-matching velocity, except
    LaMamba's learned sigma).
    """
    return family_spec(cfg.family).build(cfg, _out_channels(cfg, out_channels))


def create_model(name: str, **overrides: Any) -> nn.Module:
    """``create_model("DiMSUM-L/2", depth=4)``: any registry entry with any field overridden."""
    return build_model(model_config(name, **overrides))


def count_parameters(cfg: ModelConfig, out_channels: int | None = None) -> int:
    """Exact parameter count, built on the meta device so XL/2 allocates nothing."""
    with torch.device("meta"):
        model = build_model(cfg, out_channels)
    return sum(p.numel() for p in model.parameters())


def forward_gmacs(cfg: ModelConfig, out_channels: int | None = None) -> float:
    """GMACs of one forward pass for one image (counting rules: :mod:`dimsum.models.flops`)."""
    return family_spec(cfg.family).forward_gmacs(cfg, _out_channels(cfg, out_channels))


def _out_channels(cfg: ModelConfig, out_channels: int | None) -> int:
    if out_channels is None:
        return family_spec(cfg.family).default_out_channels(cfg.in_channels)
    return out_channels

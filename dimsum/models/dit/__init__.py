"""The DiT baseline family (Peebles & Xie, 2023): it uses only the shared :class:`ModelConfig` fields."""

from __future__ import annotations

import dataclasses

from dimsum.models.config import FamilySpec, ModelConfig
from dimsum.models.dit.flops import forward_gmacs
from dimsum.models.dit.model import DiT


@dataclasses.dataclass
class DiTConfig(ModelConfig):
    family: str = "dit"


def _size(name: str, depth: int, hidden: int, heads: int, patch: int = 2) -> DiTConfig:
    return DiTConfig(name=name, family="dit", depth=depth, hidden_size=hidden, patch_size=patch,
                     attn_heads=heads)


FAMILY = FamilySpec(
    name="dit",
    config=DiTConfig,
    build=DiT,
    forward_gmacs=forward_gmacs,
    sizes=(
        _size("DiT-S/2", 12, 384, 6),
        _size("DiT-B/2", 12, 768, 12),
        _size("DiT-L/2", 24, 1024, 16),
        _size("DiT-XL/2", 28, 1152, 16),
    ),
)

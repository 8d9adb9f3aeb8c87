"""The DiMSUM family (NeurIPS 2024): its config, network, FLOPs count and named sizes."""

from __future__ import annotations

from typing import Any

from dimsum.models.config import FamilySpec
from dimsum.models.dimsum.config import DiMSUMConfig
from dimsum.models.dimsum.flops import forward_gmacs
from dimsum.models.dimsum.model import DiMSUM


def _size(name: str, depth: int, hidden: int, patch: int = 2, **kw: Any) -> DiMSUMConfig:
    return DiMSUMConfig(name=name, family="dimsum", depth=depth, hidden_size=hidden, patch_size=patch,
                        drop_path=kw.pop("drop_path", 0.1), **kw)


FAMILY = FamilySpec(
    name="dimsum",
    config=DiMSUMConfig,
    build=DiMSUM,
    forward_gmacs=forward_gmacs,
    sizes=(
        _size("DiMSUM-debug", 4, 64, fusion_heads=4, attn_heads=4, drop_path=0.0),
        _size("DiMSUM-S/2", 8, 384, fusion_heads=8, attn_heads=6),
        _size("DiMSUM-B/2", 12, 768),
        _size("DiMSUM-L/2", 16, 1024),
        _size("DiMSUM-XL/2", 24, 1152),
        _size("DiMSUM-L/4", 16, 1024, patch=4),
    ),
)

"""The DiMSUM-only architecture fields: the shared attention cadence, the fusion and the Mamba branches."""

from __future__ import annotations

import dataclasses
from typing import Literal

from dimsum.models.config import ModelConfig


@dataclasses.dataclass
class DiMSUMConfig(ModelConfig):
    family: str = "dimsum"
    attn_every: int = 4
    fusion_heads: int = 8
    drop_path: float = 0.0
    scan_order: Literal["sweep-4", "sweep-8", "zigzag-8", "jpeg-8", "window", "bi"] = "sweep-4"
    cond_mamba: Literal["initial_state", "released", "none"] = "initial_state"
    wavelet_layout: Literal["subband", "released"] = "subband"
    backend: Literal["auto", "torch", "cuda"] = "auto"

    def validate(self) -> None:
        super().validate()
        for field in ("attn_every", "fusion_heads"):
            self.check(getattr(self, field) > 0, field, "expected a positive integer")
        self.check(0.0 <= self.drop_path < 1.0, "drop_path", "expected 0 <= p < 1")
        grid = self.input_size // self.patch_size
        self.check(grid % 4 == 0, "input_size",
                   f"expected input_size/patch_size divisible by 4 (two Haar levels); grid is {grid}")
        self.check(self.hidden_size % 2 == 0 and (self.hidden_size // 2) % self.fusion_heads == 0,
                   "fusion_heads", f"expected a divisor of hidden_size/2={self.hidden_size // 2}")

"""The LaMamba-only architecture fields and the U-Net geometry derived from them (spec §2, §6, §8)."""

from __future__ import annotations

import dataclasses
from typing import Literal

from dimsum.models.config import ModelConfig

STAGES = 4
WIDTH_MULTIPLIERS = (1, 2, 4, 4)  # stage widths in units of hidden_size; downsampling after stages 0 and 1


@dataclasses.dataclass
class LaMambaConfig(ModelConfig):
    """``hidden_size`` is EMBED_DIM (stage 0's width), ``depth`` the blocks per encoder stage (decoder stages
    get ``depth + 1`` with ``unet_decoder_extra_block``, the released SD_UNET_DECODER_DESIGN), ``attn_heads``
    the heads of every stage, ``patch_size`` must be 1 (the released PATCH_SIZE)."""

    family: str = "lamamba"
    bottleneck_depth: int = 2
    unet_decoder_extra_block: bool = True
    window_size: int = 8
    mlp_ratio: float = 4.0
    ssm_ratio: float = 2.0
    d_state: int = 1
    backend: Literal["auto", "torch", "cuda"] = "auto"

    def validate(self) -> None:
        super().validate()
        for field in ("bottleneck_depth", "window_size", "d_state"):
            self.check(getattr(self, field) > 0, field, "expected a positive integer")
        self.check(self.mlp_ratio > 0 and self.ssm_ratio > 0, "mlp_ratio", "expected positive ratios")
        self.check(self.patch_size == 1, "patch_size", "expected 1 (LaMamba works on latent pixels)")
        self.check(self.hidden_size % 4 == 0, "hidden_size",
                   "expected a multiple of 4 (2-D sin-cos positions)")
        self.check(self.input_size % 8 == 0, "input_size",
                   "expected a multiple of 8 (two 2x merges, then an even side for the snake scan)")
        for side in sorted(set(self.stage_sides)):
            self.check(side <= self.window_size or side % self.window_size == 0, "window_size",
                       f"expected a divisor of the {side}x{side} stage map, or a window >= it")

    @property
    def stage_sides(self) -> tuple[int, ...]:
        R = self.input_size
        return R, R // 2, R // 4, R // 4

    @property
    def stage_widths(self) -> tuple[int, ...]:
        return tuple(m * self.hidden_size for m in WIDTH_MULTIPLIERS)

    @property
    def cond_dim(self) -> int:
        """Width of the conditioning vector c = t_emb + y_emb: the widest stage (Dc = dims[-1])."""
        return self.stage_widths[-1]

    @property
    def decoder_depth(self) -> int:
        return self.depth + int(self.unet_decoder_extra_block)

    def window_and_shift(self, side: int, index: int) -> tuple[int, int]:
        """Effective window and cyclic shift of block ``index`` of a stage on a ``side`` map (spec §6)."""
        if side <= self.window_size:
            return side, 0
        return self.window_size, (self.window_size // 2) * (index % 2)

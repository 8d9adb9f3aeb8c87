"""The LaMamba block (SS2D, shifted-window attention and an MLP, each adaLN-gated) and the U-Net resamplers
(spec §4, §6, §7). Feature maps are channels-last (B, H, W, C).

Submodules are registered in the released order, so our state dict lists entries in the order of the
released one and :mod:`dimsum.models.lamamba.released` only renames.
"""

from __future__ import annotations

import torch
from torch import nn

from dimsum.models.lamamba.config import LaMambaConfig
from dimsum.nn.layers import Mlp, ada_modulation
from dimsum.nn.window_attention import WindowAttention, shifted_window_mask, window_partition, window_reverse
from dimsum.ssm.ss2d import SS2D


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN on a (B, H, W, D) map with (B, D) shift and scale."""
    return x * (1 + scale[:, None, None]) + shift[:, None, None]


class LaMambaBlock(nn.Module):
    """x += gate * SS2D(.); x += gate * WindowAttention(.); x += gate * MLP(.), nine adaLN chunks from c.

    ``project_condition`` False makes the condition projection the identity (no parameters), which the
    released code does in encoder and middle blocks whose width equals the condition width (§14.13).
    """

    def __init__(self, cfg: LaMambaConfig, dim: int, side: int, index: int, project_condition: bool) -> None:
        super().__init__()
        self.side = side
        self.window, self.shift = cfg.window_and_shift(side, index)
        if self.shift:
            self.register_buffer("shift_mask", shifted_window_mask(side, self.window, self.shift))
        else:
            self.shift_mask = None
        self.cond_proj = nn.Linear(cfg.cond_dim, dim) if project_condition else nn.Identity()
        self.attn_norm = nn.LayerNorm(dim)
        self.window_attn = WindowAttention(dim, cfg.attn_heads, self.window)
        self.ssm_norm = nn.LayerNorm(dim)
        self.ss2d = SS2D(dim, d_state=cfg.d_state, ratio=cfg.ssm_ratio, backend=cfg.backend)
        self.mlp_norm = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(cfg.mlp_ratio * dim), gelu="none")
        self.adaLN_modulation = ada_modulation(dim, 9 * dim)

    def extra_repr(self) -> str:
        return f"side={self.side}, window={self.window}, shift={self.shift}"

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        if self.shift:
            x = torch.roll(x, (-self.shift, -self.shift), dims=(1, 2))
        out = self.window_attn(window_partition(x, self.window), self.shift_mask)
        out = window_reverse(out, self.window, self.side, self.side)
        return torch.roll(out, (self.shift, self.shift), dims=(1, 2)) if self.shift else out

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        chunks = self.adaLN_modulation(self.cond_proj(c)).chunk(9, dim=-1)
        shift_ssm, scale_ssm, gate_ssm, shift_attn, scale_attn, gate_attn, shift_mlp, scale_mlp, gate_mlp = (
            t[:, None, None] if i % 3 == 2 else t for i, t in enumerate(chunks))
        x = x + gate_ssm * self.ss2d(modulate(self.ssm_norm(x), shift_ssm, scale_ssm))
        x = x + gate_attn * self.attention(modulate(self.attn_norm(x), shift_attn, scale_attn))
        return x + gate_mlp * self.mlp(modulate(self.mlp_norm(x), shift_mlp, scale_mlp))


class Stage(nn.Module):
    """Blocks at one resolution. An encoder stage may end in ``downsample``, a decoder stage may start with
    ``upsample``; both are registered before the blocks, as released."""

    def __init__(self, blocks: list[LaMambaBlock], downsample: nn.Module | None = None,
                 upsample: nn.Module | None = None) -> None:
        super().__init__()
        self.downsample, self.upsample = downsample, upsample
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """The blocks only: the U-Net applies the resamplers around its skips."""
        for block in self.blocks:
            x = block(x, c)
        return x


class PatchMerging(nn.Module):
    """2x downsampling: the four sub-grids (even/odd rows, even/odd cols) on channels, LayerNorm, 4C -> 2C."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


class PatchExpanding(nn.Module):
    """``scale``x upsampling: Linear C -> scale^2 C / divisor, each position's outputs read as
    (p1, p2, c') onto pixel (scale i + p1, scale j + p2), then LayerNorm. ``scale`` 1: the final_up layer."""

    def __init__(self, dim: int, scale: int) -> None:
        super().__init__()
        self.scale = scale
        out = dim * scale * scale // (2 if scale > 1 else 1)
        self.expand = nn.Linear(dim, out, bias=False)
        self.norm = nn.LayerNorm(out // (scale * scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, _ = x.shape
        s = self.scale
        x = self.expand(x)
        x = x.view(B, H, W, s, s, -1).transpose(2, 3).reshape(B, H * s, W * s, -1)
        return self.norm(x)

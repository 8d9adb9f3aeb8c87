"""Transformer pieces shared by DiMSUM and the DiT baseline (DiT's models.py, with SDPA)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: per-sample affine of the token features, (B, T, D) with (B, D) shift and scale."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def ada_modulation(cond_dim: int, out_dim: int) -> nn.Sequential:
    """SiLU -> Linear: the adaLN head; index 1 is the Linear (the checkpoint names depend on it)."""
    return nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, out_dim))


class DropPath(nn.Module):
    """Stochastic depth per sample (timm semantics: survivors are rescaled by 1/keep)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def extra_repr(self) -> str:
        return f"p={self.p:.3f}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class Attention(nn.Module):
    """Multi-head self-attention with fused qkv (timm's layout: q, k, v slowest, then heads)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).reshape(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, T, D))


class Mlp(nn.Module):
    """DiT's MLP: Linear -> tanh-GELU -> Linear (``gelu="none"``: the exact GELU, as LaMamba-Diff's)."""

    def __init__(self, dim: int, hidden: int, gelu: Literal["tanh", "none"] = "tanh") -> None:
        super().__init__()
        self.gelu = gelu
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate=self.gelu))


class GEGLU(nn.Module):
    """Gated MLP of DiMSUM: w12 = Linear(D -> 2H) split into (a, b); w3(tanh-GELU(a) * b)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.gelu(a, approximate="tanh") * b)


class TransformerBlock(nn.Module):
    """DiT block with adaLN-Zero conditioning. DiT uses the plain MLP; DiMSUM's shared block uses GEGLU."""

    def __init__(self, dim: int, heads: int, mlp: Literal["gelu", "geglu"] = "gelu",
                 mlp_ratio: int = 4) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = (GEGLU if mlp == "geglu" else Mlp)(dim, mlp_ratio * dim)
        self.adaLN_modulation = ada_modulation(dim, 6 * dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, -1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """LayerNorm (no affine) -> adaLN shift/scale -> Linear to patch*patch*channels per token."""

    def __init__(self, dim: int, patch: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch * patch * out_channels)
        self.adaLN_modulation = ada_modulation(dim, 2 * dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))

"""Input embeddings shared by DiMSUM and DiT: patches, 2-D sin-cos positions, time and labels (spec §2)."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def sincos_pos_embed_2d(dim: int, grid: int) -> np.ndarray:
    """(grid*grid, dim) MAE/DiT sin-cos table: first half encodes the column, second half the row."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos position embedding needs a width divisible by 4, got {dim}")
    cols, rows = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64))
    return np.concatenate([_sincos_1d(dim // 2, cols), _sincos_1d(dim // 2, rows)], axis=1)


def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    angles = np.outer(pos.reshape(-1), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def resize_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """(1, g*g, D) -> (1, grid*grid, D), bicubic on the 2-D grid (for loading at another resolution)."""
    _, T, D = pos_embed.shape
    old = math.isqrt(T)
    if old * old != T:
        raise ValueError(f"pos_embed has {T} tokens, which is not a square grid")
    if old == grid:
        return pos_embed
    img = pos_embed.float().reshape(1, old, old, D).permute(0, 3, 1, 2)
    img = F.interpolate(img, size=(grid, grid), mode="bicubic", align_corners=False)
    return img.permute(0, 2, 3, 1).reshape(1, grid * grid, D).to(pos_embed.dtype)


@torch.no_grad()
def init_embedders(patch_conv: nn.Conv2d, t_embedder: TimestepEmbedder, y_embedder: LabelEmbedder) -> None:
    """DiT's embedding init: the patch conv as a Linear (xavier, zero bias), N(0, 0.02) label table and
    time-MLP weights (DiMSUM, DiT and LaMamba-Diff all use it)."""
    nn.init.xavier_uniform_(patch_conv.weight.view(patch_conv.weight.shape[0], -1))
    nn.init.zeros_(patch_conv.bias)
    nn.init.normal_(y_embedder.embedding_table.weight, std=0.02)
    nn.init.normal_(t_embedder.mlp[0].weight, std=0.02)
    nn.init.normal_(t_embedder.mlp[2].weight, std=0.02)


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> tokens, row-major (timm's PatchEmbed without its options)."""

    def __init__(self, in_channels: int, dim: int, patch: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """t as given (flow time in [0, 1]; LaMamba: the DDPM index 0..999) -> 256 sinusoidal features (cos half
    first, max period 1e4) -> MLP."""

    def __init__(self, dim: int, frequencies: int = 256) -> None:
        super().__init__()
        self.frequencies = frequencies
        self.mlp = nn.Sequential(nn.Linear(frequencies, dim), nn.SiLU(), nn.Linear(dim, dim))

    @staticmethod
    def sinusoidal(t: torch.Tensor, dim: int, max_period: float = 10000.0,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
        half = dim // 2
        steps = torch.arange(half, dtype=dtype, device=t.device) / half
        freqs = torch.exp(-math.log(max_period) * steps)
        args = t.to(dtype)[:, None] * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """Features in float32 (float64 for a float64 model: a DDPM index up to 999 needs the digits)."""
        dtype = torch.promote_types(self.mlp[0].weight.dtype, torch.float32)
        return self.mlp(self.sinusoidal(t, self.frequencies, dtype=dtype))


class LabelEmbedder(nn.Module):
    """Class table with an optional last "null" row; labels are dropped to null while training (for CFG).

    The drop mask comes from ``torch.rand`` on the default generator (docs/architecture.md, determinism
    contract).
    """

    def __init__(self, num_classes: int, dim: int, dropout: float) -> None:
        super().__init__()
        self.num_classes, self.dropout = num_classes, dropout
        self.embedding_table = nn.Embedding(num_classes + int(dropout > 0), dim)

    @property
    def null_label(self) -> int | None:
        return self.num_classes if self.dropout > 0 else None

    def forward(self, labels: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
        if labels is None:
            labels = torch.full((batch,), self._default_label(), dtype=torch.long, device=device)
        elif self.training and self.dropout > 0:
            drop = torch.rand(labels.shape[0], device=device) < self.dropout
            labels = torch.where(drop, self.num_classes, labels)
        return self.embedding_table(labels)

    def _default_label(self) -> int:
        """``y=None``: the single unconditional row, or the null row of a class-conditional table."""
        if self.embedding_table.num_embeddings == 1:
            return 0
        if self.null_label is None:
            raise ValueError(f"y=None needs a null label row, but this model has {self.num_classes} classes "
                             "and label_dropout=0; pass class labels")
        return self.null_label

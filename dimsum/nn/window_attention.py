"""Swin's (shifted-)window self-attention with a relative position bias, through one SDPA call.

Feature maps are channels-last (B, H, W, C). Windows of side ``window`` are cut row-major over the window
grid (batch outermost), tokens row-major inside a window. A shifted block rolls the map by -shift first,
so windows straddle the previous block's window borders; tokens that the roll brought together from
opposite edges must not see each other, which the -100 mask of :func:`shifted_window_mask` enforces.
Bias and mask are added to the logits as SDPA's float ``attn_mask``.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

MASKED = -100.0  # Swin's value: exp(-100) is 0 in float32 after the softmax's max subtraction


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, W, C) -> (B, H/window * W/window, window**2, C)."""
    B, H, W, C = x.shape
    x = x.view(B, H // window, window, W // window, window, C).transpose(2, 3)
    return x.reshape(B, (H // window) * (W // window), window * window, C)


def window_reverse(windows: torch.Tensor, window: int, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`."""
    B, C = windows.shape[0], windows.shape[-1]
    x = windows.view(B, height // window, width // window, window, window, C).transpose(2, 3)
    return x.reshape(B, height, width, C)


def relative_position_index(window: int) -> torch.Tensor:
    """(window**2, window**2) int64: row of the bias table for query token t1 = (r1, c1), key t2 = (r2, c2),
    (r1 - r2 + window - 1) * (2 window - 1) + (c1 - c2 + window - 1)."""
    r, c = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    r, c = r.reshape(-1), c.reshape(-1)
    dr, dc = r[:, None] - r[None] + window - 1, c[:, None] - c[None] + window - 1
    return dr * (2 * window - 1) + dc


def shifted_window_mask(size: int, window: int, shift: int) -> torch.Tensor:
    """(windows, window**2, window**2) float32: 0 between tokens of one region, -100 across regions.

    The size x size map (not rolled) is cut into 3 x 3 regions by the row and column ranges
    [0, size - window), [size - window, size - shift), [size - shift, size); after the -shift roll, two
    tokens of a window come from the same region exactly when they were neighbours before it.
    """
    bounds = (0, size - window, size - shift, size)
    band = torch.zeros(size, dtype=torch.long)
    for label, (lo, hi) in enumerate(itertools.pairwise(bounds)):
        band[lo:hi] = label
    labels = (band[:, None] * 3 + band[None, :]).view(1, size, size, 1)
    windows = window_partition(labels, window)[0, :, :, 0]  # (windows, window**2)
    same = windows[:, :, None] == windows[:, None, :]
    return torch.where(same, 0.0, MASKED).float()


class WindowAttention(nn.Module):
    """Multi-head attention inside each window, logits + relative position bias (+ shift mask).

    ``qkv`` outputs [q | k | v], each split into ``heads`` groups of consecutive channels.
    """

    def __init__(self, dim: int, heads: int, window: int) -> None:
        super().__init__()
        self.heads, self.window = heads, window
        self.rel_pos_bias = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        self.register_buffer("rel_pos_index", relative_position_index(window))
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def extra_repr(self) -> str:
        return f"heads={self.heads}, window={self.window}"

    def position_bias(self) -> torch.Tensor:
        """(heads, window**2, window**2)."""
        T = self.window**2
        return self.rel_pos_bias[self.rel_pos_index.view(-1)].view(T, T, self.heads).permute(2, 0, 1)

    def forward(self, windows: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """windows (B, nW, T, C) from :func:`window_partition`; mask (nW, T, T) or None."""
        B, nW, T, C = windows.shape
        h = self.heads
        # (window, head) pairs as SDPA's head axis: 4-D inputs, and a bias that broadcasts over the batch.
        qkv = self.qkv(windows).view(B, nW, T, 3, h, C // h).permute(3, 0, 1, 4, 2, 5)
        q, k, v = (t.reshape(B, nW * h, T, C // h) for t in qkv)
        bias = self.position_bias()
        bias = bias.expand(nW, h, T, T) if mask is None else mask.unsqueeze(1) + bias
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.reshape(1, nW * h, T, T).to(q.dtype))
        return self.proj(out.view(B, nW, h, T, C // h).transpose(2, 3).reshape(B, nW, T, C))

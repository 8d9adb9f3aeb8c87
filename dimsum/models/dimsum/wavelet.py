"""Two-level Haar wavelet packet of a token map, and its two token layouts (spec §3.3, §6.2).

Level 1 splits the map into LL, LH, HL, HH; level 2 splits each of those four again, giving 16 subbands
of side grid/4, indexed ``s = 4 * level1_band + level2_band``. The result is divided by 4 (as released),
so the transform is an exact, invertible rescaling of an orthonormal one.

The filters come from pytorch-wavelets (``DWTForward``/``DWTInverse``, 'haar'). Their band order
(LL, LH, HL, HH) and signs equal the released ``DWT_2D`` filters, so the released layout reproduces
the released network. The filter modules are cached per device outside the model: they are constants,
not checkpoint state, and must not become meta tensors when the model is built on the meta device.

Token layouts of the 16 x C x (grid/4)^2 coefficients on a grid x grid token map:

- ``subband`` (the paper): one subband per window; window ``s`` (row-major among the 4 x 4 windows)
  holds subband ``s``, its tokens are the subband's locations and its features the channels.
- ``released``: the released code reads the 16*C packet channels (subband slowest) as
  ``(c', p1, p2)`` with ``c'`` slowest, so each 4 x 4 block is one low-resolution location and token
  ``(p1, p2)`` holds all 16 subbands of the channels ``c = (16 c' + 4 p1 + p2) mod C``.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from collections.abc import Iterator
from typing import Literal

import torch
from torch import nn

with warnings.catch_warnings():  # pytorch-wavelets imports the deprecated pkg_resources
    warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
    from pytorch_wavelets import DWTForward, DWTInverse

Layout = Literal["subband", "released"]
LAYOUTS: tuple[str, ...] = ("subband", "released")
SCALE = 4.0  # 2 ** levels


@functools.lru_cache(maxsize=8)
def _haar(device: torch.device) -> tuple[DWTForward, DWTInverse]:
    with torch.device("cpu"):  # escape a meta default device; then move the constant filters
        return (DWTForward(J=1, wave="haar", mode="zero").to(device),
                DWTInverse(wave="haar", mode="zero").to(device))


@contextlib.contextmanager
def _strict_fp32(device: torch.device) -> Iterator[None]:
    """Full fp32 convolutions on GPU. PyTorch lets cuDNN run fp32 convolutions in TF32 (a 10-bit mantissa)
    by default, which would break the exact inverse; the Haar filters are 2 x 2, so this costs nothing."""
    if device.type != "cuda":
        yield
        return
    conv = torch.backends.cudnn.conv
    previous, conv.fp32_precision = conv.fp32_precision, "ieee"
    try:
        yield
    finally:
        conv.fp32_precision = previous


def _split(x: torch.Tensor) -> torch.Tensor:
    """One Haar level on every channel: (B, C, H, W) -> (B, 4, C, H/2, W/2), band order LL, LH, HL, HH."""
    with _strict_fp32(x.device):
        low, (high,) = _haar(x.device)[0](x)
    return torch.cat([low.unsqueeze(2), high], dim=2).transpose(1, 2)


def _merge(bands: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_split`."""
    bands = bands.transpose(1, 2)
    with _strict_fp32(bands.device):
        return _haar(bands.device)[1]((bands[:, :, 0], [bands[:, :, 1:]]))


def haar_packet(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, 16, C, H/4, W/4); subband ``4 * level1 + level2``, divided by 4."""
    B, C, H, W = x.shape
    level1 = _split(x).reshape(B, 4 * C, H // 2, W // 2)  # channel = level1 * C + c
    level2 = _split(level1)  # (B, level2, level1 * C + c, H/4, W/4)
    level2 = level2.reshape(B, 4, 4, C, H // 4, W // 4).transpose(1, 2)
    return level2.reshape(B, 16, C, H // 4, W // 4) / SCALE


def inverse_haar_packet(bands: torch.Tensor) -> torch.Tensor:
    """Exact inverse of :func:`haar_packet`."""
    B, _, C, h, w = bands.shape
    level2 = (bands * SCALE).reshape(B, 4, 4, C, h, w).transpose(1, 2).reshape(B, 4, 4 * C, h, w)
    level1 = _merge(level2).reshape(B, 4, C, 2 * h, 2 * w)
    return _merge(level1)


def bands_to_tokens(bands: torch.Tensor, layout: Layout) -> torch.Tensor:
    """(B, 16, C, h, w) -> (B, T, C) tokens of the (4h x 4w) grid, row-major."""
    B, _, C, h, w = bands.shape
    if layout == "subband":  # token (row, col) = (4-window row * h + i, window col * w + j)
        x = bands.reshape(B, 4, 4, C, h, w).permute(0, 1, 4, 2, 5, 3)
    else:  # packet channel k = s * C + c read as (c', p1, p2); token (row, col) = (i * 4 + p1, j * 4 + p2)
        x = bands.reshape(B, C, 4, 4, h, w).permute(0, 4, 2, 5, 3, 1)
    return x.reshape(B, 16 * h * w, C)


def tokens_to_bands(tokens: torch.Tensor, layout: Layout, h: int) -> torch.Tensor:
    """Inverse of :func:`bands_to_tokens` for subbands of side ``h``."""
    B, _, C = tokens.shape
    if layout == "subband":
        x = tokens.reshape(B, 4, h, 4, h, C).permute(0, 1, 3, 5, 2, 4)
    else:
        x = tokens.reshape(B, h, 4, h, 4, C).permute(0, 5, 2, 4, 1, 3)
    return x.reshape(B, 16, C, h, h)


class HaarPacketTokens(nn.Module):
    """Token map -> wavelet-packet tokens and back. No parameters and no state (see the module docstring).

    Runs in float32 with autocast off, and without TF32 on GPU: the transform is cheap and must invert to
    fp32 rounding.
    """

    def __init__(self, layout: Layout = "subband") -> None:
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"wavelet_layout: got {layout!r}; expected one of {', '.join(LAYOUTS)}")
        self.layout = layout

    def extra_repr(self) -> str:
        return f"layout={self.layout!r}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, C) row-major tokens of a square grid (side divisible by 4) -> (B, T, C) packet tokens."""
        B, T, C = x.shape
        n = _grid_side(T)
        with torch.autocast(x.device.type, enabled=False):
            img = x.float().transpose(1, 2).reshape(B, C, n, n)
            return bands_to_tokens(haar_packet(img), self.layout).to(x.dtype)

    def inverse(self, tokens: torch.Tensor) -> torch.Tensor:
        B, T, C = tokens.shape
        n = _grid_side(T)
        with torch.autocast(tokens.device.type, enabled=False):
            img = inverse_haar_packet(tokens_to_bands(tokens.float(), self.layout, n // 4))
            return img.reshape(B, C, T).transpose(1, 2).to(tokens.dtype)


def _grid_side(num_tokens: int) -> int:
    n = math.isqrt(num_tokens)
    if n * n != num_tokens or n % 4:
        raise ValueError(f"wavelet packet: {num_tokens} tokens do not form a square grid with a side "
                         "divisible by 4")
    return n

"""The DiM block: a spatial and a frequency Mamba branch fused by cross-attention, then a GEGLU FFN (spec §3).

Each branch works on half of the channels, has its own adaLN and its own token order:
``out = tokens + gate * unscan(Mamba(scan(modulate(tokens))))``. Scanning commutes with the per-token
modulation and gating, so only the Mamba input and output are permuted.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dimsum.models.dimsum.config import DiMSUMConfig
from dimsum.models.dimsum.wavelet import HaarPacketTokens
from dimsum.nn.layers import GEGLU, DropPath, ada_modulation, modulate
from dimsum.ssm.mamba import Mamba
from dimsum.ssm.scan_orders import scan_indices


def _grid(tokens: torch.Tensor) -> int:
    n = math.isqrt(tokens.shape[1])
    if n * n != tokens.shape[1]:
        raise ValueError(f"expected a square token grid, got {tokens.shape[1]} tokens")
    return n


class GatedMambaBranch(nn.Module):
    """adaLN-modulated Mamba with a gated residual, run in a block-specific scan order."""

    def __init__(self, cfg: DiMSUMConfig, block: int, order: str) -> None:
        super().__init__()
        self.block, self.order = block, order
        dim = cfg.hidden_size // 2
        self.mixer = Mamba(dim, cfg.hidden_size, cond_mode=cfg.cond_mamba, backend=cfg.backend)
        self.adaLN_modulation = ada_modulation(cfg.hidden_size, 3 * dim)

    def extra_repr(self) -> str:
        return f"order={self.order!r}, block={self.block}"

    def mix(self, tokens: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.adaLN_modulation(c).chunk(3, dim=-1)
        perm, inverse = scan_indices(self.order, self.block, _grid(tokens), tokens.device)
        seq = modulate(tokens, shift, scale).index_select(1, perm)
        return tokens + gate.unsqueeze(1) * self.scan(seq, c).index_select(1, inverse)

    def scan(self, seq: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.mixer(seq, c)


class SpatialBranch(GatedMambaBranch):
    """Mamba over the spatial tokens in the configured order ("sweep-4" by default)."""

    def __init__(self, cfg: DiMSUMConfig, block: int) -> None:
        super().__init__(cfg, block, cfg.scan_order)
        if cfg.scan_order == "bi":  # Vim-style: a second Mamba, with its own weights, reads backwards
            self.mixer_reverse = Mamba(cfg.hidden_size // 2, cfg.hidden_size, cond_mode=cfg.cond_mamba,
                                       backend=cfg.backend)

    def scan(self, seq: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        out = self.mixer(seq, c)
        if self.order == "bi":
            out = (out + self.mixer_reverse(seq.flip(1), c).flip(1)) / 2
        return out

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.mix(h, c)


class FrequencyBranch(GatedMambaBranch):
    """Mamba over two-level Haar-packet tokens, window-scanned (window = one subband in the paper layout)."""

    def __init__(self, cfg: DiMSUMConfig, block: int) -> None:
        super().__init__(cfg, block, "frequency")
        self.wavelet = HaarPacketTokens(cfg.wavelet_layout)

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.wavelet.inverse(self.mix(self.wavelet(h), c))


class CrossAttentionFusion(nn.Module):
    """Fuse the branches with swapped queries: spatial queries read frequency keys/values and vice versa."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv_spatial = nn.Linear(dim // 2, 3 * dim // 2)
        self.qkv_freq = nn.Linear(dim // 2, 3 * dim // 2)
        self.out = nn.Linear(dim, dim)

    def _qkv(self, layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        return layer(x).reshape(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)

    def forward(self, s: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        B, T, C = s.shape
        q_s, k_s, v_s = self._qkv(self.qkv_spatial, s)
        q_f, k_f, v_f = self._qkv(self.qkv_freq, f)
        o_s = F.scaled_dot_product_attention(q_s, k_f, v_f).transpose(1, 2).reshape(B, T, C)
        o_f = F.scaled_dot_product_attention(q_f, k_s, v_s).transpose(1, 2).reshape(B, T, C)
        return self.out(torch.cat([o_s, o_f], dim=-1))


class DiMBlock(nn.Module):
    """Mamba's add -> RMSNorm -> mixer pattern; returns (output, fp32 residual stream).

    ``drop_path`` applies to the previous block's output as it joins the residual (the released shift).
    """

    def __init__(self, cfg: DiMSUMConfig, block: int, drop_path: float) -> None:
        super().__init__()
        D = cfg.hidden_size
        self.drop_path = DropPath(drop_path)
        self.norm = nn.RMSNorm(D, eps=1e-5)
        self.spatial = SpatialBranch(cfg, block)
        self.freq = FrequencyBranch(cfg, block)
        self.fusion = CrossAttentionFusion(D, cfg.fusion_heads)
        self.ffn_norm = nn.RMSNorm(D, eps=1e-5)
        self.ffn_adaLN = ada_modulation(D, 3 * D)
        self.mlp = GEGLU(D, 4 * D)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None,
                c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        residual = (x if residual is None else residual + self.drop_path(x)).float()
        h = self.norm(residual)
        h_spatial, h_freq = h.chunk(2, dim=-1)
        u = h + self.fusion(self.spatial(h_spatial, c), self.freq(h_freq, c))
        shift, scale, gate = self.ffn_adaLN(c).chunk(3, dim=-1)
        return u + gate.unsqueeze(1) * self.mlp(modulate(self.ffn_norm(u), shift, scale)), residual

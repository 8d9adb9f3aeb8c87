"""DiMSUM's MACs on top of the shared rules of :mod:`dimsum.models.flops`.

The two-level Haar packet and its inverse: every output coefficient is a 2x2 filter (4 MACs), i.e. 4 MACs
per input value per level and direction; a ``bi`` spatial order doubles the spatial Mamba.

DiMSUM-L/2 at 256 px comes to 96.6 GMACs: 78.9 in the 16 DiM blocks (of which the scans are 0.5) and
17.7 in the 4 applications of the shared attention block; the paper reports 84.49 GFLOPs.
"""

from __future__ import annotations

from dimsum.models.dimsum.config import DiMSUMConfig
from dimsum.models.flops import attention_macs, mamba_macs, patch_net_macs, transformer_block_macs


def _haar_packet(tokens: int, channels: int) -> int:
    """Two levels, forward and inverse: 4 MACs per value per level and direction."""
    return 2 * 2 * 4 * tokens * channels


def _dim_block(cfg: DiMSUMConfig) -> int:
    T, D = cfg.grid_size**2, cfg.hidden_size
    half = D // 2
    mambas = 2 + (cfg.scan_order == "bi")
    branch_mamba = mamba_macs(T, half, D, conditional=cfg.cond_mamba == "initial_state")
    branches = mambas * branch_mamba + 2 * D * 3 * half + _haar_packet(T, half)  # + two branch adaLNs
    fusion = T * (2 * half * 3 * half + D * D) + 2 * attention_macs(T, half)
    ffn = T * D * 4 * D * 3 + D * 3 * D  # GEGLU D->8D, 4D->D; adaLN (per image)
    return branches + fusion + ffn


def forward_gmacs(cfg: DiMSUMConfig, out_channels: int) -> float:
    T, D = cfg.grid_size**2, cfg.hidden_size
    shared = (cfg.depth // cfg.attn_every) * transformer_block_macs(T, D, 4 * D, gated=True)
    return (patch_net_macs(cfg, out_channels) + cfg.depth * _dim_block(cfg) + shared) / 1e9

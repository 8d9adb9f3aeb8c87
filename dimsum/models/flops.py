"""Analytic multiply-accumulates (MACs) of one forward pass for one image.

Counting rules (what DiT's "GFLOPs" actually count, so DiT-XL/2 gives its published 118.6 and DiT-L/2
80.7):

- A Linear/conv costs in*out MACs per output position; biases, norms, activations, softmax, adds and
  the per-token modulation are not counted.
- Attention over T tokens of width d costs 2*T*T*d (q @ k^T and attn @ v).
- Per-image layers (time MLP, adaLN heads, conditional-Mamba ``cond_proj``) count once, not per token.
- The selective scan costs ``SCAN_MACS_PER_STATE`` = 4 multiply-adds per token, channel and state:
  dA = Δ·A, dB·x = (Δ·x)·B, h = dA·h + dB·x, y += C·h (the exp is not a MAC). The D skip and the z
  gate add 2 per token and channel.
- The depthwise causal conv costs d_conv MACs per token and channel.
- The two-level Haar packet and its inverse: every output coefficient is a 2x2 filter (4 MACs), i.e.
  4 MACs per input value per level and direction; a ``bi`` spatial order doubles the spatial Mamba.

DiMSUM-L/2 at 256 px comes to 96.6 GMACs: 78.9 in the 16 DiM blocks (of which the scans are 0.5) and
17.7 in the 4 applications of the shared attention block; the paper reports 84.49 GFLOPs.
"""

from __future__ import annotations

import math

from dimsum.models.config import ModelConfig

SCAN_MACS_PER_STATE = 4
D_STATE, D_CONV, EXPAND, FREQUENCIES = 16, 4, 2, 256


def _attention(tokens: int, dim: int) -> int:
    return 2 * tokens * tokens * dim


def _transformer_block(tokens: int, dim: int, mlp_hidden: int, gated: bool) -> int:
    mlp = dim * mlp_hidden * (3 if gated else 2)  # GEGLU: D->2H and H->D; MLP: D->H and H->D
    per_token = 4 * dim * dim + mlp  # qkv + proj
    return tokens * per_token + _attention(tokens, dim) + 6 * dim * dim  # + adaLN (per image)


def _mamba(tokens: int, d_model: int, cond_dim: int, conditional: bool) -> int:
    d_inner = EXPAND * d_model
    dt_rank = math.ceil(d_model / 16)
    per_token = (d_model * 2 * d_inner  # in_proj
                 + D_CONV * d_inner  # causal depthwise conv
                 + d_inner * (dt_rank + 2 * D_STATE)  # x_proj
                 + dt_rank * d_inner  # dt_proj
                 + SCAN_MACS_PER_STATE * d_inner * D_STATE + 2 * d_inner  # scan, D skip, z gate
                 + d_inner * d_model)  # out_proj
    return tokens * per_token + (cond_dim * d_inner if conditional else 0)


def _haar_packet(tokens: int, channels: int) -> int:
    """Two levels, forward and inverse: 4 MACs per value per level and direction."""
    return 2 * 2 * 4 * tokens * channels


def _dim_block(cfg: ModelConfig) -> int:
    T, D = cfg.grid_size**2, cfg.hidden_size
    half = D // 2
    mambas = 2 + (cfg.scan_order == "bi")
    branch_mamba = _mamba(T, half, D, conditional=cfg.cond_mamba == "initial_state")
    branches = mambas * branch_mamba + 2 * D * 3 * half + _haar_packet(T, half)  # + two branch adaLNs
    fusion = T * (2 * half * 3 * half + D * D) + 2 * _attention(T, half)
    ffn = T * D * 4 * D * 3 + D * 3 * D  # GEGLU D->8D, 4D->D; adaLN (per image)
    return branches + fusion + ffn


def forward_gmacs(cfg: ModelConfig) -> float:
    """GMACs of one forward pass for one image (see the module docstring for what is counted)."""
    T, D, p, C = cfg.grid_size**2, cfg.hidden_size, cfg.patch_size, cfg.in_channels
    embed = T * C * p * p * D + FREQUENCIES * D + D * D  # patch conv, time MLP
    head = 2 * D * D + T * D * p * p * C  # final adaLN, final Linear
    if cfg.family == "dit":
        trunk = cfg.depth * _transformer_block(T, D, 4 * D, gated=False)
    else:
        shared = (cfg.depth // cfg.attn_every) * _transformer_block(T, D, 4 * D, gated=True)
        trunk = cfg.depth * _dim_block(cfg) + shared
    return (embed + trunk + head) / 1e9

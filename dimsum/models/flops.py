"""Analytic multiply-accumulates (MACs) of one forward pass for one image: the shared counting rules.

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

Each family's ``flops.py`` adds its trunk to :func:`patch_net_macs` (embeddings and head).
"""

from __future__ import annotations

import math

from dimsum.models.config import ModelConfig

SCAN_MACS_PER_STATE = 4
D_STATE, D_CONV, EXPAND, FREQUENCIES = 16, 4, 2, 256


def attention_macs(tokens: int, dim: int) -> int:
    return 2 * tokens * tokens * dim


def transformer_block_macs(tokens: int, dim: int, mlp_hidden: int, gated: bool) -> int:
    mlp = dim * mlp_hidden * (3 if gated else 2)  # GEGLU: D->2H and H->D; MLP: D->H and H->D
    per_token = 4 * dim * dim + mlp  # qkv + proj
    return tokens * per_token + attention_macs(tokens, dim) + 6 * dim * dim  # + adaLN (per image)


def mamba_macs(tokens: int, d_model: int, cond_dim: int, conditional: bool) -> int:
    d_inner = EXPAND * d_model
    dt_rank = math.ceil(d_model / 16)
    per_token = (d_model * 2 * d_inner  # in_proj
                 + D_CONV * d_inner  # causal depthwise conv
                 + d_inner * (dt_rank + 2 * D_STATE)  # x_proj
                 + dt_rank * d_inner  # dt_proj
                 + SCAN_MACS_PER_STATE * d_inner * D_STATE + 2 * d_inner  # scan, D skip, z gate
                 + d_inner * d_model)  # out_proj
    return tokens * per_token + (cond_dim * d_inner if conditional else 0)


def patch_net_macs(cfg: ModelConfig, out_channels: int) -> int:
    """Patch conv and time MLP in front, final adaLN and final Linear behind (:class:`PatchNet`)."""
    T, D, p, C = cfg.grid_size**2, cfg.hidden_size, cfg.patch_size, cfg.in_channels
    embed = T * C * p * p * D + FREQUENCIES * D + D * D
    head = 2 * D * D + T * D * p * p * out_channels
    return embed + head

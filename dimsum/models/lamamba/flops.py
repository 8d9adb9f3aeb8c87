"""LaMamba-Diff's MACs under the shared rules of :mod:`dimsum.models.flops`.

Per block of width D on a side-s map (T = s^2 tokens), window w, d_inner = 2D, rank r, state n, K = 4
directions: in/out projections, depthwise 3x3 conv (9 per token and channel), the per-direction x_proj
and dt_proj products, the scan (4n per token and channel of the K*d_inner scanned channels, +1 for the D
skip; +1 per token and d_inner channel for the z gate), qkv/proj, window attention (2 w^2 D per token),
the MLP, and per image the condition projection and adaLN. Plus embed, merging/expanding and the final
layer.

LaMamba-Diff-XL at 256 px comes to 45.70 GMACs against the released fvcore count of 45.93 GFLOPs (fvcore
counts one multiply-add as one flop, so the units agree). The 0.23 G difference is counting rules, not
architecture: fvcore also counts the LayerNorms (0.10 G) and prices each selective scan at 9 L C n + L C
(0.28 G for n = 1) where we count 4 L C n + L C plus the z gate (0.14 G); the Linears, einsums, convs
and attention matmuls (42.69 + 2.36 + 0.06 + 0.44 = 45.55 G) are counted alike. At 512 px: 182.14
GMACs against 183.04.
"""

from __future__ import annotations

from dimsum.models.flops import FREQUENCIES, SCAN_MACS_PER_STATE, attention_macs
from dimsum.models.lamamba.config import LaMambaConfig
from dimsum.ssm.ss2d import DIRECTIONS


def block_macs(cfg: LaMambaConfig, dim: int, side: int, index: int, project_condition: bool) -> int:
    T, K, n = side * side, DIRECTIONS, cfg.d_state
    d_inner, rank = int(cfg.ssm_ratio * dim), -(-dim // 16)
    window, _ = cfg.window_and_shift(side, index)
    ss2d = (dim * 2 * d_inner + 9 * d_inner + K * d_inner * (rank + 2 * n) + K * rank * d_inner
            + K * d_inner * (SCAN_MACS_PER_STATE * n + 1) + d_inner + d_inner * dim)
    attention = 4 * dim * dim
    mlp = 2 * dim * int(cfg.mlp_ratio * dim)
    windows = T // (window * window)
    per_image = dim * 9 * dim + (cfg.cond_dim * dim if project_condition else 0)
    return T * (ss2d + attention + mlp) + windows * attention_macs(window * window, dim) + per_image


def forward_gmacs(cfg: LaMambaConfig, out_channels: int) -> float:
    d, Dc, R = cfg.hidden_size, cfg.cond_dim, cfg.input_size
    widths, sides = cfg.stage_widths, cfg.stage_sides
    total = R * R * cfg.in_channels * d + FREQUENCIES * Dc + Dc * Dc  # 1x1 embed conv, time MLP
    for i, (width, side) in enumerate(zip(widths, sides, strict=True)):
        encoder = sum(block_macs(cfg, width, side, j, width != Dc) for j in range(cfg.depth))
        decoder = sum(block_macs(cfg, width, side, j, True) for j in range(cfg.decoder_depth))
        total += encoder + decoder
        if i + 1 < len(sides) and sides[i + 1] != side:  # merging at the small side, expanding back
            small = sides[i + 1] ** 2
            total += small * 4 * width * 2 * width + small * 2 * width * 4 * width
    total += sum(block_macs(cfg, widths[-1], sides[-1], j, widths[-1] != Dc)
                 for j in range(cfg.bottleneck_depth))
    total += R * R * (d * d + d * out_channels) + Dc * d + d * 2 * d  # final expand and Linear; per image
    return total / 1e9

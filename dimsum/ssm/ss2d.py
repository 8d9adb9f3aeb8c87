"""SS2D, VMamba's 2-D selective-scan mixer ("v2" path), with LaMamba's continuous snake cross-scan (spec §5).

in_proj splits into x and a SiLU gate z; x goes through a depthwise 3x3 conv and SiLU, is read in four
directions (:func:`dimsum.ssm.scan_orders.snake_cross_scan_paths`), and the four scans run as ONE selective
scan of 4 * d_inner channels, direction-major, with B and C grouped by direction (B, 4, N, L) (mamba-ssm's
grouped B/C, not VMamba's forked kernels). The outputs are put back at their pixels, summed over the four
directions, normalised, gated by z and projected out.

Like the released code the scan inputs are float32 whatever the activations (float64 stays float64, so a
float64 model runs as one; the released code cannot, spec §14.9).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dimsum.ssm.scan import BACKENDS, selective_scan
from dimsum.ssm.scan_orders import snake_cross_scan_indices

DIRECTIONS = 4


class SS2D(nn.Module):
    """(B, H, W, dim) -> (B, H, W, dim) on a square map with an even side."""

    def __init__(self, dim: int, *, d_state: int = 1, ratio: float = 2.0, backend: str = "auto") -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r}: expected one of {BACKENDS}")
        K, d_inner = DIRECTIONS, int(ratio * dim)
        self.d_inner, self.d_state, self.dt_rank = d_inner, d_state, math.ceil(dim / 16)
        self.backend = backend
        self.x_proj_weight = nn.Parameter(torch.empty(K, self.dt_rank + 2 * d_state, d_inner))
        self.dt_proj_weight = nn.Parameter(torch.empty(K, d_inner, self.dt_rank))
        self.dt_bias = nn.Parameter(torch.empty(K, d_inner))
        self.A_log = nn.Parameter(torch.empty(K * d_inner, d_state))
        self.D = nn.Parameter(torch.empty(K * d_inner))
        self.out_norm = nn.LayerNorm(d_inner)
        self.in_proj = nn.Linear(dim, 2 * d_inner, bias=False)
        self.conv = nn.Conv2d(d_inner, d_inner, 3, padding=1, groups=d_inner, bias=False)
        self.out_proj = nn.Linear(d_inner, dim, bias=False)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self, dt_min: float = 1e-3, dt_max: float = 0.1, floor: float = 1e-4) -> None:
        """VMamba's "v0" init, per direction: x_proj as nn.Linear's default, dt_proj U(+-rank^-0.5), dt
        log-uniform in [dt_min, dt_max] through the inverse softplus, A = -(1..N), D = 1."""
        bound = self.d_inner**-0.5
        nn.init.uniform_(self.x_proj_weight, -bound, bound)
        nn.init.uniform_(self.dt_proj_weight, -self.dt_rank**-0.5, self.dt_rank**-0.5)
        log_dt = torch.rand(self.dt_bias.shape) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        dt = torch.exp(log_dt).clamp(min=floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        states = torch.arange(1, self.d_state + 1, dtype=torch.float32)
        self.A_log.copy_(torch.log(states).expand_as(self.A_log))
        self.D.fill_(1.0)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        batch, side, width, _ = u.shape
        if side != width or side % 2:
            raise ValueError(f"SS2D: the snake cross-scan needs a square map with an even side, "
                             f"got {side}x{width}")
        K, d, L = DIRECTIONS, self.d_inner, side * side
        x, z = self.in_proj(u).chunk(2, dim=-1)
        x = F.silu(self.conv(x.permute(0, 3, 1, 2))).flatten(2)  # (B, d, L)
        gather, merge = snake_cross_scan_indices(side, x.device)
        xs = x.index_select(-1, gather).view(batch, d, K, L).transpose(1, 2)  # (B, K, d, L)
        dt, B, C = torch.einsum("bkdl,kcd->bkcl", xs, self.x_proj_weight).split(
            [self.dt_rank, self.d_state, self.d_state], dim=2)
        delta = torch.einsum("bkrl,kdr->bkdl", dt, self.dt_proj_weight)
        dtype = torch.promote_types(x.dtype, torch.float32)
        y = selective_scan(xs.reshape(batch, K * d, L).to(dtype), delta.reshape(batch, K * d, L).to(dtype),
                           -torch.exp(self.A_log.to(dtype)), B.to(dtype), C.to(dtype), D=self.D.to(dtype),
                           delta_bias=self.dt_bias.reshape(-1).to(dtype), delta_softplus=True,
                           backend=self.backend)
        y = y.view(batch, K, d, L).transpose(1, 2).reshape(batch, d, K * L).index_select(-1, merge)
        y = y.view(batch, d, K, L).sum(2).transpose(1, 2)  # (B, L, d), raster order
        y = self.out_norm(y.to(self.out_norm.weight.dtype)).view(batch, side, side, d).to(u.dtype)
        return self.out_proj(y * F.silu(z))

"""The Mamba-1 mixer with conditioning through the SSM's initial state (DiMSUM, spec §5-§6.1).

Parameter names and shapes are those of the released checkpoints (``...mixer.in_proj.weight`` etc.), so the
released weights load as they are. ``cond_mode`` picks how the conditioning vector c enters:

- "initial_state" (the paper): h_{-1}[b, d, n] = cond_proj(c)[b, d], broadcast over the N state entries.
- "released": cond_proj exists (checkpoints carry it) but is frozen and unused, which is what the released
  kernels compute; conditioning then reaches the network only through adaLN.
- "none": no cond_proj at all.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dimsum.ssm.scan import BACKENDS, causal_conv1d, selective_scan

COND_MODES = ("initial_state", "released", "none")


class Mamba(nn.Module):
    """Mamba-1: in_proj -> causal conv -> selective scan (from a conditional initial state) -> out_proj."""

    def __init__(self, d_model: int, cond_dim: int, *, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_rank: int | str = "auto", cond_mode: str = "initial_state",
                 backend: str = "auto") -> None:
        super().__init__()
        if cond_mode not in COND_MODES:
            raise ValueError(f"cond_mode={cond_mode!r}: expected one of {COND_MODES}")
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r}: expected one of {BACKENDS}")
        if dt_rank != "auto" and not (isinstance(dt_rank, int) and dt_rank > 0):
            raise ValueError(f"dt_rank={dt_rank!r}: expected 'auto' or a positive integer")
        self.d_inner = expand * d_model
        self.d_state = d_state
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank
        self.cond_mode, self.backend = cond_mode, backend

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=False)
        # Holds the depthwise weights (default init); applied causally by causal_conv1d, never called.
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner)
        # S4D-real: A = -(1..N) per channel, stored as log so that A stays negative.
        A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A))
        self.D = nn.Parameter(torch.ones(self.d_inner))
        if cond_mode != "none":
            self.cond_proj = nn.Linear(cond_dim, self.d_inner)
            self.cond_proj.requires_grad_(cond_mode == "initial_state")
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)
        self._init_dt()

    @torch.no_grad()
    def _init_dt(self, dt_min: float = 1e-3, dt_max: float = 0.1, floor: float = 1e-4) -> None:
        """Mamba-1's init: steps log-uniform in [dt_min, dt_max], so softplus(dt_proj(.)) starts there."""
        std = self.dt_rank ** -0.5
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=floor)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus

    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, L, d_model), c (B, cond_dim) -> (B, L, d_model). c is needed only in "initial_state" mode."""
        xs, z = self.in_proj(x).transpose(1, 2).chunk(2, dim=1)  # (B, d_inner, L) each
        xs = causal_conv1d(xs, self.conv1d.weight.squeeze(1), self.conv1d.bias, "silu", self.backend)
        dt, B, C = self.x_proj(xs.transpose(1, 2)).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.linear(dt, self.dt_proj.weight).transpose(1, 2)  # the bias goes in as delta_bias (fp32)
        h0 = None
        if self.cond_mode == "initial_state":
            if c is None:
                raise ValueError("Mamba(cond_mode='initial_state') needs the conditioning c, got None")
            h0 = self.cond_proj(c).unsqueeze(-1).expand(-1, -1, self.d_state)
        y = selective_scan(xs, delta, -torch.exp(self.A_log), B.transpose(1, 2), C.transpose(1, 2),
                           D=self.D, z=z, delta_bias=self.dt_proj.bias, delta_softplus=True, h0=h0,
                           backend=self.backend)
        return self.out_proj(y.transpose(1, 2))

"""The sequential selective scan: one Python step per time step (in float64 when given float64, as the
tests do). Slow and plainly right, it is what the tests and benchmarks hold the fast backends against.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dimsum.ssm.recurrence import compute_dtype, prepare_delta, skip_and_gate


def _per_channel(t: Tensor, channels: int) -> Tensor:
    """B or C as (B, D, N, L) for grouped (B, G, N, L) input, (B, 1, N, L) for shared (B, N, L) input."""
    return t.unsqueeze(1) if t.dim() == 3 else t.repeat_interleave(channels // t.shape[1], dim=1)


def sequential_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, *, D: Tensor | None = None,
                    z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = False,
                    h0: Tensor | None = None) -> Tensor:
    """The reference: one Python step per time step, as mamba-ssm's ``selective_scan_ref``. That one builds
    exp(delta A) for all steps up front; doing it per step keeps this loop's autograd graph small and fast."""
    dtype = compute_dtype(u)
    delta = prepare_delta(delta, delta_bias, delta_softplus, dtype)
    A, x = A.to(dtype), u.to(dtype)
    B, C = (_per_channel(t.to(dtype), x.shape[1]) for t in (B, C))  # (B, D or 1, N, L)
    h = x.new_zeros(*x.shape[:2], A.shape[1]) if h0 is None else h0.to(dtype)
    ys = []
    for t in range(x.shape[-1]):
        dt = delta[:, :, t, None]
        h = torch.exp(dt * A) * h + dt * B[..., t] * x[:, :, t, None]
        ys.append((h * C[..., t]).sum(-1))
    return skip_and_gate(torch.stack(ys, dim=-1), x, D, z).to(u.dtype)

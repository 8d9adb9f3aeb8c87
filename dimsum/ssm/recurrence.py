"""The pieces of the selective-scan recurrence that every scan path shares (see ``scan.py`` for the maths):
the dtype policy, delta's bias and softplus, the D-skip and gate, the work-tensor budget, and the exact
closed-form h0 term that lets a kernel which only scans from zero start from any state.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

# Elements per (L, B, d, N) work tensor of the torch backend and of the h0 term: 2 MiB of float32 stays in
# cache on CPU (the fastest of 1-8 MiB, see benchmarks/scan.py --block-elements); GPUs want fewer, bigger
# launches.
CPU_BLOCK_ELEMENTS = 1 << 19
GPU_BLOCK_ELEMENTS = 1 << 24


def block_elements(device: torch.device) -> int:
    """The element budget of one work tensor on ``device`` (read at call time, so a benchmark can vary it)."""
    return CPU_BLOCK_ELEMENTS if device.type == "cpu" else GPU_BLOCK_ELEMENTS


def compute_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def prepare_delta(delta: Tensor, delta_bias: Tensor | None, delta_softplus: bool,
                  dtype: torch.dtype) -> Tensor:
    delta = delta.to(dtype)
    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype).unsqueeze(-1)
    return F.softplus(delta) if delta_softplus else delta


def skip_and_gate(y: Tensor, u: Tensor, D: Tensor | None, z: Tensor | None) -> Tensor:
    if D is not None:
        y = y + D.to(y.dtype).unsqueeze(-1) * u.to(y.dtype)
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y


def initial_state_correction(delta: Tensor, A: Tensor, C: Tensor, h0: Tensor) -> Tensor:
    """Exact contribution of h0 to C_t . h_t (before the D-skip and the gate), shape (B, D, L).

    Unrolling the recurrence, h0 reaches step t through prod_{s<=t} exp(delta_s A) = exp(A * cumsum(delta)),
    so y_t[d] gains sum_n C_t[n] exp(A[d, n] sum_{s<=t} delta_s[d]) h0[d, n]. ``delta`` is the value AFTER
    bias and softplus. The exponent is <= 0 for A < 0 and delta >= 0, so this never overflows.
    """
    return InitialStateTerm.apply(delta, None, False, A, C, h0, None)


def _softplus_grad(x: Tensor) -> Tensor:
    """d softplus / dx as F.softplus computes it (linear above its threshold 20), so gradients match."""
    return torch.where(x > 20, torch.ones_like(x), torch.sigmoid(x))


def _silu_grad(z: Tensor) -> Tensor:
    sig = torch.sigmoid(z)
    return sig * (1 + z * (1 - sig))


class InitialStateTerm(torch.autograd.Function):
    """The h0 term, gated: corr[b, d, l] * silu(z) with corr = sum_n C[b, n, l] exp(A[d, n] S[b, d, l])
    h0[b, d, n] and S = cumsum(delta) for delta after its bias and softplus.

    The (B, D, L, N) decay exp(A S) is the largest tensor of the layer (N times the activations), so it is
    never kept: both passes build it per channel block. Only the inputs are saved, which the scan kernel
    keeps anyway (raw delta, z), so the term adds O(B N L + B D N) to what backward holds; S, the softplus
    and the gate are recomputed. With E = exp(A S) and Q = g C E for the gradient g of corr: dh0 = sum_l Q,
    R = Q h0 gives dS = sum_n R A and dA = sum_{b,l} R S, and dC = sum_d g E h0.
    """

    @staticmethod
    def forward(ctx, delta: Tensor, delta_bias: Tensor | None, delta_softplus: bool,  # noqa: PLR0917
                A: Tensor, C: Tensor, h0: Tensor, z: Tensor | None) -> Tensor:
        ctx.delta_softplus = delta_softplus
        ctx.save_for_backward(delta, delta_bias, A, C, h0, z)
        dtype = compute_dtype(delta)
        S = prepare_delta(delta, delta_bias, delta_softplus, dtype).cumsum(-1)
        A, Ct, h0 = A.to(dtype), C.to(dtype).transpose(1, 2).unsqueeze(1), h0.to(dtype)  # Ct (B, 1, L, N)
        out = S.new_empty(S.shape)
        for s in InitialStateTerm._slices(S, A):
            decay = torch.exp(S[:, s, :, None] * A[None, s, None, :])
            out[:, s] = decay.mul_(h0[:, s, None, :]).mul_(Ct).sum(-1)
        return out if z is None else out.mul_(F.silu(z.to(dtype)))

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        delta, delta_bias, A_in, C_in, h0_in, z = ctx.saved_tensors
        dtype = compute_dtype(delta)
        with torch.autocast(delta.device.type, enabled=False):
            raw = delta.to(dtype) if delta_bias is None else delta.to(dtype) + delta_bias.to(dtype)[:, None]
            S = (F.softplus(raw) if ctx.delta_softplus else raw).cumsum(-1)
            A, Ct, h0 = A_in.to(dtype), C_in.to(dtype).transpose(1, 2).unsqueeze(1), h0_in.to(dtype)
            g = grad.to(dtype) if z is None else grad.to(dtype) * F.silu(z.to(dtype))
            corr = None if z is None else torch.empty_like(S)
            dS, dA, dh0 = torch.empty_like(S), torch.empty_like(A), torch.empty_like(h0)
            dCt = S.new_zeros(Ct.shape[0], Ct.shape[2], Ct.shape[3])  # (B, L, N)
            for s in InitialStateTerm._slices(S, A):
                decay = torch.exp(S[:, s, :, None] * A[None, s, None, :])
                if corr is not None:
                    corr[:, s] = (decay * h0[:, s, None, :]).mul_(Ct).sum(-1)
                decay.mul_(g[:, s, :, None])  # g E
                q = decay * Ct
                dh0[:, s] = q.sum(2)
                r = q.mul_(h0[:, s, None, :])
                dS[:, s] = (r * A[None, s, None, :]).sum(-1)
                dA[s] = r.mul_(S[:, s, :, None]).sum((0, 2))
                dCt += decay.mul_(h0[:, s, None, :]).sum(1)
            d_delta = dS.flip(-1).cumsum(-1).flip(-1)  # through S = cumsum(delta)
            if ctx.delta_softplus:
                d_delta = d_delta * _softplus_grad(raw)
            d_bias = None if delta_bias is None else d_delta.sum((0, 2)).to(delta_bias.dtype)
            dz = None if z is None else (grad.to(dtype) * corr * _silu_grad(z.to(dtype))).to(z.dtype)
        return (d_delta.to(delta.dtype), d_bias, None, dA.to(A_in.dtype), dCt.transpose(1, 2).to(C_in.dtype),
                dh0.to(h0_in.dtype), dz)

    @staticmethod
    def _slices(S: Tensor, A: Tensor) -> Iterator[slice]:
        batch, channels, length = S.shape
        budget = block_elements(S.device)
        size = min(channels, max(1, budget // (batch * length * A.shape[1])))
        return (slice(i, i + size) for i in range(0, channels, size))

"""Mamba-1 selective scan and causal depthwise conv behind one interface, with two backends.

Shapes follow mamba-ssm: u, delta, z (B, D, L); A (D, N); B, C (B, N, L); D (D,); h0 (B, D, N).
The recurrence (per channel d and state n), started from h_{-1} = h0 (zeros if None):

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t,    y_t = C_t . h_t + D * u_t,    y *= silu(z)

- "torch" runs anywhere. It is an odd-even (work-efficient, log-depth) scan of the linear recurrence
  h_t = a_t h_{t-1} + b_t wrapped in an autograd Function whose backward is the reverse-time scan of the
  same form, so there is no Python loop over time steps and autograd stores only a and h.
- "cuda" calls mamba-ssm's ``selective_scan_fn`` (which has no initial-state input) and adds the exact
  closed-form contribution of h0 (:func:`initial_state_correction`); the conv uses ``causal_conv1d_fn``.
  The CUDA packages are imported lazily, so CPU machines never import them.

SSMs are precision sensitive, so the maths runs in float32 (float64 stays float64) even under bf16
autocast, and the result is returned in u's dtype.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

BACKENDS = ("auto", "torch", "cuda")
ACTIVATIONS = (None, "silu")


# ----------------------------------------------------------------------------- shared pieces

def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _prepare_delta(delta: Tensor, delta_bias: Tensor | None, delta_softplus: bool, dtype: torch.dtype) -> Tensor:
    delta = delta.to(dtype)
    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype).unsqueeze(-1)
    return F.softplus(delta) if delta_softplus else delta


def _skip_and_gate(y: Tensor, u: Tensor, D: Tensor | None, z: Tensor | None) -> Tensor:
    if D is not None:
        y = y + D.to(y.dtype).unsqueeze(-1) * u.to(y.dtype)
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y


def sequential_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                    z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = False,
                    h0: Tensor | None = None) -> Tensor:
    """The reference: one Python step per time step (the form of mamba-ssm's ``selective_scan_ref``)."""
    dtype = _compute_dtype(u)
    delta = _prepare_delta(delta, delta_bias, delta_softplus, dtype)
    A, B, C, x = A.to(dtype), B.to(dtype), C.to(dtype), u.to(dtype)
    h = x.new_zeros(*x.shape[:2], A.shape[1]) if h0 is None else h0.to(dtype)
    ys = []
    for t in range(x.shape[-1]):
        dt = delta[:, :, t, None]
        h = torch.exp(dt * A) * h + dt * B[:, None, :, t] * x[:, :, t, None]
        ys.append((h * C[:, None, :, t]).sum(-1))
    return _skip_and_gate(torch.stack(ys, dim=-1), x, D, z).to(u.dtype)


def initial_state_correction(delta: Tensor, A: Tensor, C: Tensor, h0: Tensor) -> Tensor:
    """Exact contribution of h0 to C_t . h_t (before the D-skip and the gate), shape (B, D, L).

    Unrolling the recurrence, h0 reaches step t through prod_{s<=t} exp(delta_s A) = exp(A * cumsum(delta)),
    so y_t[d] gains sum_n C_t[n] exp(A[d, n] sum_{s<=t} delta_s[d]) h0[d, n]. ``delta`` is the value AFTER
    bias and softplus. The exponent is <= 0 for A < 0 and delta >= 0, so this never overflows.
    """
    dtype = _compute_dtype(delta)
    decay = torch.exp(delta.to(dtype).cumsum(-1).unsqueeze(-1) * A.to(dtype).unsqueeze(1))  # (B, D, L, N)
    return torch.einsum("bdln,bdn,bnl->bdl", decay, h0.to(dtype), C.to(dtype))


# ----------------------------------------------------------------------------- torch backend

def _linear_recurrence(a: Tensor, b: Tensor) -> Tensor:
    """h_t = a_t h_{t-1} + b_t with h_{-1} = 0, along dim -2, by odd-even reduction.

    Combining neighbours (2i, 2i+1) gives a recurrence of half the length over the odd steps; solve that
    recursively, then each even step is one multiply-add from the odd step before it. Total work is O(L),
    depth O(log L), and every factor is a product of the a_t themselves, so nothing is divided or exp'd.
    """
    n = a.shape[-2]
    if n == 1:
        return b
    a_even, a_odd = a[..., 0::2, :], a[..., 1::2, :]
    b_even, b_odd = b[..., 0::2, :], b[..., 1::2, :]
    pairs = n // 2
    h_odd = _linear_recurrence(a_odd * a_even[..., :pairs, :], torch.addcmul(b_odd, a_odd, b_even[..., :pairs, :]))
    h = torch.empty_like(b)
    h[..., 1::2, :] = h_odd
    h[..., 0:1, :] = b[..., 0:1, :]
    h[..., 2::2, :] = torch.addcmul(b_even[..., 1:, :], a_even[..., 1:, :], h_odd[..., : (n - 1) // 2, :])
    return h


class _LinearScan(torch.autograd.Function):
    """Autograd for h_t = a_t h_{t-1} + b_t (h_{-1} = h0), tensors (..., L, N).

    Backward is itself a linear recurrence run backwards in time: with g_t = dLoss/dh_t,
    lam_t = g_t + a_{t+1} lam_{t+1}; then dLoss/db_t = lam_t, dLoss/da_t = lam_t h_{t-1}, dLoss/dh0 = a_0 lam_0.
    """

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, h0: Tensor | None) -> Tensor:
        if h0 is not None:
            b = b.clone()
            b[..., 0, :] += a[..., 0, :] * h0
        h = _linear_recurrence(a, b)
        ctx.save_for_backward(a, h, h0)
        return h

    @staticmethod
    def backward(ctx, grad_h: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        a, h, h0 = ctx.saved_tensors
        # In reversed time, step r multiplies by a at original position L - r; the value at r = 0 multiplies
        # lam_L = 0, so it is irrelevant (zeros).
        a_next_reversed = torch.cat([torch.zeros_like(a[..., :1, :]), a[..., 1:, :].flip(-2)], dim=-2)
        lam = _linear_recurrence(a_next_reversed, grad_h.flip(-2)).flip(-2)
        h_prev = torch.cat([torch.zeros_like(h[..., :1, :]) if h0 is None else h0.unsqueeze(-2), h[..., :-1, :]],
                           dim=-2)
        grad_h0 = a[..., 0, :] * lam[..., 0, :] if h0 is not None else None
        return lam * h_prev, lam, grad_h0


def _torch_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, z: Tensor | None,
                delta_bias: Tensor | None, delta_softplus: bool, h0: Tensor | None) -> Tensor:
    dtype = _compute_dtype(u)
    with torch.autocast(u.device.type, enabled=False):
        delta = _prepare_delta(delta, delta_bias, delta_softplus, dtype)
        x = u.to(dtype)
        a = torch.exp(delta.unsqueeze(-1) * A.to(dtype).unsqueeze(1))  # (B, D, L, N)
        b = (delta * x).unsqueeze(-1) * B.to(dtype).transpose(1, 2).unsqueeze(1)  # (B, D, L, N)
        h = _LinearScan.apply(a, b, None if h0 is None else h0.to(dtype))
        y = (h * C.to(dtype).transpose(1, 2).unsqueeze(1)).sum(-1)
        return _skip_and_gate(y, x, D, z).to(u.dtype)


# ----------------------------------------------------------------------------- cuda backend

class _CudaKernels(NamedTuple):
    selective_scan_fn: Callable[..., Tensor] | None
    causal_conv1d_fn: Callable[..., Tensor] | None
    missing: str  # why the kernels are unavailable; "" when both imported


@functools.cache
def _cuda_kernels() -> _CudaKernels:
    """Import the CUDA kernels once. Only called for CUDA tensors, so CPU runs never import them."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except (ImportError, OSError) as e:
        return _CudaKernels(None, None, f"package 'mamba_ssm' failed to import ({type(e).__name__}: {e})")
    try:
        from causal_conv1d import causal_conv1d_fn
    except (ImportError, OSError) as e:
        return _CudaKernels(None, None, f"package 'causal_conv1d' failed to import ({type(e).__name__}: {e})")
    return _CudaKernels(selective_scan_fn, causal_conv1d_fn, "")


def _resolve_backend(backend: str, x: Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: expected one of {BACKENDS}")
    if backend == "torch" or (backend == "auto" and not x.is_cuda):
        return "torch"
    if not x.is_cuda:
        raise RuntimeError(f"backend='cuda' needs CUDA tensors, got a tensor on device '{x.device}'")
    missing = _cuda_kernels().missing
    if backend == "cuda" and missing:
        raise RuntimeError(f"backend='cuda' is unavailable: {missing}; install the 'cuda' extra or use "
                           f"backend='torch'")
    return "torch" if missing else "cuda"


def scan_with_zero_state_kernel(kernel: Callable[..., Tensor], u: Tensor, delta: Tensor, A: Tensor, B: Tensor,
                                C: Tensor, D: Tensor | None = None, z: Tensor | None = None,
                                delta_bias: Tensor | None = None, delta_softplus: bool = False,
                                h0: Tensor | None = None) -> Tensor:
    """Selective scan from h0 using a kernel that only scans from zero (mamba-ssm's ``selective_scan_fn``).

    The recurrence is linear in h, so the h0 term separates: y = (C.h_zero + corr + D u) silu(z), and the
    kernel already returns (C.h_zero + D u) silu(z), so we add corr * silu(z). ``kernel`` is a parameter so
    that this exact decomposition is tested on CPU with the torch zero-state scan in place of the CUDA one.
    """
    dtype = _compute_dtype(u)  # the kernel wants D and delta_bias in float32, as mamba-ssm's Mamba passes them
    y = kernel(u, delta, A, B, C, D=None if D is None else D.to(dtype), z=z,
               delta_bias=None if delta_bias is None else delta_bias.to(dtype), delta_softplus=delta_softplus)
    if h0 is None:
        return y
    with torch.autocast(u.device.type, enabled=False):
        corr = initial_state_correction(_prepare_delta(delta, delta_bias, delta_softplus, dtype), A, C, h0)
        if z is not None:
            corr = corr * F.silu(z.to(dtype))
        return (y.to(dtype) + corr).to(u.dtype)


# ----------------------------------------------------------------------------- public API

def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                   z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = False,
                   h0: Tensor | None = None, backend: str = "auto") -> Tensor:
    """Mamba-1 selective scan started from ``h0``; returns y (B, D, L) in u's dtype (see module docstring)."""
    if _resolve_backend(backend, u) == "cuda":
        return scan_with_zero_state_kernel(_cuda_kernels().selective_scan_fn, u, delta, A, B, C, D, z,
                                           delta_bias, delta_softplus, h0)
    return _torch_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, h0)


def causal_conv1d(x: Tensor, weight: Tensor, bias: Tensor | None = None, activation: str | None = None,
                  backend: str = "auto") -> Tensor:
    """Depthwise conv over time where output t sees inputs t-K+1..t only. x (B, D, L), weight (D, K)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r}: expected one of {ACTIVATIONS}")
    if _resolve_backend(backend, x) == "cuda":
        return _cuda_kernels().causal_conv1d_fn(x, weight, bias, activation=activation)
    width = weight.shape[-1]
    out = F.conv1d(x, weight.unsqueeze(1), bias, padding=width - 1, groups=x.shape[1])[..., : x.shape[-1]]
    return F.silu(out) if activation == "silu" else out

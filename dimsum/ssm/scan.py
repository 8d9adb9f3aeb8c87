"""Mamba-1 selective scan and causal depthwise conv behind one interface, with two backends.

Shapes follow mamba-ssm: u, delta, z (B, D, L); A (D, N); B, C (B, N, L); D (D,); h0 (B, D, N).
B and C may also be grouped, (B, G, N, L) with G dividing D: channel d reads group d // (D / G), as in
mamba-ssm's kernel (VMamba's SS2D scans its 4 directions as 4 groups in one call).
The recurrence (per channel d and state n), started from h_{-1} = h0 (zeros if None):

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t,    y_t = C_t . h_t + D * u_t,    y *= silu(z)

- "torch" runs anywhere. It solves the linear recurrence h_t = a_t h_{t-1} + b_t by an odd-even
  (work-efficient, log-depth) scan, in an autograd Function whose hand-written backward is the reverse-time
  scan of the same form. No Python loop over time steps; only the (B, D, L)-sized inputs are saved.
- "cuda" calls mamba-ssm's ``selective_scan_fn`` (which has no initial-state input) and adds the exact
  closed-form contribution of h0 (``recurrence.py``); the conv uses ``causal_conv1d_fn``.
  The CUDA packages are imported lazily, so CPU machines never import them.

SSMs are precision sensitive, so the maths runs in float32 (float64 stays float64) even under bf16
autocast, and the result is returned in u's dtype.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import warnings
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from dimsum.ssm.recurrence import (
    InitialStateTerm,
    block_elements,
    compute_dtype,
    prepare_delta,
    skip_and_gate,
)

BACKENDS = ("auto", "torch", "cuda")
ACTIVATIONS = (None, "silu")


# ----------------------------------------------------------------------------- torch backend

def _odd_even_scan_(a: Tensor, b: Tensor, reverse: bool = False) -> None:
    """In place, b <- h with h_t = a_t h_{t-1} + b_t (reverse: h_t = a_t h_{t+1} + b_t), zero beyond the ends.

    Time is dim 0. Folding each step into the one before it in scan order ("partner" into "out") leaves a
    recurrence of half the length over the out steps; solve it recursively, then every remaining step is
    one multiply-add from the out step before it. O(L) work, log2(L) levels, only products of the a_t (no
    division, no exp), so it is as stable as the loop. ``a`` is clobbered (left holding partial products).
    """
    n = b.shape[0]
    if n < 2:
        return
    odd = n % 2
    if reverse:
        out, partner, rest, before_rest = (slice(odd, n - 1, 2), slice(odd + 1, n, 2),
                                           slice(1 - odd, n - 1, 2), slice(2 - odd, n, 2))
    else:
        out, partner, rest, before_rest = (slice(1, n, 2), slice(0, n - 1, 2),
                                           slice(2, n, 2), slice(1, n - 1, 2))
    b[out].addcmul_(a[out], b[partner])
    a[out].mul_(a[partner])
    _odd_even_scan_(a[out], b[out], reverse)
    b[rest].addcmul_(a[rest], b[before_rest])


def _discretize(x: Tensor, delta: Tensor, A: Tensor, Bt: Tensor, h0: Tensor | None, *, a: Tensor,
                b: Tensor) -> None:
    """Into a, b (L, B, d, N): a_t = exp(delta_t A) and b_t = delta_t B_t x_t (+ a_0 h0 at t = 0)."""
    torch.mul(delta.unsqueeze(-1), A, out=a).exp_()
    torch.mul((delta * x).unsqueeze(-1), Bt.unsqueeze(2), out=b)
    if h0 is not None:
        b[0].addcmul_(a[0], h0)


def _state_dot(h: Tensor, v: Tensor) -> Tensor:
    """sum_n h[..., n] v[..., n]: (L, B, d, N) with (L, B, N) -> (L, B, d). With one state (LaMamba's
    d_state 1) a product, which is ~30x faster than the matmul of a (d, 1) by a (1, 1) matrix on CPU."""
    if h.shape[-1] == 1:
        return h[..., 0] * v
    return (h @ v.unsqueeze(-1)).squeeze(-1)


def _blocks(x: Tensor, state: int, per_channel: tuple[Tensor, ...], h0: Tensor | None,
            work: int) -> Iterator[tuple[slice, tuple[Tensor, ...], Tensor | None, tuple[Tensor, ...]]]:
    """Walk over channel blocks whose (L, B, d, N) tensors stay cache-sized; per block yield its slice, the
    contiguous (L, B, d) slices of ``per_channel``, the h0 slice and ``work`` contiguous (L, B, d, N) buffers.

    The buffers are allocated once and reused by every block: fresh multi-MiB tensors per block would be
    returned to the OS on free and page-faulted in again, which costs more than the arithmetic on them.
    """
    length, batch, channels = x.shape
    budget = block_elements(x.device)
    size = min(channels, max(1, budget // (length * batch * state)))
    buffers = x.new_empty(work, length * batch * size * state)
    for i in range(0, channels, size):
        s, d = slice(i, i + size), min(size, channels - i)
        views = tuple(buf[: length * batch * d * state].view(length, batch, d, state) for buf in buffers)
        yield s, tuple(t[:, :, s].contiguous() for t in per_channel), None if h0 is None else h0[:, s], views


class _SelectiveScanFn(torch.autograd.Function):
    """y_t = C_t . h_t for the recurrence of the module docstring, time-major: x, delta, y (L, B, D);
    A (D, N); Bt, Ct (L, B, N); h0 (B, D, N) or None.

    Channels are independent, so both passes walk over channel blocks, which keeps the (L, B, d, N) states
    in cache and never materialises them for the whole layer. Backward recomputes the states (as mamba-ssm's
    kernel does) instead of saving them, and gets lam_t = dLoss/dh_t from the reverse-time recurrence of
    the same form: with g_t = dy_t C_t and mu_t = a_t lam_t, mu_t = a_t mu_{t+1} + a_t g_t and
    lam_t = g_t + mu_{t+1}.
    """

    @staticmethod
    def forward(ctx, x: Tensor, delta: Tensor, A: Tensor, Bt: Tensor,  # noqa: PLR0917 (apply is positional)
                Ct: Tensor, h0: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, delta, A, Bt, Ct, h0)
        y = torch.empty_like(x)
        for s, (xs, ds), h0s, (a, h) in _blocks(x, A.shape[1], (x, delta), h0, work=2):
            _discretize(xs, ds, A[s], Bt, h0s, a=a, b=h)
            _odd_even_scan_(a, h)
            y[:, :, s] = _state_dot(h, Ct)
        return y

    @staticmethod
    def backward(ctx, dy: Tensor) -> tuple[Tensor, ...]:
        x, delta, A, Bt, Ct, h0 = ctx.saved_tensors
        dx, ddelta, dA = torch.empty_like(x), torch.empty_like(delta), torch.empty_like(A)
        dBt, dCt = torch.zeros_like(Bt), torch.zeros_like(Ct)
        dh0 = None if h0 is None else torch.empty_like(h0)
        c_dot_b = (Ct * Bt).sum(-1, keepdim=True)
        with torch.autocast(x.device.type, enabled=False):
            blocks = _blocks(x, A.shape[1], (x, delta, dy), h0, work=4)
            for s, (xs, ds, dys), h0s, (a, h, mu, spare) in blocks:
                _discretize(xs, ds, A[s], Bt, h0s, a=a, b=h)
                torch.mul(dys.unsqueeze(-1), Ct.unsqueeze(2), out=mu).mul_(a)  # a_t g_t
                _odd_even_scan_(spare.copy_(a), h)
                _odd_even_scan_(a, mu, reverse=True)
                if dh0 is not None:
                    dh0[:, s] = mu[0]
                dCt += (dys.unsqueeze(-2) @ h).squeeze(-2)
                # dLoss/db_t = lam_t = g_t + mu_{t+1}, contracted with B_t over n and with delta_t x_t over d;
                # the g_t = dy_t C_t part of both contractions factorises, so lam is never formed.
                delta_x = ds * xs
                d_delta_x = dys * c_dot_b
                d_delta_x[:-1].add_(_state_dot(mu[1:], Bt[:-1]))
                dBt.addcmul_(Ct, (delta_x * dys).sum(-1, keepdim=True))
                dBt[:-1].add_((delta_x[:-1].unsqueeze(-2) @ mu[1:]).squeeze(-2))
                d_log_a = mu  # dLoss/d(delta_t A) = dLoss/da_t a_t = mu_t h_{t-1}
                d_log_a[1:].mul_(h[:-1])
                d_log_a[0].mul_(0 if h0s is None else h0s)
                ddelta[:, :, s] = torch.mul(d_log_a, A[s], out=spare).sum(-1) + d_delta_x * xs
                dx[:, :, s] = d_delta_x * ds
                dA[s] = torch.mul(d_log_a, ds.unsqueeze(-1), out=spare).sum((0, 1))
        return dx, ddelta, dA, dBt, dCt, dh0


def _time_major(t: Tensor) -> Tensor:
    return t.permute(2, 0, 1).contiguous()


def _scan_groups(x: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, *, h0: Tensor | None) -> Tensor:
    """C_t . h_t (B, D, L); grouped B/C run one scan per group of D / G channels."""
    if B.dim() == 3:
        y = _SelectiveScanFn.apply(_time_major(x), _time_major(delta), A, _time_major(B), _time_major(C), h0)
        return y.permute(1, 2, 0)
    size = x.shape[1] // B.shape[1]
    groups = [slice(i, i + size) for i in range(0, x.shape[1], size)]
    ys = [_SelectiveScanFn.apply(_time_major(x[:, s]), _time_major(delta[:, s]), A[s], _time_major(B[:, g]),
                                 _time_major(C[:, g]), None) for g, s in enumerate(groups)]
    return torch.cat(ys, dim=-1).permute(1, 2, 0)


def _torch_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, *, D: Tensor | None,
                z: Tensor | None, delta_bias: Tensor | None, delta_softplus: bool,
                h0: Tensor | None) -> Tensor:
    dtype = compute_dtype(u)
    with torch.autocast(u.device.type, enabled=False):
        delta = prepare_delta(delta, delta_bias, delta_softplus, dtype)
        x = u.to(dtype)
        y = _scan_groups(x, delta, A.to(dtype), B.to(dtype), C.to(dtype),
                         h0=None if h0 is None else h0.to(dtype))
        return skip_and_gate(y, x, D, z).to(u.dtype).contiguous()


# ----------------------------------------------------------------------------- cuda backend

class _CudaKernels(NamedTuple):
    selective_scan_fn: Callable[..., Tensor] | None
    causal_conv1d_fn: Callable[..., Tensor] | None
    missing: str  # why the kernels are unavailable; "" when both loaded


# The compiled extensions behind the Python interfaces. The packages can import without them (mamba-ssm's
# unreleased main no longer builds selective_scan_cuda by default), so the probe loads the extensions.
_KERNEL_MODULES = (("mamba_ssm", "selective_scan_cuda"), ("causal_conv1d", "causal_conv1d_cuda"))
_emulated: _CudaKernels | None = None


@functools.cache
def _cuda_kernels() -> _CudaKernels:
    """Load the compiled kernels once. Only called for CUDA tensors, so CPU runs never import them."""
    if _emulated is not None:
        return _emulated
    for package, extension in _KERNEL_MODULES:
        try:
            importlib.import_module(extension)
        except (ImportError, OSError) as e:
            return _CudaKernels(None, None, f"the compiled extension '{extension}' of package '{package}' "
                                            f"failed to load ({type(e).__name__}: {e})")
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except (ImportError, OSError) as e:
        return _CudaKernels(None, None, f"package 'mamba_ssm' failed to import ({type(e).__name__}: {e})")
    try:
        from causal_conv1d import causal_conv1d_fn
    except (ImportError, OSError) as e:
        return _CudaKernels(None, None, f"package 'causal_conv1d' failed to import ({type(e).__name__}: {e})")
    return _CudaKernels(selective_scan_fn, causal_conv1d_fn, "")


@functools.cache
def _warn_torch_fallback(missing: str) -> None:
    warnings.warn(f"backend='auto' on CUDA runs the pure-PyTorch scan because {missing}. It is launch-bound "
                  f"(thousands of small kernels per Mamba call, against one fused kernel), so expect much "
                  f"slower steps (benchmarks/gpu_check.py measures both); install the 'cuda' extra (README, "
                  f"GPU) or set the backend to 'torch' to silence this", RuntimeWarning, stacklevel=3)


def _resolve_backend(backend: str, x: Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: expected one of {BACKENDS}")
    if backend == "torch":
        return "torch"
    if _emulated is not None:
        return "cuda"
    if backend == "auto" and not x.is_cuda:
        return "torch"
    if not x.is_cuda:
        raise RuntimeError(f"backend='cuda' needs CUDA tensors, got a tensor on device '{x.device}'")
    missing = _cuda_kernels().missing
    if backend == "cuda" and missing:
        raise RuntimeError(f"backend='cuda' is unavailable: {missing}; install the 'cuda' extra or use "
                           f"backend='torch'")
    if missing:
        _warn_torch_fallback(missing)
    return "torch" if missing else "cuda"


@contextlib.contextmanager
def emulated_kernels(selective_scan_fn: Callable[..., Tensor] | None = None,
                     causal_conv1d_fn: Callable[..., Tensor] | None = None) -> Iterator[None]:
    """Run the "auto"/"cuda" backends through the cuda backend's code path on any device, with stand-ins for
    the compiled kernels (by default the torch zero-state scan and conv, which have their signatures).

    For CPU checks of what the GPU path computes and keeps for backward: the tests and the activation-memory
    estimate of ``benchmarks/trainer.py``. Not thread-safe; restores the real probe on exit.
    """
    global _emulated  # noqa: PLW0603 (one switch for the whole module, undone on exit)
    previous = _emulated
    _emulated = _CudaKernels(selective_scan_fn or functools.partial(selective_scan, backend="torch"),
                             causal_conv1d_fn or functools.partial(causal_conv1d, backend="torch"), "")
    _cuda_kernels.cache_clear()
    try:
        yield
    finally:
        _emulated = previous
        _cuda_kernels.cache_clear()


def scan_with_zero_state_kernel(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, *,
                                kernel: Callable[..., Tensor], D: Tensor | None = None,
                                z: Tensor | None = None, delta_bias: Tensor | None = None,
                                delta_softplus: bool = False, h0: Tensor | None = None) -> Tensor:
    """Selective scan from h0 using a kernel that only scans from zero (mamba-ssm's ``selective_scan_fn``).

    The recurrence is linear in h, so the h0 term separates: y = (C.h_zero + corr + D u) silu(z), and the
    kernel already returns (C.h_zero + D u) silu(z), so we add corr * silu(z). ``kernel`` is a parameter so
    that this exact decomposition is tested on CPU with the torch zero-state scan in place of the CUDA one.
    """
    dtype = compute_dtype(u)  # the kernel wants A, D and delta_bias in float32, as mamba-ssm's Mamba passes
    y = kernel(u, delta, A.to(dtype), B, C, D=None if D is None else D.to(dtype), z=z,
               delta_bias=None if delta_bias is None else delta_bias.to(dtype), delta_softplus=delta_softplus)
    if h0 is None:
        return y
    with torch.autocast(u.device.type, enabled=False):
        corr = InitialStateTerm.apply(delta, delta_bias, delta_softplus, A, C, h0, z)
        return (y.to(dtype) + corr).to(u.dtype)


# ----------------------------------------------------------------------------- public API

def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, *, D: Tensor | None = None,
                   z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = False,
                   h0: Tensor | None = None, backend: str = "auto") -> Tensor:
    """Mamba-1 selective scan started from ``h0``; returns y (B, D, L) in u's dtype (see module docstring)."""
    _check_groups(u, B, C, h0)
    options = dict(D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus, h0=h0)
    if _resolve_backend(backend, u) == "cuda":
        kernel = _cuda_kernels().selective_scan_fn
        return scan_with_zero_state_kernel(u, delta, A, B, C, kernel=kernel, **options)
    return _torch_scan(u, delta, A, B, C, **options)


def _check_groups(u: Tensor, B: Tensor, C: Tensor, h0: Tensor | None) -> None:
    if B.dim() != C.dim() or B.dim() not in (3, 4) or (B.dim() == 4 and B.shape[1] != C.shape[1]):
        raise ValueError(f"B {tuple(B.shape)} and C {tuple(C.shape)}: expected both (B, N, L) or both "
                         f"(B, G, N, L) with the same G")
    if B.dim() == 4 and u.shape[1] % B.shape[1]:
        raise ValueError(f"{B.shape[1]} groups of B/C do not divide the {u.shape[1]} channels of u")
    if B.dim() == 4 and h0 is not None:  # the cuda path's closed-form h0 term takes shared C only
        raise ValueError("grouped B/C with an initial state h0 is not supported")


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

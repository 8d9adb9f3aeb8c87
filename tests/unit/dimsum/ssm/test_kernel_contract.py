"""Our cuda backend through the real upstream Python interfaces, on CPU.

mamba-ssm's ``selective_scan_interface`` and causal-conv1d's ``causal_conv1d_interface`` (the pinned
releases, installed without their CUDA builds) run as shipped; only their compiled extensions,
``selective_scan_cuda`` and ``causal_conv1d_cuda``, are replaced by stand-ins. The stand-ins check what the
kernels' C++ entry points check (csrc/selective_scan/selective_scan.cpp, csrc/causal_conv1d.cpp at those
tags): dtypes, shapes, unit last strides, the channel-last rules, except ``is_cuda``. They compute with our
reference loop (``sequential_scan``) and the torch conv, so a wiring mistake shows up as a contract error or
a wrong value here instead of on the first GPU run.

Two upstream imports cannot run on CPU and are bypassed, nothing else: the ``mamba_ssm`` package
``__init__`` (it imports Mamba2/Mamba3 and the LM head, which need triton, tilelang, quack-kernels and
transformers), so the package is entered as a bare namespace over its installed files; and
``mamba_ssm.ops.triton.layer_norm`` (a Triton kernel used only by ``mamba_inner_fn``'s fused norm, which we
never call), replaced by a module whose function raises.
"""

from __future__ import annotations

import collections
import importlib
import importlib.metadata
import importlib.util
import math
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from dimsum.ssm import scan
from dimsum.ssm.mamba import Mamba
from dimsum.ssm.reference import sequential_scan

PINNED = {"mamba-ssm": "2.3.2.post1", "causal-conv1d": "1.7.0"}
INPUT_TYPES = (torch.float32, torch.float16, torch.bfloat16)
CALLS: collections.Counter[str] = collections.Counter()  # stand-in entry points reached


class ContractError(AssertionError):
    pass


def require(ok: bool, what: str) -> None:
    if not ok:
        raise ContractError(what)


def unit_last_stride(t: torch.Tensor) -> bool:
    return t.stride(-1) == 1 or t.size(-1) == 1


# ----------------------------------------------------------------------------- selective_scan_cuda

def _check_scan(u, delta, A, B, C, D, z, delta_bias) -> None:
    itype = u.dtype
    require(itype in INPUT_TYPES, f"u dtype {itype}")
    require(A.dtype in (torch.float32, torch.complex64), f"A dtype {A.dtype}")
    batch, dim, length = u.shape
    state = A.shape[1]
    require(state <= 256, "state dimension <= 256")
    require(delta.dtype == itype, f"delta dtype {delta.dtype} != u dtype {itype}")
    require(tuple(delta.shape) == (batch, dim, length) and tuple(A.shape) == (dim, state), "u/delta/A shapes")
    require(unit_last_stride(u) and unit_last_stride(delta), "u, delta need stride(-1) == 1")
    for name, t in (("B", B), ("C", C)):
        require(t.dim() == 4, f"{name} must be variable (B, G, N, L) here")
        require(t.dtype == itype, f"{name} dtype {t.dtype} != u dtype {itype}")
        require(tuple(t.shape) == (batch, t.shape[1], state, length), f"{name} shape {tuple(t.shape)}")
        require(unit_last_stride(t), f"{name} needs stride(-1) == 1")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None:
            require(t.dtype == torch.float32, f"{name} must be float32, got {t.dtype}")
            require(tuple(t.shape) == (dim,) and unit_last_stride(t), f"{name} shape/stride")
    if z is not None:
        require(z.dtype == itype and tuple(z.shape) == (batch, dim, length) and unit_last_stride(z), "z")


def _scan_reference(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    return sequential_scan(u, delta, A, B[:, 0], C[:, 0], D=D, z=z, delta_bias=delta_bias,
                           delta_softplus=delta_softplus)


def scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    CALLS["scan_fwd"] += 1
    _check_scan(u, delta, A, B, C, D, z, delta_bias)
    batch, dim, length = u.shape
    n_chunks = math.ceil(length / 2048)
    out = _scan_reference(u, delta, A, B, C, D, None, delta_bias, delta_softplus).to(delta.dtype)
    chunk_states = torch.full((batch, dim, n_chunks, 2 * A.shape[1]), math.nan, dtype=A.dtype)
    if z is None:
        return [out, chunk_states]
    return [out, chunk_states, _scan_reference(u, delta, A, B, C, D, z, delta_bias, delta_softplus)]


def scan_bwd(u, delta, A, B, C, D, z, delta_bias, dout, x, out, dz, delta_softplus,
             recompute_out_z):
    CALLS["scan_bwd"] += 1
    _check_scan(u, delta, A, B, C, D, z, delta_bias)
    require(dout.dtype == u.dtype and dout.shape == u.shape and unit_last_stride(dout), "dout")
    if z is not None:
        require(out is not None and out.dtype == u.dtype and out.shape == u.shape and unit_last_stride(out),
                "out (needed with z)")
    require(x is not None or math.ceil(u.shape[-1] / 2048) == 1, "chunk states needed above 2048 steps")
    if x is not None:
        require(x.dtype == A.dtype and x.is_contiguous(), "chunk states dtype/contiguity")
    inputs = [u, delta, A, B, C, D, z, delta_bias]
    leaves = [None if t is None else t.detach().float().requires_grad_() for t in inputs]
    with torch.enable_grad():
        y = _scan_reference(*leaves, delta_softplus)
        present = [t for t in leaves if t is not None]
        grads = iter(torch.autograd.grad(y, present, dout.float()))
    du, ddelta, dA, dB, dC, dD, dz_, ddelta_bias = [None if t is None else next(grads) for t in leaves]
    result = [du.to(u.dtype), ddelta.to(delta.dtype), dA, dB.to(B.dtype), dC.to(C.dtype), dD, ddelta_bias]
    return result + ([dz_.to(z.dtype)] if z is not None else [])


# ----------------------------------------------------------------------------- causal_conv1d_cuda

def _check_conv(x, weight, bias, seq_idx, initial_states) -> bool:
    """Returns whether x is channel-last (the kernel picks its layout from x's strides)."""
    require(x.dtype in INPUT_TYPES and weight.dtype in INPUT_TYPES, "x/weight dtype")
    dim, width = x.shape[1], weight.shape[1]
    require(tuple(weight.shape) == (dim, width) and 2 <= width <= 4, "weight (dim, width), width 2..4")
    require(x.stride(2) == 1 or x.stride(1) == 1, "x must be contiguous over time or over channels")
    channel_last = x.stride(1) == 1 and x.stride(2) > 1
    if channel_last:
        require(dim % 8 == 0, "channel-last x needs dim % 8 == 0")
        require(x.stride(2) % 8 == 0 and x.stride(0) % 8 == 0, "channel-last x needs strides % 8 == 0")
    if bias is not None:
        require(bias.dtype == weight.dtype, f"bias dtype {bias.dtype} != weight dtype {weight.dtype}")
        require(tuple(bias.shape) == (dim,) and bias.stride(-1) == 1, "bias shape/stride")
    require(seq_idx is None and initial_states is None, "seq_idx/initial_states are not used by us")
    return channel_last


def _conv_reference(x, weight, bias, silu):
    return scan.causal_conv1d(x, weight, bias, "silu" if silu else None, backend="torch")


def conv_fwd(x, weight, bias, seq_idx, initial_states, out, final_states_out, silu):
    CALLS["conv_fwd"] += 1
    _check_conv(x, weight, bias, seq_idx, initial_states)
    require(out.shape == x.shape and out.dtype == x.dtype and final_states_out is None, "out")
    out.copy_(_conv_reference(x.float(), weight.float(), None if bias is None else bias.float(), silu))


def conv_bwd(x, weight, bias, dout, seq_idx, initial_states, dfinal_states, dx, dweight,
             dbias, dinitial_states, silu):
    CALLS["conv_bwd"] += 1
    channel_last = _check_conv(x, weight, bias, seq_idx, initial_states)
    require((bias is None) == (dbias is None), "bias and dbias go together")
    require(dout.shape == x.shape and dx.shape == x.shape and dx.dtype == x.dtype, "dout/dx")
    require(dx.stride(1 if channel_last else 2) == 1, "dx layout must follow x's")
    require(dweight.dtype == torch.float32 and (dbias is None or dbias.dtype == torch.float32), "fp32 grads")
    # Runs inside a torch.library custom op, below autograd: the conv's gradients are spelled out.
    xf, wf = x.float(), weight.float()[:, None]
    dim, width = weight.shape
    pre = F.conv1d(xf, wf, None if bias is None else bias.float(), padding=width - 1, groups=dim)
    g = F.pad(dout.float(), (0, width - 1))  # outputs past the end are cut off by the causal conv
    if silu:
        g = g * torch.sigmoid(pre) * (1 + pre * (1 - torch.sigmoid(pre)))
    dx.copy_(torch.nn.grad.conv1d_input(xf.shape, wf, g, padding=width - 1, groups=dim))
    dweight.add_(torch.nn.grad.conv1d_weight(xf, wf.shape, g, padding=width - 1, groups=dim)[:, 0])
    if dbias is not None:
        dbias.add_(g.sum((0, 2)))


def conv_update(*args, **kwargs):
    raise ContractError("causal_conv1d_update (decoding) is not used by us")


# ----------------------------------------------------------------------------- loading upstream

def _layer_norm_unused(*args, **kwargs):
    raise ContractError("mamba_inner_fn's Triton norm is not used by us")


@pytest.fixture(scope="module")
def upstream():
    """The real interface modules, imported with the stand-in extensions in sys.modules."""
    for dist, version in PINNED.items():
        assert importlib.metadata.version(dist) == version, f"{dist} must be {version} (pyproject cuda extra)"
    spec = importlib.util.find_spec("mamba_ssm")
    assert spec is not None and spec.submodule_search_locations
    package = types.ModuleType("mamba_ssm")
    package.__path__ = list(spec.submodule_search_locations)
    stand_ins = {
        "selective_scan_cuda": {"fwd": scan_fwd, "bwd": scan_bwd},
        "causal_conv1d_cuda": {"causal_conv1d_fwd": conv_fwd, "causal_conv1d_bwd": conv_bwd,
                               "causal_conv1d_update": conv_update},
        "mamba_ssm.ops.triton.layer_norm": {"_layer_norm_fwd": _layer_norm_unused},
    }
    with pytest.MonkeyPatch.context() as mp:
        for name in [m for m in sys.modules if m.split(".")[0] in ("mamba_ssm", "causal_conv1d")]:
            mp.delitem(sys.modules, name)
        mp.setitem(sys.modules, "mamba_ssm", package)
        for name, attributes in stand_ins.items():
            module = types.ModuleType(name)
            module.__dict__.update(attributes)
            mp.setitem(sys.modules, name, module)
        ssi = importlib.import_module("mamba_ssm.ops.selective_scan_interface")
        cci = importlib.import_module("causal_conv1d.causal_conv1d_interface")
        assert ssi.__file__.startswith(package.__path__[0])  # the shipped file, not a copy
        yield types.SimpleNamespace(selective_scan_fn=ssi.selective_scan_fn,
                                    causal_conv1d_fn=cci.causal_conv1d_fn)


def run_mixer(mixer: Mamba, x: torch.Tensor, c: torch.Tensor, bf16: bool):
    for p in mixer.parameters():
        p.grad = None
    leaf = x.detach().clone().requires_grad_()
    with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        y = mixer(leaf, c)
    y.float().pow(2).sum().backward()
    grads = {n: p.grad.clone() for n, p in mixer.named_parameters() if p.grad is not None}
    return y.detach().float(), grads, leaf.grad.clone()


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-autocast"])
def test_mamba_through_the_upstream_interfaces_matches_the_torch_backend(upstream, bf16: bool) -> None:
    """The wiring the GPU runs: dtypes, layouts (the conv sees a channel-last view) and the h0 term."""
    torch.manual_seed(0)
    mixer = Mamba(16, 8, d_state=8)  # d_inner 32: channel-last conv needs a multiple of 8
    x, c = torch.randn(2, 12, 16), torch.randn(2, 8)
    reference = run_mixer(mixer, x, c, bf16)
    CALLS.clear()
    with scan.emulated_kernels(upstream.selective_scan_fn, upstream.causal_conv1d_fn):
        through_kernels = run_mixer(mixer, x, c, bf16)
    assert CALLS == {"scan_fwd": 1, "scan_bwd": 1, "conv_fwd": 1, "conv_bwd": 1}
    tol = {"atol": 3e-2, "rtol": 3e-2} if bf16 else {"atol": 1e-5, "rtol": 1e-4}
    torch.testing.assert_close(through_kernels[0], reference[0], **tol)
    torch.testing.assert_close(through_kernels[2], reference[2], **tol)
    assert through_kernels[1].keys() == reference[1].keys() and "cond_proj.weight" in reference[1]
    for name, grad in reference[1].items():
        torch.testing.assert_close(through_kernels[1][name], grad, **tol, msg=lambda m, n=name: f"{n}: {m}")


def test_the_stand_ins_enforce_the_kernel_contract(upstream) -> None:
    """What the real kernels reject, the stand-ins reject too (so the test above can fail)."""
    g = torch.Generator().manual_seed(0)
    u, delta, z = (torch.randn(1, 8, 6, generator=g) for _ in range(3))
    A = -torch.rand(8, 4, generator=g)
    B, C = torch.randn(1, 4, 6, generator=g), torch.randn(1, 4, 6, generator=g)
    upstream.selective_scan_fn(u, delta, A, B, C, z=z, delta_bias=torch.zeros(8), delta_softplus=True)
    with pytest.raises(ContractError, match="delta_bias must be float32"):
        upstream.selective_scan_fn(u.bfloat16(), delta.bfloat16(), A, B.bfloat16(), C.bfloat16(),
                                   delta_bias=torch.zeros(8, dtype=torch.bfloat16))
    with pytest.raises(ContractError, match="A dtype"):
        upstream.selective_scan_fn(u, delta, A.bfloat16(), B, C)
    with pytest.raises(ContractError, match="u dtype"):
        upstream.selective_scan_fn(u.double(), delta.double(), A, B.double(), C.double())
    weight = torch.randn(8, 4, generator=g)
    with pytest.raises(ContractError, match="bias dtype"):
        upstream.causal_conv1d_fn(u, weight, torch.zeros(8, dtype=torch.bfloat16), activation="silu")
    odd = torch.randn(1, 6, 5, generator=g).transpose(1, 2)  # (1, 5, 6) channel-last with 5 channels
    with pytest.raises(ContractError, match="dim % 8"):
        upstream.causal_conv1d_fn(odd, torch.randn(5, 4, generator=g))
    expected = F.silu(F.conv1d(F.pad(u, (3, 0)), weight.unsqueeze(1), groups=8))
    torch.testing.assert_close(upstream.causal_conv1d_fn(u, weight, activation="silu"), expected)

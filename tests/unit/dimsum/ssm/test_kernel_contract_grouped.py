"""SS2D's grouped selective-scan call through the real mamba-ssm Python interface, on CPU.

mamba-ssm's ``selective_scan_interface`` (the installed release, without its CUDA build) runs as shipped;
only its compiled extension ``selective_scan_cuda`` is replaced by a stand-in that checks what the kernel's
C++ entry point checks for this call (csrc/selective_scan/selective_scan.cpp): u/delta/B/C of one input
dtype, A/D/delta_bias float32, B and C variable (batch, G, N, L) with G dividing the channels, unit last
strides. It computes with our sequential loop, group by group, so a wrong layout (directions not
direction-major, groups not matching B/C) is a wrong value here instead of on the first GPU run.

Two upstream imports cannot run on CPU and are bypassed: the ``mamba_ssm`` package ``__init__`` (Mamba2
and the LM head need triton and more), entered as a bare namespace over its installed files, and the
Triton layer norm, replaced by a module whose function raises. (The same approach as the kernel contract
tests of issue 10; merge the two fixtures when both are in.)
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

import pytest
import torch

from dimsum.ssm import scan
from dimsum.ssm.reference import sequential_scan
from dimsum.ssm.ss2d import SS2D

CALLS: list[str] = []


class ContractError(AssertionError):
    pass


def require(ok: bool, what: str) -> None:
    if not ok:
        raise ContractError(what)


def _check(u, delta, A, B, C, D, z, delta_bias) -> None:  # noqa: PLR0917 (the kernel's signature)
    require(u.dtype in (torch.float32, torch.float16, torch.bfloat16), f"u dtype {u.dtype}")
    require(A.dtype == torch.float32, f"A dtype {A.dtype}")
    batch, dim, length = u.shape
    require(delta.shape == u.shape and delta.dtype == u.dtype, "delta shape/dtype")
    require(u.stride(-1) == 1 and delta.stride(-1) == 1, "u, delta need stride(-1) == 1")
    for name, t in (("B", B), ("C", C)):
        require(t.dim() == 4 and t.dtype == u.dtype and t.stride(-1) == 1,
                f"{name} {tuple(t.shape)} {t.dtype}: expected variable (B, G, N, L) of u's dtype")
        require(tuple(t.shape) == (batch, t.shape[1], A.shape[1], length), f"{name} shape {tuple(t.shape)}")
        require(dim % t.shape[1] == 0, f"{name}: {t.shape[1]} groups do not divide {dim} channels")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        require(t is None or (t.dtype == torch.float32 and tuple(t.shape) == (dim,)), f"{name}")
    require(z is None, "SS2D passes no z to the scan")


def _reference(u, delta, A, B, C, D, delta_bias, delta_softplus):  # noqa: PLR0917
    """mamba-ssm's grouping: channel d reads group d // (D / G)."""
    size = u.shape[1] // B.shape[1]
    outs = []
    for g in range(B.shape[1]):
        s = slice(g * size, (g + 1) * size)
        outs.append(sequential_scan(u[:, s], delta[:, s], A[s], B[:, g], C[:, g],
                                    D=None if D is None else D[s],
                                    delta_bias=None if delta_bias is None else delta_bias[s],
                                    delta_softplus=delta_softplus))
    return torch.cat(outs, dim=1)


def scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus):  # noqa: PLR0917
    CALLS.append("fwd")
    _check(u, delta, A, B, C, D, z, delta_bias)
    out = _reference(u, delta, A, B, C, D, delta_bias, delta_softplus).to(u.dtype)
    return [out, torch.full((*u.shape[:2], 1, 2 * A.shape[1]), float("nan"))]


def scan_bwd(u, delta, A, B, C, D, z, delta_bias, dout, x, out, dz, delta_softplus,  # noqa: PLR0917
             recompute_out_z):
    CALLS.append("bwd")
    _check(u, delta, A, B, C, D, z, delta_bias)
    inputs = (u, delta, A, B, C, D, delta_bias)
    leaves = [None if t is None else t.detach().float().requires_grad_() for t in inputs]
    with torch.enable_grad():
        y = _reference(*leaves, delta_softplus)
        grads = iter(torch.autograd.grad(y, [t for t in leaves if t is not None], dout.float()))
    du, ddelta, dA, dB, dC, dD, dbias = [None if t is None else next(grads) for t in leaves]
    return [du.to(u.dtype), ddelta.to(u.dtype), dA, dB.to(B.dtype), dC.to(C.dtype), dD, dbias]


@pytest.fixture
def upstream_scan(monkeypatch):
    """The shipped ``selective_scan_fn`` over the stand-in extension; restores sys.modules afterwards."""
    spec = importlib.util.find_spec("mamba_ssm")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("mamba-ssm's Python sources are not installed (the cuda extra)")
    package = types.ModuleType("mamba_ssm")
    package.__path__ = list(spec.submodule_search_locations)
    for name in [m for m in sys.modules if m.split(".")[0] == "mamba_ssm"]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "mamba_ssm", package)
    stand_ins = {"selective_scan_cuda": {"fwd": scan_fwd, "bwd": scan_bwd},
                 "mamba_ssm.ops.triton.layer_norm": {"_layer_norm_fwd": None}}
    for name, attributes in stand_ins.items():
        module = types.ModuleType(name)
        module.__dict__.update(attributes)
        monkeypatch.setitem(sys.modules, name, module)
    interface = importlib.import_module("mamba_ssm.ops.selective_scan_interface")
    assert interface.__file__.startswith(package.__path__[0])  # the shipped file, not a copy
    return interface.selective_scan_fn


def test_ss2d_grouped_call_through_the_upstream_interface_matches_the_torch_backend(upstream_scan,
                                                                                   monkeypatch) -> None:
    torch.manual_seed(0)
    module = SS2D(8, d_state=1)
    u = torch.randn(2, 4, 4, 8)

    def run():
        leaf = u.clone().requires_grad_()
        out = module(leaf)
        grads = torch.autograd.grad(out.square().sum(), [leaf, *module.parameters()])
        return out.detach(), grads

    reference = run()
    monkeypatch.setattr(scan, "_resolve_backend", lambda backend, x: "cuda")
    monkeypatch.setattr(scan, "_cuda_kernels", lambda: scan._CudaKernels(upstream_scan, None, ""))
    CALLS.clear()
    through_kernel = run()
    assert CALLS == ["fwd", "bwd"]
    torch.testing.assert_close(through_kernel[0], reference[0], atol=1e-5, rtol=1e-4)
    for got, want in zip(through_kernel[1], reference[1], strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_the_stand_in_rejects_what_the_kernel_rejects(upstream_scan) -> None:
    g = torch.Generator().manual_seed(0)
    u, delta = torch.randn(1, 8, 6, generator=g), torch.randn(1, 8, 6, generator=g)
    A = -torch.rand(8, 1, generator=g)
    B, C = torch.randn(1, 4, 1, 6, generator=g), torch.randn(1, 4, 1, 6, generator=g)
    upstream_scan(u, delta, A, B, C, delta_bias=torch.zeros(8), delta_softplus=True)
    with pytest.raises(ContractError, match="B"):
        upstream_scan(u, delta, A, B.double(), C)
    with pytest.raises(ContractError, match="groups do not divide"):
        upstream_scan(u, delta, A, B[:, :3], C[:, :3])
    with pytest.raises(ContractError, match="delta_bias"):
        upstream_scan(u, delta, A, B, C, delta_bias=torch.zeros(8, dtype=torch.float64))

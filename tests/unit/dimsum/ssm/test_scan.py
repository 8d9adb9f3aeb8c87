"""Selective scan and causal conv: the torch backend against the sequential loop, the CUDA path's maths
(zero-state scan + closed-form h0 correction) on CPU, and backend selection."""

from __future__ import annotations

import functools
import importlib.abc
import sys
import types

import pytest
import torch

from dimsum.ssm import recurrence, scan
from dimsum.ssm.mamba import Mamba
from dimsum.ssm.recurrence import initial_state_correction
from dimsum.ssm.reference import sequential_scan
from dimsum.ssm.scan import causal_conv1d, scan_with_zero_state_kernel, selective_scan
from tests.support.scan_checks import assert_same, gradcheck_torch_backend, run


def make_inputs(batch=2, dim=5, length=13, state=4, *, dtype=torch.float64,
                seed=0) -> dict[str, torch.Tensor]:
    """Random scan inputs; A < 0 as in Mamba, raw delta around the Mamba init after softplus."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    return {
        "u": randn(batch, dim, length), "delta": 0.5 * randn(batch, dim, length),
        "A": -torch.rand(dim, state, generator=g, dtype=dtype) * 4 - 0.1,
        "B": randn(batch, state, length), "C": randn(batch, state, length), "D": randn(dim),
        "z": randn(batch, dim, length), "delta_bias": randn(dim) - 2.0, "h0": randn(batch, dim, state),
    }


def torch_scan(**kw):
    return selective_scan(**kw, backend="torch")


# ----------------------------------------------------------------------------- torch backend exactness

@pytest.mark.parametrize("length", [1, 2, 3, 8, 13, 64, 100])
def test_torch_backend_matches_sequential_loop_in_float64(length: int) -> None:
    inputs = make_inputs(length=length)
    assert_same(run(torch_scan, inputs), run(sequential_scan, inputs), atol=1e-12, rtol=1e-10)


def test_float32_torch_backend_is_as_accurate_as_the_float32_loop() -> None:
    inputs = make_inputs(batch=2, dim=16, length=100, state=16)
    reference = run(sequential_scan, inputs)
    inputs32 = {k: v.float() for k, v in inputs.items()}
    y, grads = run(torch_scan, inputs32)
    assert y.dtype == torch.float32
    assert_same((y, grads), reference, atol=1e-4, rtol=1e-4)


def test_channel_blocks_cover_all_channels_with_a_ragged_last_block(monkeypatch) -> None:
    """The torch backend walks over channel blocks; force several (and a partial one) at tiny sizes."""
    inputs = make_inputs(dim=7, length=9)
    reference = run(sequential_scan, inputs)
    monkeypatch.setattr(recurrence, "CPU_BLOCK_ELEMENTS", 2 * 9 * 4 * 3)  # 3 channels per block: 3 + 3 + 1
    x = torch.zeros(9, 2, 7)
    blocks = list(scan._blocks(x, 4, (x,), None, work=1))
    assert [s.indices(7) for s, _, _, _ in blocks] == [(0, 3, 1), (3, 6, 1), (6, 7, 1)]
    assert [work[0].shape for _, _, _, work in blocks] == [(9, 2, 3, 4), (9, 2, 3, 4), (9, 2, 1, 4)]
    assert_same(run(torch_scan, inputs), reference, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("with_h0", [True, False])
def test_torch_backend_gradcheck(with_h0: bool) -> None:
    inputs = make_inputs(batch=1, dim=2, length=5, state=3)
    if not with_h0:
        del inputs["h0"]
    assert gradcheck_torch_backend(inputs)


def test_optional_inputs_are_optional() -> None:
    inputs = make_inputs()
    for drop in [("D",), ("z",), ("delta_bias",), ("h0",), ("D", "z", "delta_bias", "h0")]:
        subset = {k: v for k, v in inputs.items() if k not in drop}
        assert_same(run(torch_scan, subset), run(sequential_scan, subset), atol=1e-12, rtol=1e-10)


def test_large_steps_stay_finite_and_exact() -> None:
    """exp(delta A) underflows to 0 for big steps; the scan only multiplies, so nothing becomes inf/nan."""
    inputs = make_inputs(length=33)
    inputs["delta"] = inputs["delta"].abs() * 200 + 50
    inputs32 = {k: v.float() for k, v in inputs.items()}
    y, grads = run(torch_scan, inputs32)
    assert torch.isfinite(y).all() and all(torch.isfinite(g).all() for g in grads.values())
    assert_same((y, grads), run(sequential_scan, inputs), atol=1e-3, rtol=1e-4)


def test_scan_runs_in_float32_under_bf16_autocast_and_returns_u_dtype() -> None:
    inputs = {k: v.float() for k, v in make_inputs(dim=8, length=16).items()}
    plain = run(torch_scan, inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        in_autocast = run(torch_scan, inputs)  # forward and backward both inside the autocast region
    assert_same(in_autocast, plain, atol=0.0)

    bf16 = {k: v.bfloat16() for k, v in inputs.items()}
    y = selective_scan(**bf16, delta_softplus=True, backend="torch")
    assert y.dtype == torch.bfloat16
    reference = sequential_scan(**{k: v.double() for k, v in bf16.items()}, delta_softplus=True)
    torch.testing.assert_close(y.double(), reference, atol=0.05, rtol=0.01)  # only the output rounding


# ----------------------------------------------------------------------------- the CUDA path's maths on CPU

@pytest.mark.parametrize("drop", [(), ("z",), ("D", "z"), ("delta_bias",)])
def test_zero_state_kernel_plus_correction_equals_scan_from_h0(drop: tuple[str, ...]) -> None:
    """What backend="cuda" computes, with the torch zero-state scan standing in for selective_scan_fn."""
    inputs = {k: v for k, v in make_inputs(length=11).items() if k not in drop}
    kernel = functools.partial(selective_scan, backend="torch")  # same signature as selective_scan_fn
    decomposed = run(functools.partial(scan_with_zero_state_kernel, kernel=kernel), inputs)
    assert_same(decomposed, run(sequential_scan, inputs), atol=1e-12, rtol=1e-10)


def test_initial_state_correction_is_the_h0_part_of_the_output() -> None:
    inputs = make_inputs(length=10)
    delta = torch.nn.functional.softplus(inputs["delta"])
    y_h0 = sequential_scan(inputs["u"], delta, inputs["A"], inputs["B"], inputs["C"], h0=inputs["h0"])
    y_zero = sequential_scan(inputs["u"], delta, inputs["A"], inputs["B"], inputs["C"])
    corr = initial_state_correction(delta, inputs["A"], inputs["C"], inputs["h0"])
    torch.testing.assert_close(y_zero + corr, y_h0, atol=1e-12, rtol=1e-10)
    assert corr.abs().max() > 0.1  # the correction is not trivially small here


# ----------------------------------------------------------------------------- backend selection

CUDA_MODULES = ("mamba_ssm", "causal_conv1d", "selective_scan_cuda", "causal_conv1d_cuda")


class _RecordImports(importlib.abc.MetaPathFinder):
    """Records (and refuses) any attempt to import the CUDA-only packages."""

    def __init__(self) -> None:
        self.attempts: list[str] = []

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in CUDA_MODULES:
            self.attempts.append(name)
            raise ImportError(f"{name} blocked by the test")


@pytest.fixture
def record_imports(monkeypatch):
    finder = _RecordImports()
    monkeypatch.setattr(sys, "meta_path", [finder, *sys.meta_path])
    for name in [m for m in sys.modules if m.split(".")[0] in CUDA_MODULES]:
        monkeypatch.delitem(sys.modules, name)
    scan._cuda_kernels.cache_clear()
    yield finder
    scan._cuda_kernels.cache_clear()


def test_auto_backend_on_cpu_uses_torch_and_never_imports_cuda_packages(record_imports) -> None:
    inputs = make_inputs(dtype=torch.float32)
    assert scan._resolve_backend("auto", inputs["u"]) == "torch"
    selective_scan(**inputs, delta_softplus=True)
    causal_conv1d(inputs["u"], torch.randn(5, 4), None, "silu")
    Mamba(8, 6, backend="auto")(torch.randn(2, 5, 8), torch.randn(2, 6)).sum().backward()
    assert record_imports.attempts == []


def test_cuda_backend_on_cpu_is_a_clear_error(record_imports) -> None:
    inputs = make_inputs(dtype=torch.float32)
    with pytest.raises(RuntimeError, match=r"backend='cuda' needs CUDA tensors.*device 'cpu'"):
        selective_scan(**inputs, backend="cuda")
    with pytest.raises(RuntimeError, match="backend='cuda' needs CUDA tensors"):
        causal_conv1d(inputs["u"], torch.randn(5, 4), backend="cuda")
    assert record_imports.attempts == []


def test_missing_compiled_kernel_is_named(record_imports) -> None:
    kernels = scan._cuda_kernels()
    assert kernels.selective_scan_fn is None
    assert "compiled extension 'selective_scan_cuda' of package 'mamba_ssm' failed to load" in kernels.missing
    assert record_imports.attempts == ["selective_scan_cuda"]


def test_probe_trusts_the_kernel_not_the_package(record_imports, monkeypatch) -> None:
    """Both Python packages import, but the scan's extension was not built: the kernels are unavailable."""
    for name in ("mamba_ssm", "mamba_ssm.ops", "mamba_ssm.ops.selective_scan_interface", "causal_conv1d",
                 "causal_conv1d_cuda"):
        module = types.ModuleType(name)
        module.selective_scan_fn = module.causal_conv1d_fn = lambda *a, **k: None
        monkeypatch.setitem(sys.modules, name, module)
    kernels = scan._cuda_kernels()
    assert kernels.selective_scan_fn is None and "'selective_scan_cuda'" in kernels.missing
    monkeypatch.setitem(sys.modules, "selective_scan_cuda", types.ModuleType("selective_scan_cuda"))
    scan._cuda_kernels.cache_clear()
    assert scan._cuda_kernels().missing == ""


def test_unknown_backend_and_activation_are_rejected() -> None:
    inputs = make_inputs()
    with pytest.raises(ValueError, match="backend='triton'"):
        selective_scan(**inputs, backend="triton")
    with pytest.raises(ValueError, match="activation='relu'"):
        causal_conv1d(inputs["u"], torch.randn(5, 4), activation="relu")


# ----------------------------------------------------------------------------- causal conv

@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_causal_conv_matches_direct_sum(activation: str | None, with_bias: bool) -> None:
    g = torch.Generator().manual_seed(0)
    x, weight, bias = (torch.randn(2, 3, 10, generator=g, dtype=torch.float64),
                       torch.randn(3, 4, generator=g, dtype=torch.float64),
                       torch.randn(3, generator=g, dtype=torch.float64) if with_bias else None)
    out = causal_conv1d(x, weight, bias, activation, backend="torch")
    expected = torch.zeros_like(x)
    for t in range(x.shape[-1]):
        for k in range(weight.shape[1]):  # weight[:, K-1] multiplies the current step, as in causal-conv1d
            source = t - (weight.shape[1] - 1) + k
            if source >= 0:
                expected[..., t] += weight[:, k] * x[..., source]
        if bias is not None:
            expected[..., t] += bias
    if activation == "silu":
        expected = torch.nn.functional.silu(expected)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)


def test_causal_conv_is_causal() -> None:
    x, weight = torch.randn(1, 3, 12), torch.randn(3, 4)
    perturbed = x.clone()
    perturbed[..., 7] += 1.0
    a, b = causal_conv1d(x, weight, activation="silu"), causal_conv1d(perturbed, weight, activation="silu")
    assert torch.equal(a[..., :7], b[..., :7])
    assert not torch.equal(a[..., 7], b[..., 7])
    assert a.shape == x.shape


# ----------------------------------------------------------------------------- the h0 term's cost

def einsum_initial_state_correction(delta, A, C, h0):
    """The closed form written as one einsum over the full (B, D, L, N) decay: the oracle."""
    decay = torch.exp(delta.cumsum(-1).unsqueeze(-1) * A.unsqueeze(1))
    return torch.einsum("bdln,bdn,bnl->bdl", decay, h0, C)


def gated_h0_term(delta, A, C, h0, z, delta_bias, delta_softplus):  # noqa: PLR0917
    return recurrence.InitialStateTerm.apply(delta, delta_bias, delta_softplus, A, C, h0, z)


def gated_einsum_h0_term(delta, A, C, h0, z, delta_bias, delta_softplus):  # noqa: PLR0917
    delta = recurrence.prepare_delta(delta, delta_bias, delta_softplus, torch.float64)
    return einsum_initial_state_correction(delta, A, C, h0) * torch.nn.functional.silu(z)


@pytest.mark.parametrize("block_elements", [1 << 19, 2 * 11 * 4 * 3])  # one block; 3 + 3 + 1 channels
def test_blocked_h0_term_equals_the_einsum_in_values_and_every_gradient(monkeypatch, block_elements) -> None:
    """Values and the gradients of delta (through cumsum and softplus), delta_bias, A, C, h0 and z."""
    monkeypatch.setattr(recurrence, "CPU_BLOCK_ELEMENTS", block_elements)
    inputs = {k: v for k, v in make_inputs(dim=7, length=11).items() if k not in ("u", "B", "D")}
    inputs["delta"][0, 0, :3] = 30.0  # above softplus's linear threshold
    assert_same(run(gated_h0_term, inputs), run(gated_einsum_h0_term, inputs), atol=1e-14, rtol=1e-13)
    plain = {k: inputs[k] for k in ("delta", "A", "C", "h0")}
    assert_same(run(lambda delta_softplus, **kw: initial_state_correction(**kw), plain),
                run(lambda delta_softplus, **kw: einsum_initial_state_correction(**kw), plain),
                atol=1e-14, rtol=1e-13)


def test_blocked_h0_term_gradcheck() -> None:
    inputs = {k: v.requires_grad_() for k, v in make_inputs(batch=2, dim=3, length=5, state=4).items()
              if k not in ("u", "B", "D")}
    names = list(inputs)

    def fn(*tensors):
        return gated_h0_term(**dict(zip(names, tensors, strict=True)), delta_softplus=True)

    assert torch.autograd.gradcheck(fn, tuple(inputs.values()))


def saved_bytes(fn) -> tuple[int, int]:
    """(total bytes, largest tensor's elements) of what autograd saves while ``fn()`` runs, by storage."""
    storages: dict[int, int] = {}
    largest = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal largest
        if not isinstance(tensor, torch.nn.Parameter):
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
            largest = max(largest, tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values()), largest


def test_one_mamba_call_saves_o_of_b_d_plus_n_l_on_the_cuda_path() -> None:
    """The cuda path (zero-state kernel + h0 term), with the torch kernels standing in, keeps no
    (B, D, L, N) tensor for backward and no more than the torch backend does."""
    batch, d_model, length, state = 2, 32, 64, 16
    torch.manual_seed(0)
    mixer = Mamba(d_model, 8, d_state=state)
    x, c = torch.randn(batch, length, d_model), torch.randn(batch, 8)
    d_inner = mixer.d_inner
    torch_path = saved_bytes(lambda: Mamba.forward(mixer, x, c))
    with scan.emulated_kernels():
        cuda_path = saved_bytes(lambda: Mamba.forward(mixer, x, c))
    activations = batch * (d_inner + state) * length * 4  # one fp32 tensor of size B (D + N) L
    assert cuda_path[1] < batch * d_inner * length * state // 4, "a (B, D, L, N) tensor was saved"
    assert cuda_path[0] <= 16 * activations
    assert cuda_path[0] <= 1.1 * torch_path[0], (cuda_path, torch_path)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_auto_on_cuda_without_kernels_warns_once_and_uses_torch(record_imports) -> None:
    inputs = {k: v.float().cuda() for k, v in make_inputs().items()}
    with pytest.warns(RuntimeWarning, match="'selective_scan_cuda'.*launch-bound") as caught:
        for _ in range(3):
            selective_scan(**inputs, delta_softplus=True)
    assert len([w for w in caught if issubclass(w.category, RuntimeWarning)]) == 1

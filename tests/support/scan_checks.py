"""Comparing scan implementations by output and by the gradients of every input (test_scan.py and
test_scan_grouped.py)."""

from __future__ import annotations

import torch

from dimsum.ssm.scan import selective_scan

GRAD_INPUTS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "h0")


def run(fn, inputs: dict[str, torch.Tensor], **kwargs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Output and the gradients of a fixed random projection of it w.r.t. every input."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
    y = fn(**leaves, delta_softplus=True, **kwargs)
    weight = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y.backward(weight.to(y.dtype))
    return y.detach(), {k: v.grad for k, v in leaves.items()}


def assert_same(result, reference, atol: float, rtol: float = 0.0) -> None:
    (y, grads), (y_ref, grads_ref) = result, reference
    torch.testing.assert_close(y.to(y_ref.dtype), y_ref, atol=atol, rtol=rtol)
    assert set(grads) == set(grads_ref)
    for name in grads_ref:
        assert grads[name] is not None, name
        torch.testing.assert_close(grads[name].to(y_ref.dtype), grads_ref[name], atol=atol, rtol=rtol,
                                   msg=lambda m, n=name: f"grad of {n}: {m}")


def gradcheck_torch_backend(inputs: dict[str, torch.Tensor]) -> bool:
    """torch.autograd.gradcheck of the torch backend with respect to every input (float64 leaves)."""
    leaves = {k: v.requires_grad_() for k, v in inputs.items()}
    names = list(leaves)

    def fn(*tensors: torch.Tensor) -> torch.Tensor:
        return selective_scan(**dict(zip(names, tensors, strict=True)), delta_softplus=True, backend="torch")

    return torch.autograd.gradcheck(fn, tuple(leaves.values()))

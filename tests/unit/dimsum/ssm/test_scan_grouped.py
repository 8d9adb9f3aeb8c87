"""Grouped B/C, (B, G, N, L) as mamba-ssm's kernel takes them, and d_state 1 (LaMamba's SS2D): the torch
backend against the float64 sequential loop run separately on each group's channels."""

from __future__ import annotations

import pytest
import torch

from dimsum.ssm.reference import sequential_scan
from dimsum.ssm.scan import selective_scan
from tests.support.scan_checks import GRAD_INPUTS, assert_same, gradcheck_torch_backend, run


def make_grouped(batch=2, groups=4, per_group=3, length=13, *, state=1, seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    dim = groups * per_group

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    return {
        "u": randn(batch, dim, length), "delta": 0.5 * randn(batch, dim, length),
        "A": -torch.rand(dim, state, generator=g, dtype=torch.float64) * 4 - 0.1,
        "B": randn(batch, groups, state, length), "C": randn(batch, groups, state, length), "D": randn(dim),
        "z": randn(batch, dim, length), "delta_bias": randn(dim) - 2.0,
    }


def per_group_loop(u, delta, A, B, C, *, D, z, delta_bias, delta_softplus):
    """The reference: one ungrouped sequential scan per group of D / G consecutive channels."""
    size = u.shape[1] // B.shape[1]
    outs = []
    for g in range(B.shape[1]):
        s = slice(g * size, (g + 1) * size)
        outs.append(sequential_scan(u[:, s], delta[:, s], A[s], B[:, g], C[:, g], D=D[s], z=z[:, s],
                                    delta_bias=delta_bias[s], delta_softplus=delta_softplus))
    return torch.cat(outs, dim=1)


def torch_scan(**kw):
    return selective_scan(**kw, backend="torch")


@pytest.mark.parametrize("state", [1, 3])
@pytest.mark.parametrize("length", [1, 2, 3, 8, 13, 64, 100])
def test_grouped_torch_backend_matches_per_group_loop_in_float64(length: int, state: int) -> None:
    inputs = make_grouped(length=length, state=state)
    result, reference = run(torch_scan, inputs), run(per_group_loop, inputs)
    assert set(reference[1]) == set(GRAD_INPUTS) - {"h0"}  # every gradient is compared
    assert_same(result, reference, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("state", [1, 3])
def test_grouped_sequential_loop_matches_per_group_loop(state: int) -> None:
    inputs = make_grouped(length=9, state=state)
    assert_same(run(sequential_scan, inputs), run(per_group_loop, inputs), atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("state", [1, 2])
def test_grouped_torch_backend_gradcheck(state: int) -> None:
    inputs = make_grouped(batch=1, groups=2, per_group=2, length=5, state=state)
    assert gradcheck_torch_backend(inputs)


def test_one_state_with_shared_b_c_and_initial_state_is_exact() -> None:
    """d_state 1 contracts the state axis by a product (``_state_dot``); ungrouped, with h0, as well."""
    g = torch.Generator().manual_seed(3)
    batch, dim, length = 2, 5, 17
    inputs = {"u": torch.randn(batch, dim, length, generator=g, dtype=torch.float64),
              "delta": torch.randn(batch, dim, length, generator=g, dtype=torch.float64),
              "A": -torch.rand(dim, 1, generator=g, dtype=torch.float64) - 0.1,
              "B": torch.randn(batch, 1, length, generator=g, dtype=torch.float64),
              "C": torch.randn(batch, 1, length, generator=g, dtype=torch.float64),
              "h0": torch.randn(batch, dim, 1, generator=g, dtype=torch.float64)}
    assert_same(run(torch_scan, inputs), run(sequential_scan, inputs), atol=1e-12, rtol=1e-10)


def test_float32_grouped_scan_is_as_accurate_as_the_float32_loop() -> None:
    inputs = make_grouped(groups=4, per_group=16, length=100)
    reference = run(per_group_loop, inputs)
    y, grads = run(torch_scan, {k: v.float() for k, v in inputs.items()})
    assert y.dtype == torch.float32
    assert_same((y, grads), reference, atol=1e-4, rtol=1e-4)


def test_bad_groupings_are_rejected() -> None:
    inputs = make_grouped(groups=4, per_group=3)
    with pytest.raises(ValueError, match="do not divide"):
        selective_scan(**{**inputs, "B": inputs["B"][:, :-1].repeat(1, 2, 1, 1)[:, :5],
                          "C": inputs["C"][:, :-1].repeat(1, 2, 1, 1)[:, :5]})
    with pytest.raises(ValueError, match="same G"):
        selective_scan(**{**inputs, "C": inputs["C"][:, :2]})
    with pytest.raises(ValueError, match="both"):
        selective_scan(**{**inputs, "C": inputs["C"][:, 0]})
    with pytest.raises(ValueError, match="initial state"):
        selective_scan(**inputs, h0=torch.zeros(2, 12, 1, dtype=torch.float64))

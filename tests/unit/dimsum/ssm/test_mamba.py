"""The conditional Mamba mixer: released parameter layout, Mamba-1 init, and the three cond modes."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import pytest
import torch

from dimsum.ssm.mamba import Mamba
from dimsum.ssm.reference import sequential_scan

SPEC = Path("/work/shared/spec")
PREFIX = "blocks.0.spatial_mamba.mixer."


def tiny(cond_mode: str = "initial_state", seed: int = 0) -> Mamba:
    torch.manual_seed(seed)
    return Mamba(8, 6, d_state=4, cond_mode=cond_mode)


def test_parameter_names_and_shapes_match_a_released_l2_branch() -> None:
    path = SPEC / "official_keys_dim_l2_imagenet256.json"
    if not path.is_file():
        pytest.skip(f"{path} is not available")
    official = {k[len(PREFIX):]: tuple(s) for k, s in json.loads(path.read_text()) if k.startswith(PREFIX)}
    with torch.device("meta"):
        mixer = Mamba(512, 1024)  # DiMSUM-L/2: D = 1024, each branch has d_model = D/2
    assert {k: tuple(v.shape) for k, v in mixer.state_dict().items()} == official
    assert (mixer.d_inner, mixer.dt_rank) == (1024, 32)


def test_mamba1_init() -> None:
    mixer = Mamba(64, 16, d_state=16)
    assert torch.equal(mixer.A_log, torch.log(torch.arange(1.0, 17.0)).expand(128, 16))
    assert torch.equal(mixer.D, torch.ones(128))
    dt = torch.nn.functional.softplus(mixer.dt_proj.bias)
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)
    assert mixer.dt_proj.weight.abs().max() <= mixer.dt_rank ** -0.5
    assert mixer.dt_rank == math.ceil(64 / 16)


def written_out(mixer: Mamba, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """The mixer spelled out step by step, with the sequential loop as the scan."""
    xz = mixer.in_proj(x).transpose(1, 2)
    u, z = xz[:, :16], xz[:, 16:]
    u = torch.nn.functional.silu(mixer.conv1d(torch.nn.functional.pad(u, (3, 0))))
    dt, B, C = mixer.x_proj(u.transpose(1, 2)).split([1, 4, 4], dim=-1)
    h0 = mixer.cond_proj(c)[:, :, None].expand(2, 16, 4)
    y = sequential_scan(u, mixer.dt_proj(dt).transpose(1, 2), -torch.exp(mixer.A_log), B.transpose(1, 2),
                        C.transpose(1, 2), D=mixer.D, z=z, delta_softplus=True, h0=h0)
    return mixer.out_proj(y.transpose(1, 2))


def test_forward_and_gradients_match_the_mixer_written_out() -> None:
    """The wiring (split, causal conv, projections, h0 = cond_proj(c)) and every parameter's gradient."""
    mixer = tiny().double()
    x, c = torch.randn(2, 7, 8, dtype=torch.float64), torch.randn(2, 6, dtype=torch.float64)
    grads = []
    for fn in (mixer, functools.partial(written_out, mixer)):
        mixer.zero_grad()
        out = fn(x, c)
        out.square().sum().backward()
        grads.append((out.detach(), {k: p.grad.clone() for k, p in mixer.named_parameters()}))
    (out, ours), (expected, reference) = grads
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-10)
    for name, grad in reference.items():
        torch.testing.assert_close(ours[name], grad, atol=1e-12, rtol=1e-10,
                                   msg=lambda m, n=name: f"{n}: {m}")


def perturbed_cond_output(mixer: Mamba, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        mixer.cond_proj.weight.add_(torch.randn_like(mixer.cond_proj.weight))
        mixer.cond_proj.bias.add_(1.0)
    return mixer(x, c)


def test_initial_state_mode_conditions_and_trains_cond_proj() -> None:
    mixer, x, c = tiny(), torch.randn(2, 5, 8), torch.randn(2, 6)
    out = mixer(x, c)
    out.square().sum().backward()
    assert mixer.cond_proj.weight.requires_grad and mixer.cond_proj.weight.grad.abs().sum() > 0
    assert mixer.cond_proj.bias.grad.abs().sum() > 0
    assert not torch.allclose(perturbed_cond_output(mixer, x, c), out)
    assert not torch.allclose(mixer(x, torch.randn(2, 6)), mixer(x, c))
    with pytest.raises(ValueError, match="needs the conditioning c"):
        mixer(x, None)


def test_released_mode_keeps_cond_proj_frozen_and_unused() -> None:
    mixer, x, c = tiny("released"), torch.randn(2, 5, 8), torch.randn(2, 6)
    assert not any(p.requires_grad for p in mixer.cond_proj.parameters())
    assert "cond_proj.weight" in mixer.state_dict()
    out = mixer(x, c)
    assert torch.equal(perturbed_cond_output(mixer, x, c), out)
    assert torch.equal(mixer(x, None), out)
    out.sum().backward()
    assert mixer.cond_proj.weight.grad is None and mixer.in_proj.weight.grad is not None


def test_none_mode_has_no_cond_proj() -> None:
    mixer = tiny("none")
    assert not hasattr(mixer, "cond_proj")
    assert not any(k.startswith("cond_proj") for k in mixer.state_dict())
    assert mixer(torch.randn(2, 5, 8)).shape == (2, 5, 8)


def test_released_mode_equals_none_mode_with_the_same_weights() -> None:
    released, none = tiny("released", seed=3), tiny("none", seed=3)
    none.load_state_dict({k: v for k, v in released.state_dict().items() if not k.startswith("cond_proj")})
    x = torch.randn(2, 5, 8)
    assert torch.equal(released(x, torch.randn(2, 6)), none(x))


def test_bf16_autocast_forward_and_backward_are_finite() -> None:
    mixer, x, c = tiny(), torch.randn(2, 9, 8), torch.randn(2, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mixer(x, c)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    out.float().square().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in mixer.parameters() if p.requires_grad)
    torch.testing.assert_close(out.float(), mixer(x, c), atol=0.1, rtol=0.05)


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="cond_mode='paper'"):
        Mamba(8, 6, cond_mode="paper")
    with pytest.raises(ValueError, match="backend='gpu'"):
        Mamba(8, 6, backend="gpu")
    with pytest.raises(ValueError, match="dt_rank=0"):
        Mamba(8, 6, dt_rank=0)

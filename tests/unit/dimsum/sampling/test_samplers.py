"""Samplers: driven by the exact velocity field of Gaussian data, each must deliver the target law.

For Gaussian data the field is affine in x, so every ODE sampler's map is affine too. Starting from noise
whitened to exact zero mean and identity covariance, the output moments then differ from the target only by
integration error, not by sampling error, which lets the tolerances be tight.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dimsum.config import ConfigError
from dimsum.diffusion import OBJECTIVES, Transport, build_objective
from dimsum.sampling import Sampler, SamplerConfig, cfg_combine, guided_prediction

PATHS = ("GVP", "Linear")
N, DIM = 4000, 3  # the ODE tests see integration error only, so N can be small; the SDE test uses 5N


@pytest.fixture(scope="module")
def target() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(DIM, DIM, generator=g, dtype=torch.float64)
    return torch.randn(DIM, generator=g, dtype=torch.float64), a @ a.T / DIM + 0.1 * torch.eye(DIM)


def whitened(n: int) -> torch.Tensor:
    x = torch.randn(n, DIM, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x = x - x.mean(0)
    return x @ torch.linalg.inv(torch.linalg.cholesky(torch.cov(x.T))).T


@pytest.fixture(scope="module")
def white_noise() -> torch.Tensor:
    return whitened(N)


def moment_errors(x: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor) -> tuple[float, float]:
    x = x.double()
    return (x.mean(0) - mean).abs().max().item(), (torch.cov(x.T) - cov).abs().max().item()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("method", ["dopri5", "euler", "heun"])
def test_ode_samplers_transport_noise_to_the_gaussian_target(target, white_noise, path, method) -> None:
    steps, tol = {"dopri5": (1, 5e-3), "euler": (200, 0.05), "heun": (50, 0.01)}[method]
    mean, cov = target
    x, nfe = Sampler(SamplerConfig(method=method, steps=steps, path=path))(
        Transport(path).gaussian_velocity(mean, cov), white_noise)
    assert x.dtype == torch.float32 and x.shape == (N, DIM)
    mean_err, cov_err = moment_errors(x, mean, cov)
    assert mean_err < tol and cov_err < tol, (mean_err, cov_err)
    expected_nfe = {"dopri5": None, "euler": steps, "heun": 2 * steps}[method]
    if expected_nfe is None:
        print(f"dopri5 NFE ({path}, atol 1e-6, rtol 1e-3): {nfe}")
        assert 10 <= nfe <= 200
    else:
        assert nfe == expected_nfe


@pytest.mark.parametrize("path", PATHS)
def test_wrong_field_misses_the_target(target, white_noise, path) -> None:
    mean, cov = target
    exact = Transport(path).gaussian_velocity(mean, cov)
    x, _ = Sampler(SamplerConfig(path=path))(lambda x, t: 0.9 * exact(x, t), white_noise)
    assert moment_errors(x, mean, cov)[1] > 0.1


@pytest.mark.parametrize("path", PATHS)
def test_fixed_step_samplers_converge_at_their_order(target, path) -> None:
    mean, cov = target
    field = Transport(path).gaussian_velocity(mean, cov)
    x0 = torch.randn(256, DIM, generator=torch.Generator().manual_seed(4))
    reference, _ = Sampler(SamplerConfig(atol=1e-9, rtol=1e-9))(field, x0.double())

    def error(method: str, steps: int) -> float:
        x, _ = Sampler(SamplerConfig(method=method, steps=steps))(field, x0)
        return (x.double() - reference).abs().max().item()

    assert 3 < error("euler", 40) / error("euler", 160) < 5  # first order: 4x steps, 4x smaller error
    assert 10 < error("heun", 10) / error("heun", 40) < 22  # second order: 16x smaller


@pytest.mark.parametrize("path", PATHS)
def test_sde_sampler_with_derived_drift_reaches_the_target(target, path) -> None:
    mean, cov = target
    gen = torch.Generator().manual_seed(2)
    x, nfe = Sampler(SamplerConfig(method="sde", steps=100, path=path))(
        Transport(path).gaussian_velocity(mean, cov), whitened(5 * N),
        noise=lambda: torch.randn(5 * N, DIM, generator=gen))
    assert nfe == 100
    mean_err, cov_err = moment_errors(x, mean, cov)  # includes the Brownian increments' sampling error
    assert mean_err < 0.03 and cov_err < 0.06, (mean_err, cov_err)


def test_sde_without_noise_is_the_euler_ode(target) -> None:
    mean, cov = target
    field = Transport("GVP").gaussian_velocity(mean, cov)
    x0 = torch.randn(64, DIM)
    sde, _ = Sampler(SamplerConfig(method="sde", steps=30, diffusion_norm=0.0))(field, x0)
    euler, _ = Sampler(SamplerConfig(method="euler", steps=30))(field, x0)
    torch.testing.assert_close(sde, euler, rtol=1e-6, atol=1e-6)


class ToyConditional(nn.Module):
    """A tiny class-conditional velocity net with a null row, counting its forward calls."""

    null_label = 3

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(4, 4)
        self.proj = nn.Conv2d(4, 4, 3, padding=1)
        self.calls = 0

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        self.calls += 1
        return torch.tanh(self.proj(x)) * (1 + t[:, None, None, None]) + self.embed(y)[:, :, None, None]


@pytest.fixture
def toy() -> ToyConditional:
    torch.manual_seed(0)
    return ToyConditional().eval()


def test_cfg_scale_one_is_the_conditional_output(toy) -> None:
    x, t, y = torch.randn(5, 4, 8, 8), torch.rand(5), torch.tensor([0, 1, 2, 0, 1])
    torch.testing.assert_close(guided_prediction(toy, y, 1.0)(x, t), toy(x, t, y))
    v_c, v_u = toy(x, t, y), toy(x, t, torch.full_like(y, 3))
    torch.testing.assert_close(cfg_combine(v_c, v_u, 1.0), v_c)


def test_cfg_is_one_batched_call_equal_to_two_separate_calls(toy) -> None:
    x, t, y = torch.randn(5, 4, 8, 8), torch.rand(5), torch.tensor([0, 1, 2, 0, 1])
    toy.calls = 0
    guided = guided_prediction(toy, y, 4.0)(x, t)
    assert toy.calls == 1
    v_c, v_u = toy(x, t, y), toy(x, t, torch.full_like(y, 3))
    torch.testing.assert_close(guided, v_u + 4.0 * (v_c - v_u), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(guided, v_c, atol=1e-3)


def test_cfg_needs_a_conditional_model_with_null_label(toy) -> None:
    toy.null_label = None
    with pytest.raises(ValueError, match="null_label: None"):
        guided_prediction(toy, torch.tensor([0]), 1.5)
    with pytest.raises(ValueError, match="labels given: False"):
        guided_prediction(ToyConditional(), None, 1.5)


@pytest.mark.parametrize("method", ["euler", "heun", "sde"])
def test_samples_do_not_depend_on_the_batch_they_are_in(toy, method) -> None:
    cfg = SamplerConfig(method=method, steps=8, diffusion_norm=0.5)
    x0, y = torch.randn(3, 4, 8, 8), torch.tensor([2, 0, 1])
    noise = torch.randn(8, 3, 4, 8, 8)

    def run(rows: slice) -> torch.Tensor:
        increments = iter(noise[:, rows])
        return Sampler(cfg)(guided_prediction(toy, y[rows], 2.0), x0[rows], noise=lambda: next(increments))[0]

    batch = run(slice(0, 3))
    for i in range(3):
        torch.testing.assert_close(run(slice(i, i + 1)), batch[i : i + 1], rtol=1e-5, atol=1e-5)


def test_bf16_autocast_runs_the_network_in_bf16_but_integrates_in_fp32(toy) -> None:
    x0, y = torch.randn(2, 4, 8, 8), torch.tensor([0, 1])
    dtypes = []
    toy.proj.register_forward_hook(lambda mod, inp, out: dtypes.append(out.dtype))
    heun = Sampler(SamplerConfig(method="heun", steps=4))
    fp32, _ = heun(guided_prediction(toy, y, 1.5), x0)
    bf16, _ = heun(guided_prediction(toy, y, 1.5, torch.bfloat16), x0)
    assert dtypes[0] == torch.float32 and dtypes[-1] == torch.bfloat16
    assert bf16.dtype == torch.float32
    torch.testing.assert_close(bf16, fp32, rtol=0.05, atol=0.05)


def test_sampler_config_errors_name_the_field() -> None:
    with pytest.raises(ConfigError, match=r"sampler\.steps: got 0"):
        SamplerConfig.from_dict({"method": "euler", "steps": 0}, "sampler")
    with pytest.raises(ConfigError, match=r"method: got 'rk45'"):
        SamplerConfig.from_dict({"method": "rk45"})


def test_guidance_combines_only_the_channels_the_objective_names(toy) -> None:
    # a learned-sigma DDPM guides eps (the first channels) and keeps the conditional variance channels
    x, t, y = torch.randn(5, 4, 8, 8), torch.rand(5), torch.tensor([0, 1, 2, 0, 1])
    out = guided_prediction(toy, y, 4.0, guided_channels=2)(x, t)
    v_c, v_u = toy(x, t, y), toy(x, t, torch.full_like(y, 3))
    torch.testing.assert_close(out[:, :2], cfg_combine(v_c, v_u, 4.0)[:, :2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[:, 2:], v_c[:, 2:])
    torch.testing.assert_close(guided_prediction(toy, y, 4.0, guided_channels=4)(x, t),
                               guided_prediction(toy, y, 4.0)(x, t))


def test_flow_objective_predicts_a_fully_guided_velocity() -> None:
    flow = build_objective("flow", path="Linear")
    assert isinstance(flow, Transport) and list(OBJECTIVES) == ["flow", "ddpm"]
    assert (flow.out_channels(4), flow.guided_channels(4)) == (4, 4)
    v, x, t = torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2), torch.rand(2)
    assert flow.velocity(v, x, t) is v
    with pytest.raises(ValueError, match="objective kind: got 'edm'; expected one of flow, ddpm"):
        build_objective("edm")


class HalfVelocity:
    """An objective whose network predicts twice the velocity: samplers must read it through velocity()."""

    def velocity(self, prediction: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return prediction / 2


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_samplers_integrate_the_velocity_the_objective_reads_off_the_prediction(target, method) -> None:
    mean, cov = target
    exact = Transport("GVP").gaussian_velocity(mean, cov)
    x0, cfg = torch.randn(64, DIM), SamplerConfig(method=method, steps=20)
    via_objective, nfe = Sampler(cfg, HalfVelocity())(lambda x, t: 2 * exact(x, t), x0)
    plain, _ = Sampler(cfg)(exact, x0)
    torch.testing.assert_close(via_objective, plain)
    assert nfe == {"euler": 20, "heun": 40}[method]
    with pytest.raises(ValueError, match="sampler 'sde' needs a flow-matching objective, got HalfVelocity"):
        Sampler(SamplerConfig(method="sde", steps=2), HalfVelocity())(exact, x0)

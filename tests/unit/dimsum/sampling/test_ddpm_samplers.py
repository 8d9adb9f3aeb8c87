"""The ddpm and ddim samplers: steps against the posterior formulas, eps-only guidance, and exact-eps
sampling of Gaussian data, whose moments the samples must reproduce.

Reference steps are computed in float64 numpy from the 1000-step linear schedule, independently of the
chain tables in dimsum.diffusion.ddpm.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from dimsum.config import ConfigError
from dimsum.diffusion import GaussianDiffusion
from dimsum.diffusion.ddpm import respaced_timesteps
from dimsum.sampling import SAMPLERS, Sampler, SamplerConfig, guided_prediction

ALPHA_BAR = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))


def respaced_step(kept: list[int], i: int) -> dict[str, float]:
    """ᾱ, ᾱ_prev, β', β̃' and the clipped log β̃' at index i of the chain over ``kept``."""
    def alpha_bar(j: int) -> float:
        return ALPHA_BAR[kept[j]] if j >= 0 else 1.0

    def beta_tilde(j: int) -> float:
        return (1 - alpha_bar(j - 1)) / (1 - alpha_bar(j)) * (1 - alpha_bar(j) / alpha_bar(j - 1))

    return {"ab": alpha_bar(i), "ab_prev": alpha_bar(i - 1), "beta": 1 - alpha_bar(i) / alpha_bar(i - 1),
            "beta_tilde": beta_tilde(i), "log_beta_tilde": math.log(beta_tilde(max(i, 1)))}


class Recording:
    """A model function returning fixed predictions and recording the timesteps it was shown."""

    def __init__(self, predictions: torch.Tensor) -> None:
        self.predictions, self.times = iter(predictions), []

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.times.append(t.tolist())
        return next(self.predictions)


def run(method: str, steps: int, predictions: torch.Tensor, x: torch.Tensor, noises: torch.Tensor,
        **settings) -> tuple[torch.Tensor, int, Recording, int]:
    model, drawn = Recording(predictions), iter(noises)
    out, nfe = Sampler(SamplerConfig(method=method, steps=steps, **settings), GaussianDiffusion())(
        model, x, noise=lambda: next(drawn))
    return out, nfe, model, len(noises) - len(list(drawn))


STEPS = 4  # keeps 0, 333, 666, 999
B = 3


@pytest.fixture
def draws() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    scale = torch.tensor([1.0] * 4 + [0.5] * 4)[:, None, None]  # eps, then v mostly inside [-1, 1]
    predictions = torch.randn(STEPS, B, 8, 2, 2, generator=g) * scale
    return predictions, torch.randn(B, 4, 2, 2, generator=g), torch.randn(STEPS, B, 4, 2, 2, generator=g)


def test_samplers_are_registered_and_refuse_a_flow_objective() -> None:
    assert SAMPLERS["ddpm"].__name__ == "ddpm" and SAMPLERS["ddim"].__name__ == "ddim"
    with pytest.raises(ValueError, match="sampler 'ddim' needs the ddpm objective, got Transport"):
        Sampler(SamplerConfig(method="ddim", steps=4))(lambda x, t: x, torch.zeros(1, 4, 2, 2))
    with pytest.raises(ValueError, match="no flow velocity"):
        Sampler(SamplerConfig(method="euler", steps=2), GaussianDiffusion())(
            lambda x, t: torch.cat([x, x], 1), torch.zeros(1, 4, 2, 2))
    with pytest.raises(ConfigError, match=r"sampler\.eta: got 1.5; expected 0 <= eta <= 1"):
        SamplerConfig.from_dict({"method": "ddim", "eta": 1.5}, "sampler")


def test_ddpm_steps_follow_the_posterior_formulas(draws) -> None:
    predictions, x, noises = draws
    out, nfe, model, noise_draws = run("ddpm", STEPS, predictions, x, noises)
    kept = respaced_timesteps(1000, STEPS)
    assert kept == [0, 333, 666, 999] and nfe == STEPS
    assert model.times == [[float(kept[i])] * B for i in range(STEPS - 1, -1, -1)]  # original indices
    assert noise_draws == STEPS - 1  # no noise on the last step
    ref = x.double()
    for k, i in enumerate(range(STEPS - 1, -1, -1)):
        s, (eps, v) = respaced_step(kept, i), predictions[k].double().chunk(2, dim=1)
        x0 = (ref - math.sqrt(1 - s["ab"]) * eps) / math.sqrt(s["ab"])
        mean = (s["beta"] * math.sqrt(s["ab_prev"]) / (1 - s["ab"]) * x0
                + (1 - s["ab_prev"]) * math.sqrt(1 - s["beta"]) / (1 - s["ab"]) * ref)
        fraction = (v + 1) / 2
        log_var = fraction * math.log(s["beta"]) + (1 - fraction) * s["log_beta_tilde"]
        ref = mean + (torch.exp(0.5 * log_var) * noises[k].double() if i > 0 else 0)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_steps_follow_their_formula(draws, eta) -> None:
    predictions, x, noises = draws
    out, nfe, model, noise_draws = run("ddim", STEPS, predictions, x, noises, eta=eta)
    kept = respaced_timesteps(1000, STEPS)
    assert nfe == STEPS and model.times[0] == [999.0] * B and model.times[-1] == [0.0] * B
    assert noise_draws == (STEPS - 1 if eta > 0 else 0)
    ref = x.double()
    for k, i in enumerate(range(STEPS - 1, -1, -1)):
        s, eps = respaced_step(kept, i), predictions[k].double()[:, :4]  # the variance channels are unused
        x0 = (ref - math.sqrt(1 - s["ab"]) * eps) / math.sqrt(s["ab"])
        sigma = eta * math.sqrt(s["beta_tilde"])
        ref = math.sqrt(s["ab_prev"]) * x0 + math.sqrt(1 - s["ab_prev"] - sigma**2) * eps
        ref = ref + (sigma * noises[k].double() if i > 0 else 0)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_ddim_with_eta_1_is_ddpm_at_the_posterior_variance(draws) -> None:
    predictions, x, noises = draws
    at_posterior = torch.cat([predictions[:, :, :4], -torch.ones_like(predictions[:, :, 4:])], 2)  # v = -1
    ddpm, *_ = run("ddpm", STEPS, at_posterior, x, noises)
    ddim, *_ = run("ddim", STEPS, at_posterior, x, noises, eta=1.0)
    torch.testing.assert_close(ddim, ddpm, rtol=1e-4, atol=1e-4 * ddpm.abs().max().item())


class Toy(nn.Module):
    """Class-conditional, 4 channels in, (eps, v) out; the last label row is the null class."""

    null_label = 3

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Conv2d(4, 8, 1)
        self.label = nn.Embedding(4, 8)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return 0.1 * self.proj(x) + self.label(y)[:, :, None, None] + (t / 1000)[:, None, None, None]


def test_guidance_combines_all_four_eps_channels_and_leaves_the_variance_unguided() -> None:
    torch.manual_seed(0)
    toy, ddpm = Toy(), GaussianDiffusion()
    y, x, noises = torch.tensor([0, 2]), torch.randn(2, 4, 2, 2), torch.randn(5, 2, 4, 2, 2)

    def sample(model_fn) -> torch.Tensor:
        drawn = iter(noises)
        return Sampler(SamplerConfig(method="ddpm", steps=6), ddpm)(model_fn, x, noise=lambda: next(drawn))[0]

    def by_hand(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        cond, uncond = toy(x, t, y), toy(x, t, torch.full_like(y, 3))
        return torch.cat([uncond[:, :4] + 4.0 * (cond[:, :4] - uncond[:, :4]), cond[:, 4:]], 1)

    with torch.no_grad():
        guided = sample(guided_prediction(toy, y, 4.0, guided_channels=ddpm.guided_channels(4)))
        torch.testing.assert_close(guided, sample(by_hand))
        toy.label.weight[3, 4:] += 1.0  # the null class's variance channels: never used
        torch.testing.assert_close(sample(guided_prediction(toy, y, 4.0, guided_channels=4)), guided)
        toy.label.weight[3, 3] += 1.0  # the null class's fourth eps channel: guided like the others
        changed = sample(guided_prediction(toy, y, 4.0, guided_channels=4))
        assert (changed - guided).abs().max() > 1e-3


MU, STD = torch.tensor([0.5, -1.0]), torch.tensor([0.5, 1.5])  # per channel of the Gaussian data


class GaussianOracle:
    """The exact prediction for data N(MU_c, STD_c²): eps = E[ε | x_t], and v such that σ² is the exact
    reverse variance of the chain over ``kept``, β̃' + coef_x0² · Var(x0 | x_t). With it every ancestral
    step draws exactly from q(x_{t'} | x_t)."""

    def __init__(self, kept: list[int]) -> None:
        self.kept = kept
        self.index = {t: i for i, t in enumerate(kept)}

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        i = self.index[int(t[0])]
        s = respaced_step(self.kept, i)
        mu, var = MU.double()[:, None, None], STD.double()[:, None, None] ** 2
        total = s["ab"] * var + 1 - s["ab"]
        eps = math.sqrt(1 - s["ab"]) * (x.double() - math.sqrt(s["ab"]) * mu) / total
        coef_x0 = s["beta"] * math.sqrt(s["ab_prev"]) / (1 - s["ab"])
        exact_var = s["beta_tilde"] + coef_x0**2 * var * (1 - s["ab"]) / total
        if i == 0:  # the last step adds no noise
            v = torch.zeros_like(eps)
        else:
            fraction = (exact_var.log() - s["log_beta_tilde"]) / (math.log(s["beta"]) - s["log_beta_tilde"])
            v = (2 * fraction - 1).expand_as(eps)
        return torch.cat([eps, v], 1).float()


def test_ddpm_with_the_exact_prediction_samples_the_gaussian_data_moments() -> None:
    n, steps = 10000, 250
    torch.manual_seed(0)
    x, nfe = Sampler(SamplerConfig(method="ddpm", steps=steps), GaussianDiffusion())(
        GaussianOracle(respaced_timesteps(1000, steps)), torch.randn(n, 2, 2, 2))
    assert nfe == steps and x.dtype == torch.float32
    values = x.double().transpose(0, 1).reshape(2, -1)  # per channel: 4n draws
    count = values.shape[1]
    mean_err, std_err = (values.mean(1) - MU).abs(), (values.std(1) - STD).abs()
    print(f"ddpm: |mean - mu| {mean_err.tolist()}, |std - sigma| {std_err.tolist()}")
    # every step is exact, so only sampling error remains: 4 standard errors
    assert (mean_err < 4 * STD / math.sqrt(count)).all()
    assert (std_err < 4 * STD / math.sqrt(2 * count)).all()


@pytest.mark.parametrize("steps", [50, 250])
def test_ddim_with_the_exact_eps_is_the_affine_map_of_its_closed_form(steps) -> None:
    """For Gaussian data each deterministic DDIM step is affine, x' − √ᾱ'μ = c·(x − √ᾱμ) with
    c = (√(ᾱ'ᾱ)s² + √((1−ᾱ')(1−ᾱ)))/(ᾱs² + 1 − ᾱ) (Cauchy–Schwarz: c ≤ its exact value, equal for s = 1),
    so the sample is μ + Πc·(x_T − √ᾱ_T μ): spread short of the data's by a bias of order 1/steps."""
    kept = respaced_timesteps(1000, steps)
    x_t = torch.randn(2000, 2, 2, 2, generator=torch.Generator().manual_seed(0))
    ddim = Sampler(SamplerConfig(method="ddim", steps=steps), GaussianDiffusion())
    x, nfe = ddim(GaussianOracle(kept), x_t)
    gain = torch.ones(2, dtype=torch.float64)
    for i in range(steps):
        s, var = respaced_step(kept, i), STD.double() ** 2
        gain *= ((math.sqrt(s["ab_prev"] * s["ab"]) * var + math.sqrt((1 - s["ab_prev"]) * (1 - s["ab"])))
                 / (s["ab"] * var + 1 - s["ab"]))
    mu, shape = MU.double()[:, None, None], (2, 1, 1)
    expected = mu + gain.reshape(shape) * (x_t.double() - math.sqrt(ALPHA_BAR[999]) * mu)
    assert nfe == steps
    torch.testing.assert_close(x.double(), expected, rtol=1e-4, atol=1e-4)
    # the sample's spread, relative to that of the noise it came from, converges to the data's
    spread = x.double().transpose(0, 1).reshape(2, -1).std(1) / x_t.double().std()
    spread_bias = spread / STD - 1
    print(f"ddim {steps} steps: spread bias {spread_bias.tolist()}")
    assert (spread_bias < 0).all() and (spread_bias.abs() < 3 / steps).all()


def test_a_per_step_progress_bar_on_request(draws, capsys) -> None:
    predictions, x, noises = draws
    run("ddpm", STEPS, predictions, x, noises)
    assert capsys.readouterr().err == ""
    run("ddpm", STEPS, predictions, x, noises, progress=True)
    assert f"ddpm steps:   0%|          | 0/{STEPS}" in capsys.readouterr().err

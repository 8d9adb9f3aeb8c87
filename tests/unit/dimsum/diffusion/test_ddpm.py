"""The DDPM objective against closed forms: schedule, posterior, KL, discretised-Gaussian NLL, hybrid loss.

References are computed independently of dimsum.diffusion.ddpm: the schedule with numpy, the posterior by
Gaussian conditioning (Bayes' rule), the KL by torch.distributions, the normal CDF with math.erf.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.distributions import Normal, kl_divergence

from dimsum.diffusion import OBJECTIVES, GaussianDiffusion, build_objective
from dimsum.diffusion.ddpm import (
    DiffusionChain,
    approx_standard_normal_cdf,
    discretised_gaussian_log_prob,
    gaussian_kl,
    respaced_timesteps,
)

BETAS = np.linspace(1e-4, 0.02, 1000)  # float64
ALPHA_BAR = np.cumprod(1 - BETAS)


def exact_cdf(z: float) -> float:
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def test_registry_and_channel_split() -> None:
    ddpm = build_objective("ddpm")
    assert isinstance(ddpm, GaussianDiffusion) and OBJECTIVES["ddpm"] is GaussianDiffusion
    assert (ddpm.out_channels(4), ddpm.guided_channels(4)) == (8, 4)
    with pytest.raises(ValueError, match="no flow velocity: sample it with sampler 'ddpm' or 'ddim'"):
        ddpm.velocity(torch.zeros(1, 8, 2, 2), torch.zeros(1, 4, 2, 2), torch.zeros(1))
    with pytest.raises(ValueError, match="ddpm timesteps: got 1; expected an integer >= 2"):
        GaussianDiffusion(timesteps=1)


def test_schedule_is_linear_float64_and_lookups_are_float32() -> None:
    chain = GaussianDiffusion().chain
    assert chain.betas.dtype == torch.float64 and chain.num_steps == 1000
    np.testing.assert_allclose(chain.betas.numpy(), BETAS, rtol=1e-15)
    np.testing.assert_allclose(chain.alpha_bar.numpy(), ALPHA_BAR, rtol=1e-13)
    t = torch.tensor([0, 17, 999])
    for like in (torch.zeros(3, 4, 2, 2), torch.zeros(3, 4, 2, 2, dtype=torch.float64)):
        coef = chain.lookup("sqrt_alpha_bar", t, like)
        assert coef.dtype == torch.float32 and coef.shape == (3, 1, 1, 1)
        assert coef.flatten().tolist() == [np.float32(math.sqrt(ALPHA_BAR[i])) for i in (0, 17, 999)]


def test_gaussian_kl_matches_the_closed_form() -> None:
    g = torch.Generator().manual_seed(0)
    m1, m2, lv1, lv2 = (torch.randn(1000, generator=g, dtype=torch.float64) for _ in range(4))
    expected = kl_divergence(Normal(m1, (0.5 * lv1).exp()), Normal(m2, (0.5 * lv2).exp()))
    torch.testing.assert_close(gaussian_kl(m1, lv1, m2, lv2), expected, rtol=1e-12, atol=1e-12)
    assert gaussian_kl(m1, lv1, m1, lv1).abs().max() < 1e-15


def test_tanh_cdf_deviates_from_the_normal_cdf_as_documented() -> None:
    z = np.linspace(-8, 8, 160001)
    approx = approx_standard_normal_cdf(torch.from_numpy(z)).numpy()
    deviation = np.abs(approx - np.array([exact_cdf(v) for v in z]))
    assert 1.7e-4 < deviation.max() < 1.8e-4  # the docstring's "at most 1.8e-4 (near |x| = 2.6)"
    assert abs(abs(z[deviation.argmax()]) - 2.6) < 0.05


CASES = [  # (x, mean, sigma): interior bins, both open edge bins, a far miss floored at 1e-12
    (0.3, 0.31, 0.01), (-0.5, -0.49, 0.02), (0.0, 0.0, 0.005), (0.7, 0.65, 0.05),
    (-1.0, -0.99, 0.01), (-1.2, -0.95, 0.1), (1.0, 0.995, 0.01), (0.9995, 1.1, 0.1), (0.0, 1.0, 0.01),
]


@pytest.mark.parametrize(("x", "mean", "sigma"), CASES)
def test_discretised_gaussian_log_prob_of_known_bins(x, mean, sigma) -> None:
    log_prob = discretised_gaussian_log_prob(torch.tensor([x], dtype=torch.float64),
                                             torch.tensor([mean], dtype=torch.float64),
                                             torch.tensor([math.log(sigma)], dtype=torch.float64)).item()
    upper, lower = (x - mean + 1 / 255) / sigma, (x - mean - 1 / 255) / sigma

    def tanh_cdf(z: float) -> float:
        return 0.5 * (1 + math.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3)))

    if x < -0.999:
        p_tanh, p_exact = tanh_cdf(upper), exact_cdf(upper)
    elif x > 0.999:
        p_tanh, p_exact = 1 - tanh_cdf(lower), 1 - exact_cdf(lower)
    else:
        p_tanh, p_exact = tanh_cdf(upper) - tanh_cdf(lower), exact_cdf(upper) - exact_cdf(lower)
    assert log_prob == pytest.approx(math.log(max(p_tanh, 1e-12)), rel=1e-9, abs=1e-9)
    if p_exact > 1e-3:  # the bin probability is off by at most twice the CDF deviation
        assert abs(math.exp(log_prob) - p_exact) < 2 * 1.8e-4
    else:
        assert log_prob == pytest.approx(math.log(1e-12))


def test_posterior_is_bayes_rule_and_its_log_variance_is_clipped_at_t0() -> None:
    chain = GaussianDiffusion().chain
    g = torch.Generator().manual_seed(1)
    x0, x_t = torch.randn(5, 4, 2, 2, generator=g), torch.randn(5, 4, 2, 2, generator=g)
    t = torch.tensor([1, 2, 100, 500, 999])
    mean, log_var = chain.posterior(x0, x_t, t)
    for row, i in enumerate(t.tolist()):
        # x_{t-1} | x0 ~ N(√ᾱ_{t-1} x0, 1 - ᾱ_{t-1}) and x_t | x_{t-1} ~ N(√α_t x_{t-1}, β_t)
        prior_var, alpha = 1 - ALPHA_BAR[i - 1], 1 - BETAS[i]
        var = 1 / (1 / prior_var + alpha / BETAS[i])
        expected = var * (math.sqrt(ALPHA_BAR[i - 1]) * x0[row].double() / prior_var
                          + math.sqrt(alpha) * x_t[row].double() / BETAS[i])
        torch.testing.assert_close(mean[row].double(), expected, rtol=1e-5, atol=1e-6)
        assert log_var[row].item() == pytest.approx(math.log(var), rel=1e-6)
    beta_tilde_1 = BETAS[1] * (1 - ALPHA_BAR[0]) / (1 - ALPHA_BAR[1])
    _, log_var_0 = chain.posterior(x0[:1], x_t[:1], torch.tensor([0]))
    assert log_var_0.item() == pytest.approx(math.log(beta_tilde_1), rel=1e-6)
    mean_0, _ = chain.posterior(x0[:1], x_t[:1], torch.tensor([0]))  # q(x_{-1} | x_0, x0) sits at x0
    torch.testing.assert_close(mean_0, x0[:1])


def test_reverse_gaussian_interpolates_the_log_variance_and_uses_the_posterior_mean() -> None:
    chain = GaussianDiffusion().chain
    g = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    t = torch.tensor([0, 10, 999])
    x_t = chain.q_sample(x0, t, eps)
    for v, table in ((1.0, "log_betas"), (-1.0, "posterior_log_variance")):
        mean, log_var, got_eps = chain.reverse_gaussian(torch.cat([eps, torch.full_like(eps, v)], 1), x_t, t)
        assert torch.equal(got_eps, eps)
        torch.testing.assert_close(log_var, chain.lookup(table, t, x_t).expand_as(log_var))
        # the true noise gives back x0, so the model mean is the true posterior mean
        torch.testing.assert_close(mean, chain.posterior(x0, x_t, t)[0], rtol=1e-4, atol=1e-4)
    _, half, _ = chain.reverse_gaussian(torch.cat([eps, torch.zeros_like(eps)], 1), x_t, t)
    both = (chain.lookup("log_betas", t, x_t) + chain.lookup("posterior_log_variance", t, x_t)) / 2
    torch.testing.assert_close(half, both.expand_as(half))


def test_bound_is_the_nll_at_t0_and_the_kl_elsewhere_in_bits() -> None:
    chain = GaussianDiffusion().chain
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(2, 4, 4, 4, generator=g).clamp(-1.2, 1.2)
    prediction = torch.randn(2, 8, 4, 4, generator=g)
    t = torch.tensor([0, 7])
    x_t = chain.q_sample(x0, t, torch.randn(2, 4, 4, 4, generator=g))
    bits = chain.variational_bound_bits(prediction, x0, x_t, t)
    mean, log_var, _ = chain.reverse_gaussian(prediction, x_t, t)
    nll = -discretised_gaussian_log_prob(x0[0], mean[0], 0.5 * log_var[0]).mean() / math.log(2)
    true_mean, true_log_var = chain.posterior(x0, x_t, t)
    kl = gaussian_kl(true_mean[1], true_log_var[1], mean[1], log_var[1]).mean() / math.log(2)
    torch.testing.assert_close(bits, torch.stack([nll, kl]))


def test_uniform_integer_timesteps_reach_the_model_as_floats() -> None:
    seen = []

    def model(x, t, y=None):
        seen.append(t)
        return torch.zeros(x.shape[0], 8, *x.shape[2:])

    torch.manual_seed(0)
    GaussianDiffusion().loss(model, torch.zeros(40000, 4, 1, 1))
    t = seen[0]
    assert t.dtype == torch.float32 and torch.equal(t, t.round())
    counts = torch.bincount(t.long(), minlength=1000)
    assert len(counts) == 1000 and counts.min() > 0
    assert abs(t.mean().item() - 499.5) < 3 * 288.7 / math.sqrt(40000)


def test_hybrid_loss_is_mse_plus_vb_for_the_drawn_t_and_noise() -> None:
    ddpm, g = GaussianDiffusion(), torch.Generator().manual_seed(4)
    x1 = torch.randn(6, 4, 4, 4, generator=g).clamp(-1.5, 1.5)
    weight = torch.randn(8, 4, generator=g) * 0.3

    def model(x, t, y=None):
        return torch.einsum("oc,bchw->bohw", weight, x) + (t / 1000)[:, None, None, None]

    torch.manual_seed(7)
    mse, vb = ddpm.loss_terms(model, x1)
    torch.manual_seed(7)
    loss = ddpm.loss(model, x1)
    torch.manual_seed(7)
    t = torch.randint(0, 1000, (6,))  # the objective's draws, in its order
    noise = torch.randn_like(x1)
    given_mse, given_vb = ddpm.loss_terms(model, x1, t=t, noise=noise)
    assert torch.equal(given_mse, mse) and torch.equal(given_vb, vb)
    x_t = ddpm.chain.q_sample(x1, t, noise)
    prediction = model(x_t, t.float())
    torch.testing.assert_close(mse, (noise - prediction[:, :4]).pow(2).mean(dim=(1, 2, 3)))
    torch.testing.assert_close(vb, ddpm.chain.variational_bound_bits(prediction, x1, x_t, t))
    torch.testing.assert_close(loss, mse + vb)


def test_the_bound_trains_only_the_variance_channels() -> None:
    ddpm = GaussianDiffusion()
    x1 = torch.randn(8, 4, 4, 4, generator=torch.Generator().manual_seed(5)).clamp(-1, 1)
    prediction = torch.randn(8, 8, 4, 4, requires_grad=True)

    def grads(term: int) -> torch.Tensor:
        torch.manual_seed(8)
        (value,) = torch.autograd.grad(ddpm.loss_terms(lambda x, t, y=None: prediction, x1)[term].sum(),
                                       prediction)
        return value

    mse_grad, vb_grad = grads(0), grads(1)
    assert vb_grad[:, :4].abs().max() == 0 and vb_grad[:, 4:].abs().min() > 0
    assert mse_grad[:, 4:].abs().max() == 0 and mse_grad[:, :4].abs().max() > 0


def test_loss_terms_are_float32_for_a_float64_model() -> None:
    # the released t = 0 term is a float32 number; float64 would move it by ~0.6% (spec §11)
    ddpm = GaussianDiffusion()
    x1 = torch.rand(8, 4, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(6)) * 2 - 1
    model_inputs = []

    def model(x, t, y=None):
        model_inputs.append(x.dtype)
        return torch.cat([0.1 * x, torch.full_like(x, -0.9)], 1)

    torch.manual_seed(9)
    mse, vb = ddpm.loss_terms(model, x1)
    assert model_inputs == [torch.float64] and mse.dtype == vb.dtype == torch.float32
    t = torch.tensor([0, 0, 0, 0, 1, 10, 500, 999])  # half of the batch on the ill-conditioned decoder term
    noise = torch.randn(x1.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(10))
    _, vb = ddpm.loss_terms(model, x1, t=t, noise=noise)
    x_t = ddpm.chain.q_sample(x1, t, noise)
    expected = ddpm.chain.variational_bound_bits(model(x_t, t.float()).float(), x1.float(), x_t.float(), t)
    assert torch.equal(vb, expected)


def test_respacing_keeps_evenly_spread_steps_and_their_alpha_bars() -> None:
    kept = respaced_timesteps(1000, 250)
    assert kept[:6] == [0, 4, 8, 12, 16, 20] and kept[-3:] == [991, 995, 999] and len(kept) == 250
    assert kept == [round(i * 999 / 249) for i in range(250)] and len(set(kept)) == 250
    chain = GaussianDiffusion().respaced(250)
    assert isinstance(chain, DiffusionChain) and chain.num_steps == 250
    assert chain.model_times.tolist() == kept
    np.testing.assert_allclose(chain.alpha_bar.numpy(), ALPHA_BAR[kept], rtol=1e-12)
    np.testing.assert_allclose(chain.betas.numpy()[1:], 1 - ALPHA_BAR[kept][1:] / ALPHA_BAR[kept][:-1],
                               rtol=1e-12)
    assert chain.model_time(torch.tensor([0, 1, 249])).tolist() == [0.0, 4.0, 999.0]
    assert respaced_timesteps(1000, 1000) == list(range(1000))
    for bad in (1, 1001):
        with pytest.raises(ValueError, match=f"respaced steps: got {bad}; expected 2..1000"):
            respaced_timesteps(1000, bad)

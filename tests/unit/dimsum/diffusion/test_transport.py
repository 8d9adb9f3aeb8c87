"""Transport: path algebra against finite differences and closed forms, and the flow-matching loss."""

from __future__ import annotations

import pytest
import torch

from dimsum.diffusion.flow import Transport

PATHS = ("GVP", "Linear")


def gaussian(dim: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(dim, dim, generator=g, dtype=torch.float64)
    return torch.randn(dim, generator=g, dtype=torch.float64), a @ a.T / dim + 0.1 * torch.eye(dim)


@pytest.mark.parametrize("path", PATHS)
def test_interpolate_endpoints_and_velocity_is_the_time_derivative(path: str) -> None:
    transport = Transport(path)
    x0, x1 = torch.randn(5, 4, 2, 2, dtype=torch.float64), torch.randn(5, 4, 2, 2, dtype=torch.float64)
    t = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0], dtype=torch.float64)
    x_t, _ = transport.interpolate(x0, x1, t)
    torch.testing.assert_close(x_t[0], x0[0])
    torch.testing.assert_close(x_t[-1], x1[-1])
    h, inner = 1e-6, t.clamp(1e-3, 1 - 1e-3)
    ahead, behind = transport.interpolate(x0, x1, inner + h)[0], transport.interpolate(x0, x1, inner - h)[0]
    numeric = (ahead - behind) / (2 * h)
    torch.testing.assert_close(transport.interpolate(x0, x1, inner)[1], numeric, rtol=1e-6, atol=1e-6)


def test_gvp_path_is_variance_preserving_and_matches_spec() -> None:
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    x0, x1 = torch.zeros(11, 1), torch.ones(11, 1)
    x_t, u_t = Transport("GVP").interpolate(x0.double(), x1.double(), t)
    torch.testing.assert_close(x_t[:, 0], torch.sin(torch.pi * t / 2))
    torch.testing.assert_close(u_t[:, 0], torch.pi / 2 * torch.cos(torch.pi * t / 2))
    _, u_lin = Transport("Linear").interpolate(x0, x1, t.float())
    torch.testing.assert_close(u_lin, torch.ones_like(u_lin))


@pytest.mark.parametrize("path", PATHS)
def test_score_from_velocity_matches_exact_gaussian_score(path: str) -> None:
    transport = Transport(path)
    mean, cov = gaussian()
    x = torch.randn(64, 3, dtype=torch.float64)
    t = torch.rand(64, dtype=torch.float64) * 0.98 + 0.01
    v = transport.gaussian_velocity(mean, cov)(x, t)
    alpha, sigma, *_ = transport.path.coefficients(t)
    marginal_cov = alpha[:, None, None] ** 2 * cov + sigma[:, None, None] ** 2 * torch.eye(3)
    exact = -torch.linalg.solve(marginal_cov, (x - alpha[:, None] * mean)[..., None])[..., 0]
    torch.testing.assert_close(transport.score_from_velocity(v, x, t), exact, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("path", PATHS)
def test_sde_diffusion_matches_documented_closed_form(path: str) -> None:
    transport = Transport(path)
    t = torch.linspace(0, 1, 9, dtype=torch.float64)
    x = torch.randn(9, 2, dtype=torch.float64)
    _, w = transport.sde_drift_and_diffusion(torch.zeros_like(x), x, t, norm=0.5)
    expected = 2 * 0.5 * (1 - t) if path == "Linear" else torch.pi * 0.5 * torch.cos(torch.pi * t / 2)
    torch.testing.assert_close(w[:, 0], expected)
    assert w[-1].abs().max() < 1e-12  # no noise where the score is singular


def test_sample_time_distributions_follow_the_default_generator() -> None:
    torch.manual_seed(0)
    uniform = Transport(time_sampling="uniform").sample_time(20000)
    logit = Transport(time_sampling="logit_normal").sample_time(20000)
    assert uniform.min() >= 0 and uniform.max() < 1 and abs(uniform.mean() - 0.5) < 0.01
    assert logit.min() > 0 and logit.max() < 1 and abs(logit.mean() - 0.5) < 0.01
    assert logit.std() < uniform.std()  # logit-normal concentrates in the middle
    torch.manual_seed(0)
    torch.testing.assert_close(Transport().sample_time(20000), uniform, rtol=0, atol=0)


@pytest.mark.parametrize("path", PATHS)
def test_loss_is_zero_at_exact_field_for_point_mass_and_positive_otherwise(path: str) -> None:
    transport = Transport(path)
    point = torch.tensor([1.5, -0.5, 2.0], dtype=torch.float64)
    exact = transport.gaussian_velocity(point, torch.zeros(3, 3, dtype=torch.float64))
    x1 = point.expand(4096, 3)
    torch.manual_seed(1)
    assert transport.loss(exact, x1).max() < 1e-10
    torch.manual_seed(1)
    assert transport.loss(lambda x, t: torch.zeros_like(x), x1).mean() > 0.5
    torch.manual_seed(1)
    assert transport.loss(lambda x, t: 1.05 * exact(x, t), x1).mean() > 1e-3


@pytest.mark.parametrize("path", PATHS)
def test_exact_gaussian_field_minimises_the_loss(path: str) -> None:
    transport = Transport(path)
    mean, cov = gaussian()
    exact = transport.gaussian_velocity(mean, cov)
    x1 = mean + torch.randn(20000, 3, dtype=torch.float64) @ torch.linalg.cholesky(cov).T
    losses = {}
    for name, field in {"exact": exact, "scaled": lambda x, t: 1.1 * exact(x, t),
                        "shifted": lambda x, t: exact(x, t) + 0.1}.items():
        torch.manual_seed(2)  # same x0 and t for every candidate: a paired comparison
        losses[name] = transport.loss(field, x1).mean().item()
    assert losses["exact"] > 0.01  # Gaussian data: x1 is not determined by x_t, the loss is irreducible
    assert losses["exact"] < losses["scaled"] and losses["exact"] < losses["shifted"]


def test_loss_is_per_sample_mean_over_channels_and_pixels() -> None:
    transport = Transport("Linear")
    x1 = torch.randn(3, 4, 8, 8)
    torch.manual_seed(3)
    loss = transport.loss(lambda x, t, y: torch.zeros_like(x), x1, {"y": torch.zeros(3, dtype=torch.long)})
    torch.manual_seed(3)
    x0, _ = torch.randn_like(x1), transport.sample_time(3)
    assert loss.shape == (3,)
    torch.testing.assert_close(loss, (x1 - x0).pow(2).mean(dim=(1, 2, 3)))


def test_bad_transport_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="path: got 'VP'"):
        Transport("VP")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="time_sampling: got 'beta'"):
        Transport("GVP", "beta")  # type: ignore[arg-type]

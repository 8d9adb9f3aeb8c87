"""Flow-matching transport between noise and data (SiT-style), with the model predicting a velocity.

Time convention: x0 ~ N(0, I) is noise at t = 0, x1 is the data latent at t = 1, and the path point is
x_t = α(t)·x1 + σ(t)·x0 with target velocity u_t = α'(t)·x1 + σ'(t)·x0. Everything the samplers need (the
score and the SDE drift) is derived from these four coefficients, so a new path is one small class.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

Velocity = Callable[[Tensor, Tensor], Tensor]  # (x (B, ...), t (B,)) -> v (B, ...)


class GVPPath:
    """Generalised variance-preserving path (released recipes): α = sin(πt/2), σ = cos(πt/2), α² + σ² = 1."""

    def coefficients(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(α, σ, α', σ') at ``t``."""
        half_pi = math.pi / 2
        sin, cos = torch.sin(half_pi * t), torch.cos(half_pi * t)
        return sin, cos, half_pi * cos, -half_pi * sin


class LinearPath:
    """Straight line (rectified flow): α = t, σ = 1 − t, target x1 − x0."""

    def coefficients(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(α, σ, α', σ') at ``t``."""
        return t, 1 - t, torch.ones_like(t), -torch.ones_like(t)


PATHS = {"GVP": GVPPath, "Linear": LinearPath}


def _expand(t: Tensor, x: Tensor) -> Tensor:
    """(B,) -> (B, 1, 1, ...) so that per-sample times broadcast over x."""
    return t.reshape(-1, *([1] * (x.dim() - 1)))


class Transport:
    """Flow matching (an :class:`~dimsum.diffusion.objective.Objective`) and the path algebra shared by the
    ODE and SDE samplers. The network predicts the velocity: ``in_channels`` outputs, all guided.

    x0 and t come from torch's default generator on purpose (docs/architecture.md, determinism contract).
    """

    def __init__(self, path: Literal["GVP", "Linear"] = "GVP",
                 time_sampling: Literal["uniform", "logit_normal"] = "uniform") -> None:
        if path not in PATHS:
            raise ValueError(f"transport path: got {path!r}; expected one of {', '.join(PATHS)}")
        if time_sampling not in ("uniform", "logit_normal"):
            raise ValueError(f"transport time_sampling: got {time_sampling!r}; "
                             "expected 'uniform' or 'logit_normal'")
        self.path, self.time_sampling = PATHS[path](), time_sampling

    def sample_time(self, n: int, device: torch.device | str = "cpu") -> Tensor:
        """t in [0, 1): uniform, or logit-normal (sigmoid of N(0, 1): favours the middle of the path)."""
        if self.time_sampling == "uniform":
            return torch.rand(n, device=device)
        return torch.sigmoid(torch.randn(n, device=device))

    def interpolate(self, x0: Tensor, x1: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """The path point x_t and its target velocity u_t for per-sample times ``t`` (B,)."""
        alpha, sigma, d_alpha, d_sigma = (_expand(c, x1) for c in self.path.coefficients(t))
        return alpha * x1 + sigma * x0, d_alpha * x1 + d_sigma * x0

    def loss(self, model: Callable[..., Tensor], x1: Tensor, model_kwargs: dict | None = None) -> Tensor:
        """Per-sample MSE (B,) between the predicted and the target velocity, averaged over C, H, W."""
        x0 = torch.randn_like(x1)
        t = self.sample_time(x1.shape[0], x1.device)
        x_t, u_t = self.interpolate(x0, x1, t)
        v = model(x_t, t, **(model_kwargs or {}))
        return (v.float() - u_t.float()).pow(2).mean(dim=tuple(range(1, x1.dim())))

    def out_channels(self, in_channels: int) -> int:
        return in_channels

    def guided_channels(self, in_channels: int) -> int:
        return in_channels

    def velocity(self, prediction: Tensor, x: Tensor, t: Tensor) -> Tensor:
        """The prediction is the velocity."""
        return prediction

    def score_from_velocity(self, v: Tensor, x: Tensor, t: Tensor) -> Tensor:
        """∇log p_t(x) from the velocity, exact for the optimal field (as in SiT).

        From x = α·E[x1|x] + σ·E[x0|x], v = α'·E[x1|x] + σ'·E[x0|x] and score = −E[x0|x]/σ:
        score = (α·v − α'·x) / (σ·(α'σ − σ'α)). Finite at t = 0, singular at t = 1 (σ = 0).
        """
        alpha, sigma, d_alpha, d_sigma = (_expand(c, x) for c in self.path.coefficients(t))
        return (alpha * v - d_alpha * x) / (sigma * (d_alpha * sigma - d_sigma * alpha))

    def sde_drift_and_diffusion(self, v: Tensor, x: Tensor, t: Tensor,
                                norm: float = 1.0) -> tuple[Tensor, Tensor]:
        """Drift and diffusion w(t) of an SDE with the same marginals as dx = v dt.

        For any w ≥ 0, dx = (v + ½·w·score) dt + √w dW keeps p_t (the extra Fokker–Planck terms cancel).
        We take w = 2·norm·σ·(α'σ − σ'α): SiT's "SBDM" coefficient multiplied by α. With it ½·w·score =
        norm·(α·v − α'·x) is finite on all of [0, 1], so no time has to be cut off at either end, and w
        vanishes at t = 1 where the score is singular. Linear: w = 2·norm·(1 − t); GVP: w = π·norm·cos(πt/2).
        """
        alpha, sigma, d_alpha, d_sigma = (_expand(c, x) for c in self.path.coefficients(t))
        drift = v + norm * (alpha * v - d_alpha * x)
        return drift, 2 * norm * sigma * (d_alpha * sigma - d_sigma * alpha)

    def gaussian_velocity(self, mean: Tensor, cov: Tensor) -> Velocity:
        """The exact velocity field E[u_t | x_t] when the data is N(mean, cov) (vectors of shape (B, d)).

        x_t and u_t are jointly Gaussian, so E[u|x] = α'μ + (αα'Σ + σσ'I)(α²Σ + σ²I)⁻¹(x − αμ). A
        closed-form reference to check samplers and losses against, without a trained network.
        """
        eigval, eigvec = torch.linalg.eigh(cov.double())

        def velocity(x: Tensor, t: Tensor) -> Tensor:
            alpha, sigma, d_alpha, d_sigma = (c.double()[:, None] for c in self.path.coefficients(t))
            gain = (alpha * d_alpha * eigval + sigma * d_sigma) / (alpha**2 * eigval + sigma**2)
            centred = (x.double() - alpha * mean.double()) @ eigvec
            return (d_alpha * mean.double() + (gain * centred) @ eigvec.T).to(x.dtype)

        return velocity

"""Gaussian diffusion (DDPM) with a learned-range variance, the objective DiT and LaMamba-Diff train with.

The forward chain has ``T`` linear betas; the network sees x_t and the integer index t (as a float) and
predicts eps in its first C output channels and a variance interpolation value v in the other C. The
loss is mse(eps) plus the variational bound in bits, whose gradient reaches v only (Nichol & Dhariwal's
hybrid objective). Every schedule table is computed once in float64; a lookup casts to float32, and the
loss terms run in float32 whatever the model's dtype, which is what makes the released losses
reproducible: the t = 0 decoder term is ill-conditioned (σ ≈ 0.01 against bins of width 2/255) and moves
by ~0.6% when evaluated in float64 instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

BIN_HALF_WIDTH = 1 / 255  # data in [-1, 1] quantised to 256 levels: bins of width 2/255
EDGE = 0.999  # beyond ±EDGE a value falls in an open edge bin


def linear_betas(timesteps: int) -> Tensor:
    """DDPM's linear schedule in float64, stretched so that any ``timesteps`` spans the same noise range
    as 1000 steps from 1e-4 to 0.02."""
    scale = 1000 / timesteps
    return torch.linspace(scale * 1e-4, scale * 0.02, timesteps, dtype=torch.float64)


def respaced_timesteps(timesteps: int, steps: int) -> list[int]:
    """The ``steps`` indices kept out of ``timesteps``, evenly spread and rounded: 1000 -> 250 keeps
    0, 4, 8, ..., 995, 999."""
    if not 2 <= steps <= timesteps:
        raise ValueError(f"respaced steps: got {steps}; expected 2..{timesteps} (the training chain length)")
    return [round(i * (timesteps - 1) / (steps - 1)) for i in range(steps)]


def gaussian_kl(mean1: Tensor, log_var1: Tensor, mean2: Tensor, log_var2: Tensor) -> Tensor:
    """KL(N(mean1, e^log_var1) || N(mean2, e^log_var2)) elementwise, in nats."""
    return 0.5 * (-1.0 + log_var2 - log_var1 + torch.exp(log_var1 - log_var2)
                  + (mean1 - mean2) ** 2 * torch.exp(-log_var2))


def approx_standard_normal_cdf(x: Tensor) -> Tensor:
    """Φ(x) through the tanh approximation (as in GELU); off from the exact CDF by at most 1.8e-4, near
    |x| = 2.6."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretised_gaussian_log_prob(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """log P(bin of x) under N(mean, e^(2·log_scale)) for x in [-1, 1] on 256 levels, elementwise.

    The bin is x ± 1/255, open-ended below -0.999 and above 0.999; probabilities are floored at 1e-12.
    """
    centred, inv_std = x - mean, torch.exp(-log_scale)
    cdf_upper = approx_standard_normal_cdf(inv_std * (centred + BIN_HALF_WIDTH))
    cdf_lower = approx_standard_normal_cdf(inv_std * (centred - BIN_HALF_WIDTH))
    log_below = torch.log(cdf_upper.clamp(min=1e-12))
    log_above = torch.log((1.0 - cdf_lower).clamp(min=1e-12))
    log_inside = torch.log((cdf_upper - cdf_lower).clamp(min=1e-12))
    return torch.where(x < -EDGE, log_below, torch.where(x > EDGE, log_above, log_inside))


def _mean_flat(x: Tensor) -> Tensor:
    return x.mean(dim=tuple(range(1, x.dim())))


class DiffusionChain:
    """A DDPM chain given by its betas: the forward process q, its posterior and the learned reverse step.

    ``model_times[i]`` is the timestep the network is shown at chain index i: the identity for the
    training chain, the kept original indices for a respaced sampling chain (whose betas are chosen so
    that its ᾱ are the kept ᾱ of the training chain).
    """

    def __init__(self, betas: Tensor, model_times: Tensor | None = None) -> None:
        betas = betas.double()
        if betas.dim() != 1 or len(betas) < 2 or not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError(f"DDPM betas: expected at least 2 values in (0, 1], got {betas.tolist()}")
        self.num_steps = len(betas)
        self.model_times = torch.arange(self.num_steps) if model_times is None else model_times.long()
        alpha_bar = torch.cumprod(1.0 - betas, dim=0)
        alpha_bar_prev = torch.cat([alpha_bar.new_ones(1), alpha_bar[:-1]])
        posterior_variance = betas * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar)
        self.betas, self.alpha_bar, self.alpha_bar_prev = betas, alpha_bar, alpha_bar_prev
        self.sqrt_alpha_bar, self.sqrt_one_minus_alpha_bar = alpha_bar.sqrt(), (1.0 - alpha_bar).sqrt()
        self.sqrt_recip_alpha_bar = (1.0 / alpha_bar).sqrt()
        self.sqrt_recip_alpha_bar_m1 = (1.0 / alpha_bar - 1).sqrt()
        self.posterior_variance = posterior_variance
        # β̃_0 = 0: its log is replaced by log β̃_1 ("clipped"), the lower end of the learned range at t = 0
        self.posterior_log_variance = torch.cat([posterior_variance[1:2], posterior_variance[1:]]).log()
        self.posterior_coef_x0 = betas * alpha_bar_prev.sqrt() / (1.0 - alpha_bar)
        self.posterior_coef_xt = (1.0 - alpha_bar_prev) * (1.0 - betas).sqrt() / (1.0 - alpha_bar)
        self.log_betas = betas.log()
        self._device_tables: dict[torch.device, dict[str, Tensor]] = {}

    def _tables_on(self, device: torch.device) -> dict[str, Tensor]:
        """The tables, copied to ``device`` once: a copy per lookup would stall the CUDA stream."""
        if device not in self._device_tables:
            names = [name for name, value in vars(self).items() if isinstance(value, Tensor)]
            self._device_tables[device] = {name: getattr(self, name).to(device) for name in names}
        return self._device_tables[device]

    def lookup(self, table: str, t: Tensor, like: Tensor) -> Tensor:
        """``self.<table>[t]`` (float64) cast to float32 and shaped (B, 1, ...) to broadcast over ``like``."""
        values = self._tables_on(t.device)[table][t].to(torch.float32)
        return values.reshape(-1, *([1] * (like.dim() - 1)))

    def model_time(self, t: Tensor) -> Tensor:
        """The timestep (float) the network is shown at chain indices ``t``."""
        return self._tables_on(t.device)["model_times"][t].float()

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = √ᾱ_t x0 + √(1 − ᾱ_t) noise."""
        return (self.lookup("sqrt_alpha_bar", t, x0) * x0
                + self.lookup("sqrt_one_minus_alpha_bar", t, x0) * noise)

    def posterior(self, x0: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and (clipped) log-variance of q(x_{t−1} | x_t, x0)."""
        mean = (self.lookup("posterior_coef_x0", t, x_t) * x0
                + self.lookup("posterior_coef_xt", t, x_t) * x_t)
        return mean, self.lookup("posterior_log_variance", t, x_t)

    def predicted_x0(self, eps: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """x̂0 = (x_t − √(1 − ᾱ_t) eps) / √ᾱ_t, not clipped (latents have no fixed range)."""
        return (self.lookup("sqrt_recip_alpha_bar", t, x_t) * x_t
                - self.lookup("sqrt_recip_alpha_bar_m1", t, x_t) * eps)

    def reverse_gaussian(self, prediction: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(mean, log-variance, eps) of the model's p(x_{t−1} | x_t) from a (eps, v) prediction.

        The mean is the posterior mean at x̂0; log σ² = f·log β_t + (1 − f)·log β̃_t with f = (v + 1)/2.
        """
        eps, v = prediction.chunk(2, dim=1)
        fraction = (v + 1) / 2
        log_var = (fraction * self.lookup("log_betas", t, x_t)
                   + (1 - fraction) * self.lookup("posterior_log_variance", t, x_t))
        mean, _ = self.posterior(self.predicted_x0(eps, x_t, t), x_t, t)
        return mean, log_var, eps

    def variational_bound_bits(self, prediction: Tensor, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """Per-sample term of the bound, averaged over (C, H, W), in bits: the KL to the true posterior
        for t > 0, the discretised-Gaussian NLL of x0 for t = 0."""
        true_mean, true_log_var = self.posterior(x0, x_t, t)
        mean, log_var, _ = self.reverse_gaussian(prediction, x_t, t)
        kl = _mean_flat(gaussian_kl(true_mean, true_log_var, mean, log_var)) / math.log(2.0)
        nll = -_mean_flat(discretised_gaussian_log_prob(x0, mean, 0.5 * log_var)) / math.log(2.0)
        return torch.where(t == 0, nll, kl)


class GaussianDiffusion:
    """DDPM with learned sigma as an :class:`~dimsum.diffusion.objective.Objective` (DiT's set-up).

    Training draws t uniformly from 0..T−1 and the noise from torch's default generator (docs/architecture.md,
    determinism contract). Sampling goes through its own chains
    (:meth:`respaced`, the ``ddpm`` and ``ddim`` samplers), not through a velocity.
    """

    def __init__(self, timesteps: int = 1000) -> None:
        if not isinstance(timesteps, int) or timesteps < 2:
            raise ValueError(f"ddpm timesteps: got {timesteps!r}; expected an integer >= 2")
        self.timesteps = timesteps
        self.chain = DiffusionChain(linear_betas(timesteps))

    def out_channels(self, in_channels: int) -> int:
        return 2 * in_channels

    def guided_channels(self, in_channels: int) -> int:
        return in_channels

    def velocity(self, prediction: Tensor, x: Tensor, t: Tensor) -> Tensor:
        raise ValueError("the ddpm objective has no flow velocity: sample it with sampler 'ddpm' or 'ddim'")

    def respaced(self, steps: int) -> DiffusionChain:
        """The sampling chain over ``steps`` kept indices τ_i, with β'_i = 1 − ᾱ_{τ_i}/ᾱ_{τ_{i−1}}
        (ᾱ_{τ_{−1}} = 1) so that its ᾱ'_i are the training chain's ᾱ_{τ_i}."""
        kept = torch.tensor(respaced_timesteps(self.timesteps, steps))
        alpha_bar = self.chain.alpha_bar[kept]
        betas = 1.0 - alpha_bar / torch.cat([alpha_bar.new_ones(1), alpha_bar[:-1]])
        return DiffusionChain(betas, model_times=kept)

    def loss_terms(self, model: Callable[..., Tensor], x1: Tensor, model_kwargs: dict | None = None, *,
                   t: Tensor | None = None, noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Per-sample (mse, vb), each (B,), float32, for data latents ``x1`` at timesteps ``t`` (B,) with
        ``noise`` (both drawn when None, t first).

        vb sees eps detached, so the bound trains the variance channels only and mse the eps channels.
        """
        chain = self.chain
        if t is None:
            t = torch.randint(0, self.timesteps, (x1.shape[0],), device=x1.device)
        if noise is None:
            noise = torch.randn_like(x1)
        x_t = chain.q_sample(x1, t, noise)
        prediction = model(x_t, chain.model_time(t), **(model_kwargs or {})).float()
        eps, v = prediction.chunk(2, dim=1)
        mse = _mean_flat((noise.float() - eps) ** 2)
        frozen_mean = torch.cat([eps.detach(), v], dim=1)
        vb = chain.variational_bound_bits(frozen_mean, x1.float(), x_t.float(), t)
        return mse, vb

    def loss(self, model: Callable[..., Tensor], x1: Tensor, model_kwargs: dict | None = None) -> Tensor:
        """Per-sample hybrid loss mse + vb (B,); no rescaling of vb (DiT's loss type MSE)."""
        mse, vb = self.loss_terms(model, x1, model_kwargs)
        return mse + vb

"""The DDPM objective's own samplers over a respaced chain: ancestral DDPM and DDIM.

Both walk the ``steps``-index chain of :meth:`GaussianDiffusion.respaced` from its last index to 0,
showing the network the original timestep of each kept index, and never clip x̂0. The state stays in
the dtype of ``x`` (fp32); schedule coefficients are float64 tables looked up as float32.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor
from tqdm import tqdm

from dimsum.diffusion.ddpm import DiffusionChain, GaussianDiffusion
from dimsum.diffusion.objective import ModelFn, Objective
from dimsum.sampling.config import SamplerConfig


def _respaced_chain(cfg: SamplerConfig, objective: Objective) -> DiffusionChain:
    if not isinstance(objective, GaussianDiffusion):
        raise ValueError(f"sampler {cfg.method!r} needs the ddpm objective, got {type(objective).__name__}")
    return objective.respaced(cfg.steps)


def _reverse_indices(chain: DiffusionChain, cfg: SamplerConfig) -> Iterable[int]:
    """num_steps − 1, ..., 0, behind a per-step tqdm bar when ``cfg.progress``."""
    return tqdm(range(chain.num_steps - 1, -1, -1), desc=f"{cfg.method} steps", unit="step",
                leave=False, disable=not cfg.progress)


def ddpm(cfg: SamplerConfig, objective: Objective, model_fn: ModelFn, x: Tensor,
         noise: Callable[[], Tensor]) -> Tensor:
    """Ancestral sampling: x ← mean + σ·z with the learned σ, and no noise on the last step (index 0)."""
    chain = _respaced_chain(cfg, objective)
    for i in _reverse_indices(chain, cfg):
        t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
        mean, log_var, _ = chain.reverse_gaussian(model_fn(x, chain.model_time(t)), x, t)
        x = mean + torch.exp(0.5 * log_var) * noise().to(x) if i > 0 else mean
    return x


def ddim(cfg: SamplerConfig, objective: Objective, model_fn: ModelFn, x: Tensor,
         noise: Callable[[], Tensor]) -> Tensor:
    """DDIM: x ← √ᾱ_prev·x̂0 + √(1 − ᾱ_prev − σ²)·eps + σ·z with σ = η·√(β̃'); η = ``cfg.eta``.

    η = 0 is deterministic (``noise`` is never drawn) and ignores the learned variance; η = 1 has the
    ancestral sampler's posterior variance β̃' = (1 − ᾱ_prev)/(1 − ᾱ)·(1 − ᾱ/ᾱ_prev).
    """
    chain = _respaced_chain(cfg, objective)
    for i in _reverse_indices(chain, cfg):
        t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
        eps, _ = model_fn(x, chain.model_time(t)).chunk(2, dim=1)
        x0 = chain.predicted_x0(eps, x, t)
        alpha_bar = chain.lookup("alpha_bar", t, x)
        alpha_bar_prev = chain.lookup("alpha_bar_prev", t, x)
        sigma = cfg.eta * ((1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev)).sqrt()
        x = alpha_bar_prev.sqrt() * x0 + (1 - alpha_bar_prev - sigma**2).sqrt() * eps
        if i > 0 and cfg.eta > 0:
            x = x + sigma * noise().to(x)
    return x

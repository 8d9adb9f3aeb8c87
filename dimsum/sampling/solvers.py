"""The solvers of :data:`dimsum.sampling.SAMPLERS`: ODEs through torchdiffeq, the SDE by Euler–Maruyama.

Each integrates ``objective.velocity`` of the network's prediction from noise (t = 0) to data (t = 1) in
the dtype of ``x0`` (fp32); the SDE's drift and diffusion come from the flow-matching path
(:meth:`Transport.sde_drift_and_diffusion`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
from torch import Tensor
from torchdiffeq import odeint

from dimsum.diffusion.objective import ModelFn, Objective
from dimsum.sampling.config import SamplerConfig

TORCHDIFFEQ_METHODS = {"dopri5": "dopri5", "euler": "euler", "heun": "heun2"}


def _velocity(objective: Objective, model_fn: ModelFn, x: Tensor, t: Tensor) -> Tensor:
    t_batch = t.reshape(1).expand(x.shape[0])
    return objective.velocity(model_fn(x, t_batch), x, t_batch)


def ode(cfg: SamplerConfig, objective: Objective, model_fn: ModelFn, x0: Tensor,
        noise: Callable[[], Tensor]) -> Tensor:
    """dopri5 (adaptive, ``atol``/``rtol``), euler or heun (``steps`` equal steps); ``noise`` is unused."""
    span = torch.tensor([0.0, 1.0], device=x0.device)
    if cfg.method == "dopri5":
        options, tol = None, {"atol": cfg.atol, "rtol": cfg.rtol}
    else:  # fixed grid: build it exactly, torchdiffeq's step_size rounding can add a sliver step
        grid = torch.linspace(0.0, 1.0, cfg.steps + 1, device=x0.device)
        options, tol = {"grid_constructor": lambda *_: grid}, {}
    path = odeint(lambda t, x: _velocity(objective, model_fn, x, t), x0, span,
                  method=TORCHDIFFEQ_METHODS[cfg.method], options=options, **tol)
    return path[-1]


def euler_maruyama(cfg: SamplerConfig, objective: Objective, model_fn: ModelFn, x: Tensor,
                   noise: Callable[[], Tensor]) -> Tensor:
    """``steps`` Euler–Maruyama steps; ``noise()`` draws each Brownian increment (standard normal)."""
    sde = getattr(objective, "sde_drift_and_diffusion", None)
    if sde is None:
        raise ValueError(f"sampler 'sde' needs a flow-matching objective, got {type(objective).__name__}")
    times = torch.linspace(0.0, 1.0, cfg.steps + 1, device=x.device)
    for t, t_next in itertools.pairwise(times):
        t_batch, dt = t.reshape(1).expand(x.shape[0]), t_next - t
        drift, diffusion = sde(_velocity(objective, model_fn, x, t), x, t_batch, cfg.diffusion_norm)
        x = x + drift * dt + (diffusion * dt).sqrt() * noise().to(x)
    return x

"""Samplers behind one registry: ``Sampler(cfg, objective)(model_fn, x0, noise) -> (x1, nfe)``.

``SAMPLERS`` maps ``SamplerConfig.method`` to a solver ``(cfg, objective, model_fn, x0, noise) -> x1``.
Every sampler counts its network evaluations (NFE), the cost that matters when comparing samplers. The
state is integrated in the dtype of ``x0`` (fp32); only the network runs under bf16 autocast when asked
(:func:`guided_prediction`). How to add a sampler: write its solver (a function in ``solvers.py``, or a
module of its own such as ``ddpm.py`` when only one objective can drive it) and add it to the table
below; ``SamplerConfig`` fields carry its settings.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from dimsum.diffusion import Objective, Transport
from dimsum.diffusion.objective import ModelFn
from dimsum.sampling.config import DEFAULT_STEPS, SAMPLERS, SamplerConfig, Solver
from dimsum.sampling.ddpm import ddim, ddpm
from dimsum.sampling.guidance import cfg_combine, guided_prediction
from dimsum.sampling.solvers import euler_maruyama, ode

SAMPLERS.update({"dopri5": ode, "euler": ode, "heun": ode, "sde": euler_maruyama, "ddpm": ddpm, "ddim": ddim})
DEFAULT_STEPS.update({"ddpm": 250, "ddim": 250})

__all__ = ["SAMPLERS", "Sampler", "SamplerConfig", "Solver", "cfg_combine", "guided_prediction"]


class _Counted:
    """A model function that counts its evaluations (NFE)."""

    def __init__(self, model_fn: ModelFn) -> None:
        self.model_fn, self.nfe = model_fn, 0

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        self.nfe += 1
        return self.model_fn(x, t)


class Sampler:
    """``sampler(model_fn, x0, noise) -> (x1, nfe)``: noise at t = 0 to a sample at t = 1.

    ``objective`` reads the prediction (flow matching on ``cfg.path`` when None).
    """

    def __init__(self, cfg: SamplerConfig, objective: Objective | None = None) -> None:
        self.cfg, self.solve = cfg, SAMPLERS[cfg.method]
        self.objective = Transport(cfg.path) if objective is None else objective

    def __call__(self, model_fn: ModelFn, x0: Tensor,
                 noise: Callable[[], Tensor] | None = None) -> tuple[Tensor, int]:
        """``noise()`` draws the SDE's Brownian increments (standard normal, shaped like x0); the ODE
        samplers ignore it. Defaults to the global generator."""
        counted, x0 = _Counted(model_fn), x0.float()
        x1 = self.solve(self.cfg, self.objective, counted, x0, noise or (lambda: torch.randn_like(x0)))
        return x1, counted.nfe

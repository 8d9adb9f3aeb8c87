"""Training objectives behind one registry: ``OBJECTIVES[kind](**options)`` returns an :class:`Objective`.

``flow``: flow matching (:class:`Transport`, options ``path``, ``time_sampling``), sampled by the ODE/SDE
solvers. ``ddpm``: Gaussian diffusion with learned sigma (:class:`GaussianDiffusion`, option
``timesteps``), sampled by its own ``ddpm``/``ddim`` chains. How to add an objective: a module here with
a class implementing :class:`Objective` and, when its samples come from its own chain, a solver
``(cfg, objective, model_fn, x0, noise) -> x1`` for :data:`dimsum.sampling.SAMPLERS`; then one line in
``OBJECTIVES`` below (and its solver in ``SAMPLERS``). The constructor's keyword options, annotated and with
defaults, become the ``objective.*`` config keys (``launch.components.ObjectiveConfig`` reads them off it).
"""

from __future__ import annotations

from typing import Any

from dimsum.diffusion.ddpm import GaussianDiffusion
from dimsum.diffusion.flow import Transport
from dimsum.diffusion.objective import ModelFn, Objective

OBJECTIVES: dict[str, type] = {"flow": Transport, "ddpm": GaussianDiffusion}

__all__ = ["OBJECTIVES", "GaussianDiffusion", "ModelFn", "Objective", "Transport", "build_objective"]


def build_objective(kind: str, **options: Any) -> Objective:
    """``build_objective("flow", path="Linear")``; an unknown kind is an error naming the registered ones."""
    if kind not in OBJECTIVES:
        raise ValueError(f"objective kind: got {kind!r}; expected one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[kind](**options)

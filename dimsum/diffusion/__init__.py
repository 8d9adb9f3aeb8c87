"""Training objectives behind one registry: ``OBJECTIVES[kind](**options)`` returns an :class:`Objective`.

How to add an objective (say ``ddpm``): write ``dimsum/diffusion/ddpm.py`` with a class implementing
:class:`Objective` (``out_channels`` 2C for learned sigma, ``guided_channels`` C for eps, ``loss``
returning the per-sample mse + vb) and, when its samples come from its own chain, a solver
``(cfg, objective, model_fn, x0, noise) -> x1`` for :data:`dimsum.sampling.SAMPLERS`; then add it to
``OBJECTIVES`` below (and its solver to ``SAMPLERS``).
"""

from __future__ import annotations

from typing import Any

from dimsum.diffusion.flow import Transport
from dimsum.diffusion.objective import ModelFn, Objective

OBJECTIVES: dict[str, type] = {"flow": Transport}

__all__ = ["OBJECTIVES", "ModelFn", "Objective", "Transport", "build_objective"]


def build_objective(kind: str, **options: Any) -> Objective:
    """``build_objective("flow", path="Linear")``; an unknown kind is an error naming the registered ones."""
    if kind not in OBJECTIVES:
        raise ValueError(f"objective kind: got {kind!r}; expected one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[kind](**options)

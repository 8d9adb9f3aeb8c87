"""How to sample (:class:`SamplerConfig`) and the table of solvers it names (filled by dimsum.sampling)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Literal

from torch import Tensor

from dimsum.config import Config
from dimsum.diffusion.objective import ModelFn, Objective


@dataclasses.dataclass
class SamplerConfig(Config):
    """How to integrate. ``steps`` is for euler/heun/sde, and the respaced chain length of ddpm/ddim;
    unset, it is the method's :data:`DEFAULT_STEPS` (250 for ddpm/ddim, as in the DiT and LaMamba-Diff
    releases), else 50. ``atol``/``rtol`` are for dopri5.

    ``path`` only matters for the SDE sampler (its drift depends on the path the model was trained on);
    ``diffusion_norm`` scales the SDE's noise (0 turns it into the Euler ODE sampler). ``eta`` is DDIM's
    noise (0: deterministic, 1: the ancestral posterior variance); ``progress`` shows a per-step bar
    (ddpm/ddim).
    """

    method: str = "dopri5"
    steps: int | None = None
    atol: float = 1e-6
    rtol: float = 1e-3
    path: Literal["GVP", "Linear"] = "GVP"
    diffusion_norm: float = 1.0
    eta: float = 0.0
    progress: bool = False

    def __post_init__(self) -> None:
        if self.steps is None:
            self.steps = DEFAULT_STEPS.get(self.method, 50)

    def validate(self) -> None:
        self.check(self.method in SAMPLERS, "method", "expected one of " + ", ".join(map(repr, SAMPLERS)))
        self.check(self.steps > 0, "steps", "expected a positive integer")
        self.check(self.atol > 0, "atol", "expected > 0")
        self.check(self.rtol > 0, "rtol", "expected > 0")
        self.check(self.diffusion_norm >= 0, "diffusion_norm", "expected >= 0")
        self.check(0 <= self.eta <= 1, "eta", "expected 0 <= eta <= 1")


# (cfg, objective, model_fn, x0, noise) -> x1: integrate from noise at t = 0 to a sample at t = 1.
Solver = Callable[[SamplerConfig, Objective, ModelFn, Tensor, Callable[[], Tensor]], Tensor]
SAMPLERS: dict[str, Solver] = {}
DEFAULT_STEPS: dict[str, int] = {}  # a method's steps when the config leaves them unset (else 50)

"""Samplers: integrate a velocity field from noise (t = 0) to data (t = 1), with classifier-free guidance.

ODE samplers go through torchdiffeq (adaptive dopri5, fixed-step euler/heun); the SDE sampler is
Euler–Maruyama with the drift derived from the velocity (see :meth:`Transport.sde_drift_and_diffusion`).
Every sampler counts its network evaluations (NFE), the cost that matters when comparing samplers. The
state is always integrated in fp32; only the network runs under bf16 autocast when asked.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor, nn
from torchdiffeq import odeint

from dimsum.config import Config
from dimsum.diffusion.flow import Transport, Velocity

TORCHDIFFEQ_METHODS = {"dopri5": "dopri5", "euler": "euler", "heun": "heun2"}


@dataclasses.dataclass
class SamplerConfig(Config):
    """How to integrate. ``steps`` is for euler/heun/sde; ``atol``/``rtol`` for dopri5.

    ``path`` only matters for the SDE sampler (its drift depends on the path the model was trained on);
    ``diffusion_norm`` scales the SDE's noise (0 turns it into the Euler ODE sampler).
    """

    method: Literal["dopri5", "euler", "heun", "sde"] = "dopri5"
    steps: int = 50
    atol: float = 1e-6
    rtol: float = 1e-3
    path: Literal["GVP", "Linear"] = "GVP"
    diffusion_norm: float = 1.0

    def validate(self) -> None:
        self.check(self.steps > 0, "steps", "expected a positive integer")
        self.check(self.atol > 0, "atol", "expected > 0")
        self.check(self.rtol > 0, "rtol", "expected > 0")
        self.check(self.diffusion_norm >= 0, "diffusion_norm", "expected >= 0")


def cfg_combine(v_cond: Tensor, v_uncond: Tensor, scale: float) -> Tensor:
    """v = v_u + s·(v_c − v_u), on all channels (as the released code does)."""
    return v_uncond + scale * (v_cond - v_uncond)


def guided_velocity(model: nn.Module, y: Tensor | None, cfg_scale: float = 1.0,
                    autocast_dtype: torch.dtype | None = None) -> Velocity:
    """The model as a velocity field (x, t) -> v for fixed labels ``y`` (None for unconditional models).

    With ``cfg_scale != 1`` the conditional and the null-label inputs go through the network as ONE
    batch [cond, null], which halves the kernel launches against two calls. The output is fp32.
    """
    null = getattr(model, "null_label", None)
    guided = cfg_scale != 1.0
    if guided and (y is None or null is None):
        raise ValueError(f"cfg_scale={cfg_scale} needs a class-conditional model with a null label "
                         f"(labels given: {y is not None}, model null_label: {null})")

    def run(x: Tensor, t: Tensor, labels: Tensor | None) -> Tensor:
        ctx = (torch.autocast(x.device.type, dtype=autocast_dtype) if autocast_dtype is not None
               else contextlib.nullcontext())
        with ctx:
            return model(x, t, labels).float()

    def velocity(x: Tensor, t: Tensor) -> Tensor:
        if not guided:
            return run(x, t, y)
        both = run(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null)]))
        v_cond, v_uncond = both.chunk(2)
        return cfg_combine(v_cond, v_uncond, cfg_scale)

    return velocity


class _CountedField:
    """Adapts (x, t (B,)) -> v to torchdiffeq's f(t scalar, x) and counts evaluations."""

    def __init__(self, velocity: Velocity) -> None:
        self.velocity, self.nfe = velocity, 0

    def __call__(self, t: Tensor, x: Tensor) -> Tensor:
        self.nfe += 1
        return self.velocity(x, t.reshape(1).expand(x.shape[0]))


class Sampler:
    """``sampler(velocity, x0, noise) -> (x1, nfe)``: noise at t = 0 to a sample at t = 1."""

    def __init__(self, cfg: SamplerConfig) -> None:
        self.cfg = cfg
        self.transport = Transport(cfg.path)

    def __call__(self, velocity: Velocity, x0: Tensor,
                 noise: Callable[[], Tensor] | None = None) -> tuple[Tensor, int]:
        """``noise()`` draws the SDE's Brownian increments (standard normal, shaped like x0); the ODE
        samplers ignore it. Defaults to the global generator."""
        field = _CountedField(velocity)
        x0 = x0.float()
        if self.cfg.method == "sde":
            return self._euler_maruyama(field, x0, noise or (lambda: torch.randn_like(x0))), field.nfe
        return self._ode(field, x0), field.nfe

    def _ode(self, field: _CountedField, x0: Tensor) -> Tensor:
        span = torch.tensor([0.0, 1.0], device=x0.device)
        if self.cfg.method == "dopri5":
            options, tol = None, {"atol": self.cfg.atol, "rtol": self.cfg.rtol}
        else:  # fixed grid: build it exactly, torchdiffeq's step_size rounding can add a sliver step
            grid = torch.linspace(0.0, 1.0, self.cfg.steps + 1, device=x0.device)
            options, tol = {"grid_constructor": lambda *_: grid}, {}
        path = odeint(field, x0, span, method=TORCHDIFFEQ_METHODS[self.cfg.method], options=options, **tol)
        return path[-1]

    def _euler_maruyama(self, field: _CountedField, x: Tensor, noise: Callable[[], Tensor]) -> Tensor:
        times = torch.linspace(0.0, 1.0, self.cfg.steps + 1, device=x.device)
        for t, t_next in itertools.pairwise(times):
            t_batch, dt = t.reshape(1).expand(x.shape[0]), t_next - t
            v = field(t, x)
            drift, diffusion = self.transport.sde_drift_and_diffusion(v, x, t_batch, self.cfg.diffusion_norm)
            x = x + drift * dt + (diffusion * dt).sqrt() * noise().to(x)
        return x

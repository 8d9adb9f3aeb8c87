"""The seam between a network, its training objective and the samplers (DiT's ``create_diffusion`` seam).

An objective decides what the network predicts, so the model's output width, the loss, the part of the
output classifier-free guidance combines and how a sampler reads the prediction all come from it.
Flow matching predicts a velocity with ``in_channels`` channels, all guided, integrated as is; DDPM with
learned sigma predicts (eps, v) with ``2 * in_channels`` channels, guides only eps and brings its own
ancestral sampler, which reads the raw prediction instead of :meth:`Objective.velocity`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from torch import Tensor

ModelFn = Callable[[Tensor, Tensor], Tensor]  # (x (B, ...), t (B,)) -> the network's prediction (B, ...)


class Objective(Protocol):
    def out_channels(self, in_channels: int) -> int:
        """Channels the network must output for latents with ``in_channels`` channels."""
        ...

    def guided_channels(self, in_channels: int) -> int:
        """Guidance combines output channels ``[0, n)``; the rest come from the conditional prediction."""
        ...

    def loss(self, model: Callable[..., Tensor], x1: Tensor, model_kwargs: dict | None = None) -> Tensor:
        """Per-sample loss (B,) for data latents ``x1``; randomness from torch's default generator."""
        ...

    def velocity(self, prediction: Tensor, x: Tensor, t: Tensor) -> Tensor:
        """The field dx/dt that the ODE/SDE samplers integrate from noise (t = 0) to data (t = 1)."""
        ...

"""Classifier-free guidance on the part of the prediction the objective names (all of a velocity, eps of
a learned-sigma DDPM), run as one batched network call."""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from dimsum.diffusion.objective import ModelFn


def cfg_combine(v_cond: Tensor, v_uncond: Tensor, scale: float) -> Tensor:
    """v = v_u + s·(v_c − v_u)."""
    return v_uncond + scale * (v_cond - v_uncond)


def guided_prediction(model: nn.Module, y: Tensor | None, cfg_scale: float = 1.0,
                      autocast_dtype: torch.dtype | None = None,
                      guided_channels: int | None = None) -> ModelFn:
    """The model as a function (x, t) -> prediction for fixed labels ``y`` (None: unconditional model).

    With ``cfg_scale != 1`` the conditional and the null-label inputs go through the network as ONE
    batch [cond, null], which halves the kernel launches against two calls. Guidance combines output
    channels ``[0, guided_channels)`` (all when None, as the released code does for a velocity); the
    rest are the conditional prediction's. The output is fp32.
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

    def predict(x: Tensor, t: Tensor) -> Tensor:
        if not guided:
            return run(x, t, y)
        both = run(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null)]))
        cond, uncond = both.chunk(2)
        n = cond.shape[1] if guided_channels is None else guided_channels
        return torch.cat([cfg_combine(cond[:, :n], uncond[:, :n], cfg_scale), cond[:, n:]], dim=1)

    return predict

"""fp32 exponential moving average of weights, kept as named tensors rather than as a model copy.

Why tensors and not a deep-copied module: under ZeRO the fp32 master weights exist only as per-rank
shards of flat optimizer buffers. The trainer hands this class views of exactly those shards (one
fragment per parameter that the rank owns), so the EMA is sharded the same way, costs one fused lerp
per step, needs no communication, and is never computed from bf16 copies. On a single device the same
class takes ``model.named_parameters()`` directly.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor


class EMA:
    """``shadow ← shadow + (1 − decay)·(source − shadow)`` for every named tensor, in fp32."""

    def __init__(self, sources: Mapping[str, Tensor], decay: float = 0.9999) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.num_updates = 0
        self.shadow = {name: t.detach().to(torch.float32, copy=True) for name, t in sources.items()}

    @torch.no_grad()
    def update(self, sources: Mapping[str, Tensor]) -> None:
        """Move the average towards ``sources`` (same names and shapes as at construction)."""
        if sources.keys() != self.shadow.keys():
            differ = sorted(self.shadow.keys() ^ sources.keys())
            raise KeyError(f"EMA.update: names differ from the tracked set, e.g. {differ[0]!r}")
        names = list(self.shadow)
        targets = [sources[n].detach().float() for n in names]
        if targets:
            torch._foreach_lerp_([self.shadow[n] for n in names], targets, 1.0 - self.decay)
        self.num_updates += 1

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": self.shadow}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a saved average; names and shapes must match exactly (a mismatch would corrupt it)."""
        shadow = state["shadow"]
        for name in self.shadow.keys() | shadow.keys():
            if name not in shadow or name not in self.shadow:
                where = "checkpoint" if name not in shadow else "model"
                raise KeyError(f"EMA state: tensor {name!r} is missing from the {where}")
            if shadow[name].shape != self.shadow[name].shape:
                raise ValueError(f"EMA state: {name!r} has shape {tuple(shadow[name].shape)}, "
                                 f"expected {tuple(self.shadow[name].shape)}")
        for name, tensor in shadow.items():
            self.shadow[name].copy_(tensor)
        self.num_updates = int(state["num_updates"])  # the decay stays the configured one

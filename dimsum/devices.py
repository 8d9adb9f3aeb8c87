"""Which torch device a process works on: one rule for train, sample, eval and prepare."""

from __future__ import annotations

import torch

from dimsum.config import ConfigError


def resolve_device(requested: str, field: str = "device") -> str:
    """``auto`` is ``cuda`` when a GPU is visible, else ``cpu``; asking for CUDA without one is an error
    naming ``field`` (the option or config key the value came from)."""
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(field, requested, "CUDA is not available on this machine; use cpu or auto")
    return requested


def rank_device(device: str, local_rank: int) -> torch.device:
    """The device one rank works on: plain ``cuda`` becomes this rank's own GPU (``cuda:LOCAL_RANK``); an
    explicit index or the CPU stays as given."""
    return torch.device("cuda", local_rank) if device == "cuda" else torch.device(device)

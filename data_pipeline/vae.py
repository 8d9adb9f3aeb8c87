"""Loading the SD-VAE (diffusers ``AutoencoderKL``) from a local directory or a hub id.

Failing early matters: encoding ImageNet takes hours, so a wrong path or an offline hub id must stop
the job before any image is read, with a message that says how to fix it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from diffusers import AutoencoderKL

from dimsum.errors import UserError


class VAEError(UserError, RuntimeError):
    """The VAE could not be loaded; the message says what was tried and what to do."""


def load_vae(source: str, device: str | torch.device = "cpu") -> AutoencoderKL:
    """Load ``source``: a local diffusers directory or a hub id (``stabilityai/sd-vae-ft-ema``)."""
    path = Path(source).expanduser()
    looks_local = path.exists() or source.startswith((".", "/", "~"))
    if looks_local and not (path / "config.json").is_file():
        raise VAEError(f"VAE path {str(path)!r} is not a diffusers AutoencoderKL directory "
                       "(expected config.json and the weights inside it)")
    try:
        vae = AutoencoderKL.from_pretrained(str(path) if looks_local else source, low_cpu_mem_usage=False)
    except (OSError, ValueError) as err:
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        hint = (" The hub is unreachable (HF_HUB_OFFLINE is set): download the VAE elsewhere and pass its "
                "local directory instead." if offline
                else " Pass a local directory if the hub is unreachable.")
        raise VAEError(f"could not load VAE {source!r}: {err}.{hint}") from err
    return vae.to(device).eval().requires_grad_(False)

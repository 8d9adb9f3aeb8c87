"""Image decoding, ADM center crop, and SD-VAE encoding of an image together with its mirror image."""

from __future__ import annotations

import io
from typing import Literal, Protocol

import numpy as np
import torch
from PIL import Image


class _Readable(Protocol):
    def read(self, key: str) -> bytes: ...


def center_crop(image: Image.Image, size: int) -> np.ndarray:
    """ADM's (guided-diffusion, used by DiT) center crop to ``size x size`` RGB, uint8 HxWx3.

    Box-filter halving while the short side is at least twice the target is a cheap anti-aliasing
    pre-step; a bicubic resize then brings the short side to ``size`` and the centre is cut out.
    """
    image = image.convert("RGB")
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.Resampling.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.Resampling.BICUBIC)
    pixels = np.asarray(image)
    top, left = (pixels.shape[0] - size) // 2, (pixels.shape[1] - size) // 2
    return pixels[top:top + size, left:left + size]


def to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """uint8 HxWx3 -> float CxHxW in [-1, 1] (the VAE's input range)."""
    return torch.from_numpy(np.array(pixels)).permute(2, 0, 1).float() / 127.5 - 1.0


class DecodedImages(torch.utils.data.Dataset):
    """Item index -> ``(index, image tensor or None, error)``.

    An unreadable image is returned as its error text rather than raised, so one bad JPEG in a DataLoader
    worker neither kills the run nor loses its name: the caller reports it with its key and counts it.
    """

    def __init__(self, source: _Readable, keys: list[str], resolution: int) -> None:
        self.source, self.keys, self.resolution = source, keys, resolution

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str]:
        try:
            with Image.open(io.BytesIO(self.source.read(self.keys[index]))) as image:
                return index, to_tensor(center_crop(image, self.resolution)), ""
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            return index, None, f"{type(err).__name__}: {err}"


def collate(batch: list[tuple[int, torch.Tensor | None, str]]) -> tuple[list[int], torch.Tensor | None, list]:
    """Stack the readable images; keep ``(index, error)`` for the rest."""
    good = [(i, x) for i, x, _ in batch if x is not None]
    errors = [(i, e) for i, x, e in batch if x is None]
    images = torch.stack([x for _, x in good]) if good else None
    return [i for i, _ in good], images, errors


@torch.no_grad()
def encode_with_flip(vae: torch.nn.Module, images: torch.Tensor, store: Literal["sample", "moments"],
                     generator: torch.Generator | None) -> tuple[np.ndarray, np.ndarray]:
    """``(latent, latent_flip)`` float32 arrays for images in [-1, 1] and their horizontal mirrors.

    ``sample``: one posterior sample times ``vae.config.scaling_factor``. ``moments``: the unscaled
    posterior mean and logvar concatenated on the channel axis (2C channels).
    """
    device = next(vae.parameters()).device
    x = torch.cat([images, images.flip(-1)]).to(device)
    posterior = vae.encode(x).latent_dist
    if store == "moments":
        out = torch.cat([posterior.mean, posterior.logvar], dim=1)
    else:
        out = posterior.sample(generator=generator) * vae.config.scaling_factor
    out = out.float().cpu().numpy()
    return out[: len(images)], out[len(images):]

"""``dimsum eval fid``: Fréchet Inception Distance between generated images and a reference set.

Features come from NVIDIA's TorchScript port of the TF Inception-v3 FID network (``inception-2015-12-05.pt``,
the file StyleGAN2-ADA, EDM and clean-fid use), loaded from a LOCAL file with ``torch.jit.load``. The FID
libraries on PyPI (torch-fidelity, clean-fid, pytorch-fid) all import torchvision at import time, and
PyPI's torchvision does not load beside our CPU torch, while the TorchScript file needs nothing but torch.
The network takes float images in [0, 255] at any size and resizes to 299 internally, TF-style.

Reference statistics (mean and covariance of the pool features) are cached in an .npz keyed by a
fingerprint of the reference files, the resolution and the feature network, so a changed folder is
never scored against stale statistics.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from dimsum.devices import resolve_device
from dimsum.errors import UserError
from launch.generate.images import iter_images, npz_batches

INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_URL = f"https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/{INCEPTION_FILE}"


class FIDError(UserError, RuntimeError):
    """FID cannot be computed; the message says which file or input is at fault and what to do."""


def default_inception_path() -> Path:
    return Path(os.environ.get("DIMSUM_INCEPTION") or Path.home() / ".cache" / "dimsum" / INCEPTION_FILE)


def load_inception(path: str | Path, device: str | torch.device = "cpu") -> torch.jit.ScriptModule:
    """The FID Inception network from a local TorchScript file, or an error saying where to get it."""
    path = Path(path)
    if not path.is_file():
        raise FIDError(f"FID needs the Inception-v3 weights file {INCEPTION_FILE!r} (TorchScript), not "
                       f"found at {path}. Download it on a machine with internet access from {INCEPTION_URL} "
                       "and pass --inception PATH or set DIMSUM_INCEPTION=PATH.")
    try:
        with warnings.catch_warnings():  # torch >= 2.10 deprecates TorchScript; loading still works
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.load(str(path), map_location=device).eval()
    except (RuntimeError, ValueError) as err:
        raise FIDError(f"{path}: not a TorchScript archive of the FID Inception network ({err}); expected "
                       f"{INCEPTION_FILE} from {INCEPTION_URL}") from None


class FeatureStats:
    """Running mean and covariance (float64 sums), so 50k × 2048 features never sit in memory."""

    def __init__(self) -> None:
        self.n, self.sum, self.outer = 0, None, None

    def update(self, features: np.ndarray) -> None:
        features = features.astype(np.float64)
        if self.sum is None:
            self.sum, self.outer = np.zeros(features.shape[1]), np.zeros((features.shape[1],) * 2)
        self.n += len(features)
        self.sum += features.sum(0)
        self.outer += features.T @ features

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        if self.n < 2:
            raise FIDError(f"FID needs at least 2 images per set, got {self.n}")
        mean = self.sum / self.n
        return mean, (self.outer - self.n * np.outer(mean, mean)) / (self.n - 1)


@torch.no_grad()
def image_statistics(source: str | Path, network: torch.nn.Module, batch_size: int = 50,
                     resolution: int | None = None,
                     device: str | torch.device = "cpu") -> tuple[np.ndarray, np.ndarray, int]:
    """(mean, covariance, count) of the network's features over every image in ``source``."""
    stats = FeatureStats()
    for images in iter_images(source, batch_size, resolution):
        x = torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float()
        stats.update(network(x, return_features=True).reshape(len(images), -1).double().cpu().numpy())
    return (*stats.mean_cov(), stats.n)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """‖μ1 − μ2‖² + tr Σ1 + tr Σ2 − 2 tr (Σ1 Σ2)^½.

    tr (Σ1 Σ2)^½ is computed as Σ √eig(√Σ1 Σ2 √Σ1): that matrix is symmetric PSD and has the same
    eigenvalues as Σ1 Σ2, so it needs only symmetric eigensolvers, stays real (no imaginary parts to
    discard) and copes with singular covariances (fewer images than features).
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise FIDError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs "
                       f"{sigma2.shape}")
    eigval, eigvec = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    root1 = (eigvec * np.sqrt(eigval.clip(min=0))) @ eigvec.T
    inner = root1 @ sigma2 @ root1
    cross = np.sqrt(np.linalg.eigvalsh((inner + inner.T) / 2).clip(min=0)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * cross)


def fingerprint(source: Path, resolution: int | None, inception: Path) -> str:
    """Changes whenever a reference file, the resolution or the feature network changes."""
    entries: list = [str(source.resolve()), resolution, inception.name, inception.stat().st_size]
    files = [source] if source.is_file() else sorted(
        p for p in source.rglob("*") if p.is_file() and p.name != "lock.mdb")  # LMDB touches its lock on open
    for p in files:
        info = p.stat()
        name = p.name if p == source else str(p.relative_to(source))
        entries.append((name, info.st_size, info.st_mtime_ns))
    return hashlib.sha1(json.dumps(entries).encode()).hexdigest()[:16]


def reference_statistics(ref: Path, network: torch.nn.Module, inception: Path, *, cache_dir: Path,
                         batch_size: int, resolution: int | None,
                         device: str) -> tuple[np.ndarray, np.ndarray, str]:
    """(mean, covariance, where from): precomputed stats, a cache hit, or freshly computed and cached."""
    if ref.suffix == ".npz":
        with np.load(ref) as data:
            if "mu" in data and "sigma" in data:
                return data["mu"], data["sigma"], f"precomputed {ref}"
    cache = cache_dir / f"fid_ref_{fingerprint(ref, resolution, inception)}.npz"
    if cache.is_file():
        with np.load(cache) as data:
            return data["mu"], data["sigma"], f"cache {cache}"
    mu, sigma, n = image_statistics(ref, network, batch_size, resolution, device)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp.npz")
    np.savez(tmp, mu=mu, sigma=sigma, n=n, source=str(ref.resolve()))
    tmp.replace(cache)  # atomic: a crash never leaves a half-written cache entry
    return mu, sigma, f"computed from {n} images, cached at {cache}"


def sample_resolution(samples: Path) -> int | None:
    """The side of the images in an ADM .npz (read from its first image only), None for folders."""
    if samples.suffix != ".npz":
        return None
    first = next(npz_batches(samples, 1), None)
    return None if first is None else first.shape[1]


def fid(samples: Path, ref: Path, *, inception: Path | None = None, resolution: int | None = None,
        cache_dir: Path, batch_size: int = 50, device: str = "auto") -> dict:
    """FID of ``samples`` against ``ref`` (reference statistics cached in ``cache_dir``)."""
    device = resolve_device(device, "--device")
    inception = inception or default_inception_path()
    for name, path in (("samples", samples), ("--ref", ref)):
        if not path.exists():
            raise FIDError(f"{name}: {path} does not exist")
    resolution = resolution or sample_resolution(samples)
    if resolution is None and not (samples.suffix == ".npz" and ref.suffix == ".npz"):
        raise FIDError("image folders need --resolution (the size to center-crop to); it is only implied "
                       "when the samples are an .npz")
    network = load_inception(inception, device)
    mu_ref, sigma_ref, origin = reference_statistics(ref, network, inception, cache_dir=cache_dir,
                                                     batch_size=batch_size, resolution=resolution,
                                                     device=device)
    mu, sigma, n = image_statistics(samples, network, batch_size, resolution, device)
    return {"fid": frechet_distance(mu, sigma, mu_ref, sigma_ref), "samples": str(samples),
            "num_samples": int(n), "reference": origin}

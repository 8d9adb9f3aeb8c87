"""The digits judge: a small CNN that scores samples of the CPU demo's data set (1x16x16 pixel digits).

FID needs Inception weights, which cannot be downloaded here, and Inception features mean little on 16x16
grey digits anyway. A classifier trained on the same digits, in the same pixel space as the demo
(:func:`data_pipeline.demo.digits_pixels`), gives both numbers a diffusion paper reports: whether a
class-conditional sample shows its class (accuracy) and how far the samples' feature distribution is from
the real one (Fréchet distance of the penultimate features, :mod:`launch.generate.quality`).

The judge is trained on a stratified 80 % split with a fixed seed and reports its accuracy on the other
20 %. Training takes seconds on one CPU thread (always one: the weights must not depend on the caller's
thread count) and runs inside ``torch.random.fork_rng``, so a caller's random streams (the trainer's) are
untouched. The result is cached in ``judge-<fingerprint>.pt``; the
fingerprint covers the digits' bytes and this file's source, so a change to either retrains. The file holds
tensors and plain values only (read with ``weights_only=True``) plus a digest of its own tensors: a
truncated, unreadable or altered cache file is detected, reported and replaced, never used.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from data_pipeline.demo import SIZE, digits_pixels
from launch.generate.fid import FeatureStats

SEED = 0
HELD_OUT = 0.2
EPOCHS = 20
BATCH = 64
FEATURES = 64
MIN_ACCURACY = 0.97  # the judge's own held-out accuracy must be at least this for its scores to mean much


class DigitsJudge(nn.Module):
    """Two conv/pool stages (16x16 -> 8x8 -> 4x4) and a 64-unit feature layer before the 10 logits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.hidden = nn.Linear(32 * (SIZE // 4) ** 2, FEATURES)
        self.classify = nn.Linear(FEATURES, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The penultimate (post-ReLU) activations, the space in which distributions are compared."""
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return F.relu(self.hidden(x.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(x))


@dataclasses.dataclass
class Judge:
    """A trained judge with what every score needs: the real digits' features and their statistics."""

    network: DigitsJudge
    held_out_accuracy: float
    real_features: np.ndarray  # (1797, FEATURES) float64, every real digit
    real_mean: np.ndarray
    real_cov: np.ndarray
    fingerprint: str
    origin: str  # "trained" or "cache <path>"

    def score(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(predicted classes (N,), features (N, FEATURES) float64) of images (N, 1, 16, 16) in [-1, 1]."""
        return classify(self.network, images)


@torch.no_grad()
def classify(network: DigitsJudge, images: torch.Tensor, batch: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """:meth:`Judge.score` for a bare network."""
    predictions, features = [], []
    for chunk in images.float().cpu().split(batch):
        f = network.features(chunk)
        predictions.append(network.classify(f).argmax(1).numpy())
        features.append(f.double().numpy())
    return np.concatenate(predictions), np.concatenate(features)


def held_out_split(labels: np.ndarray, seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, held-out indices): ``HELD_OUT`` of every class, drawn with ``seed``."""
    rng = np.random.default_rng(seed)
    held = []
    for digit in range(10):
        members = rng.permutation(np.flatnonzero(labels == digit))
        held.append(members[:round(HELD_OUT * len(members))])
    held_out = np.sort(np.concatenate(held))
    return np.setdiff1d(np.arange(len(labels)), held_out), held_out


def _shifted(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image moved by up to one pixel in each direction (background filled): generated digits are
    rarely centred exactly like the scanned ones, and the judge should not care."""
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dy, dx = torch.randint(0, 3, (2, len(x)), generator=generator)
    rows = (torch.arange(SIZE)[None, :] + dy[:, None])[:, None, :, None].expand(-1, 1, SIZE, SIZE + 2)
    cols = (torch.arange(SIZE)[None, :] + dx[:, None])[:, None, None, :].expand(-1, 1, SIZE, SIZE)
    return padded.gather(2, rows).gather(3, cols)


def train_judge(images: np.ndarray, labels: np.ndarray, seed: int = SEED) -> tuple[DigitsJudge, float]:
    """(network, held-out accuracy), trained with Adam on the training split; the caller's RNG is kept."""
    train, held_out = held_out_split(labels, seed)
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same weights whatever the caller's thread count (reductions differ)
    try:
        network = _fit(x, y, train, seed)
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        predicted = network(x[held_out]).argmax(1)
    return network, float((predicted == y[held_out]).double().mean())


def _fit(x: torch.Tensor, y: torch.Tensor, train: np.ndarray, seed: int) -> DigitsJudge:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        network = DigitsJudge()
        generator = torch.Generator().manual_seed(seed)
        optimizer = torch.optim.Adam(network.parameters(), lr=3e-3)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, EPOCHS)
        for _ in range(EPOCHS):
            order = torch.from_numpy(train)[torch.randperm(len(train), generator=generator)]
            for rows in order.split(BATCH):
                loss = F.cross_entropy(network(_shifted(x[rows], generator)), y[rows])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            schedule.step()
    return network.eval().requires_grad_(False)


def default_cache_dir() -> Path:
    """``$DIMSUM_CACHE/judge``, else ``~/.cache/dimsum/judge`` (beside the FID statistics)."""
    return Path(os.environ.get("DIMSUM_CACHE") or Path.home() / ".cache" / "dimsum") / "judge"


def fingerprint(images: np.ndarray, labels: np.ndarray) -> str:
    """Changes whenever the digits (as the demo preprocesses them) or this module's code change."""
    digest = hashlib.sha256()
    for part in (images.tobytes(), labels.tobytes(), Path(__file__).read_bytes()):
        digest.update(hashlib.sha256(part).digest())
    return digest.hexdigest()[:16]


def _tensor_digest(payload: Mapping[str, Any]) -> str:
    """sha256 over every tensor of the payload (in key order) and the plain values."""
    digest = hashlib.sha256()
    for key in sorted(k for k in payload if k != "digest"):
        value = payload[key]
        tensors = value.items() if isinstance(value, Mapping) else [("", value)]
        for name, item in sorted(tensors, key=lambda kv: kv[0]):
            digest.update(f"{key}.{name}".encode())
            if isinstance(item, torch.Tensor):
                digest.update(item.contiguous().view(torch.uint8).numpy().tobytes())
            else:
                digest.update(repr(item).encode())
    return digest.hexdigest()


def _read_cache(path: Path, expected: str) -> dict[str, Any] | str:
    """The verified payload, or why it cannot be used."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated zip, a pickle of something else, garbage bytes
        return f"unreadable ({type(err).__name__}: {' '.join(str(err).split())[:120]})"
    if not isinstance(payload, dict) or payload.get("digest") != _tensor_digest(payload):
        return "its contents do not match their digest"
    if payload.get("fingerprint") != expected:
        return "it was made for other data or code"
    return payload


def _write_cache(path: Path, payload: dict[str, Any], log: Callable[[str], None]) -> None:
    """Cache the judge atomically (concurrent runs each write a whole file, the last one stays). The cache
    only saves seconds: a full or read-only disk is reported and the judge is used uncached."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(payload, tmp)
        tmp.replace(path)
    except (OSError, RuntimeError) as err:  # torch.save reports a full disk as a RuntimeError
        tmp.unlink(missing_ok=True)
        reason = " ".join(str(err).split())[:160]
        log(f"digits judge: cannot cache it as {path} ({reason}); using it uncached")


def load_judge(cache_dir: str | Path | None = None, log: Callable[[str], None] = print) -> Judge:
    """The judge from ``cache_dir`` (default :func:`default_cache_dir`), trained and cached when the
    cache has no valid entry for the current data and code."""
    images, labels = digits_pixels()
    key = fingerprint(images, labels)
    path = Path(cache_dir or default_cache_dir()) / f"judge-{key}.pt"
    payload: dict[str, Any] | str = _read_cache(path, key) if path.is_file() else "absent"
    origin = f"cache {path}"
    if isinstance(payload, str):
        if payload != "absent":
            log(f"digits judge: ignoring the cache file {path}: {payload}; retraining")
        network, accuracy = train_judge(images, labels)
        payload = {"fingerprint": key, "held_out_accuracy": accuracy, "state_dict": network.state_dict()}
        payload["digest"] = _tensor_digest(payload)
        _write_cache(path, payload, log)
        origin = "trained"
    network = DigitsJudge()
    network.load_state_dict(payload["state_dict"])
    network.eval().requires_grad_(False)
    _, real = classify(network, torch.from_numpy(images))
    stats = FeatureStats()
    stats.update(real)
    return Judge(network, float(payload["held_out_accuracy"]), real, *stats.mean_cov(), key, origin)

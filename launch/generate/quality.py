"""Sample quality on the digits as numbers: accuracy, Fréchet distance, precision and recall.

The judge (:mod:`launch.generate.judge`) reads every sample. A class-conditional model is asked for
``count`` samples with the labels 0, 1, ..., 9, 0, 1, ... (as balanced as the real digits), and its
**accuracy** is the fraction the judge assigns to their own label. **FD** is the Fréchet distance
(:func:`launch.generate.fid.frechet_distance`, the FID formula) between the judge's penultimate features of
the samples and of all 1797 real digits; an unconditional model gets FD (and precision/recall) only.
**Precision** and **recall** are the k-nearest-neighbour manifold estimates of Kynkäänniemi et al. (2019) in
the same feature space: the share of samples that land inside the real digits' manifold (fidelity), and the
share of real digits inside the samples' manifold (coverage, which a mode-collapsed model loses).

Samples come from the model's own noise per index (:func:`launch.generate.sample.sample_batches`), so the
numbers do not depend on the batch size, and sampling never touches torch's global generator.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dimsum.devices import resolve_device
from dimsum.diffusion import Objective
from dimsum.errors import UserError
from dimsum.models import ModelConfig
from dimsum.sampling import SamplerConfig
from launch.config import ExperimentConfig, parse_yaml, saved_config
from launch.generate.fid import FeatureStats, frechet_distance
from launch.generate.judge import Judge, load_judge
from launch.generate.sample import class_conditional, load_model, sample_batches
from launch.generate.weights import checkpoint_dir
from launch.train.state import client_state

NEIGHBOURS = 3  # k of the k-NN manifolds, as in Kynkäänniemi et al.
DIGITS_SHAPE = (1, 16, 16)


class QualityError(UserError, ValueError):
    """The digits metrics cannot score this model or these samples; the message says why."""


def not_digits(cfg: ModelConfig) -> str | None:
    """Why the judge cannot score ``cfg``'s samples (None: it can)."""
    side = cfg.input_size
    if (cfg.in_channels, side, side) == DIGITS_SHAPE and cfg.num_classes in (1, 10):
        return None
    return (f"the digits judge scores 1x16x16 pixel digits (10 classes or unconditional); {cfg.name} makes "
            f"{cfg.in_channels}x{side}x{side} samples of {cfg.num_classes} classes")


def check_digits_model(cfg: ModelConfig, source: str) -> None:
    problem = not_digits(cfg)
    if problem:
        raise QualityError(f"{source}: {problem}")


def _radii(features: np.ndarray, k: int) -> np.ndarray:
    """Distance of every point to its k-th nearest other point of the same set."""
    x = torch.from_numpy(features)
    return torch.cdist(x, x).kthvalue(k + 1, dim=1).values.numpy()  # +1: the point itself is at 0


def _covered(points: np.ndarray, centres: np.ndarray, radii: np.ndarray) -> float:
    """The share of ``points`` inside at least one ball (centre, radius)."""
    distances = torch.cdist(torch.from_numpy(points), torch.from_numpy(centres)).numpy()
    return float((distances <= radii[None, :]).any(axis=1).mean())


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = NEIGHBOURS) -> tuple[float, float]:
    """(precision, recall) of the ``fake`` features against the ``real`` ones (module docstring)."""
    return (_covered(fake, real, _radii(real, k)), _covered(real, fake, _radii(fake, k)))


def digits_metrics(images: torch.Tensor, labels: torch.Tensor | None, judge: Judge) -> dict[str, float]:
    """Scores of samples (N, 1, 16, 16) in [-1, 1] (clamped first, as an image would show them); ``labels``
    are the classes asked for (None: unconditional, no accuracy)."""
    if images.ndim != 4 or tuple(images.shape[1:]) != DIGITS_SHAPE or len(images) < NEIGHBOURS + 1:
        raise QualityError(f"the digits judge needs at least {NEIGHBOURS + 1} samples of shape 1x16x16, got "
                           f"{tuple(images.shape)}")
    broken = int((~torch.isfinite(images)).flatten(1).any(1).sum())
    if broken:
        raise QualityError(f"{broken} of {len(images)} samples hold non-finite values: the model or the "
                           "sampler diverged")
    predicted, features = judge.score(images.clamp(-1, 1))
    stats = FeatureStats()
    stats.update(features)
    metrics = {"fd": frechet_distance(*stats.mean_cov(), judge.real_mean, judge.real_cov)}
    metrics["precision"], metrics["recall"] = precision_recall(judge.real_features, features)
    if labels is not None:
        metrics["accuracy"] = float((predicted == labels.cpu().numpy()).mean())
    return metrics


def sample_quality(model: nn.Module, objective: Objective, judge: Judge, *, count: int,
                   sampler: SamplerConfig, cfg_scale: float, seed: int,
                   batch_size: int = 100) -> dict[str, float]:
    """Draw ``count`` samples (balanced labels when class-conditional) and score them; adds ``nfe``, the
    network evaluations per sample batch."""
    check_digits_model(model.cfg, model.cfg.name)
    conditional = class_conditional(model)
    labels = torch.arange(count) % 10 if conditional else None
    parts, nfes = [], []
    for _, samples, nfe in sample_batches(model, labels, range(count), sampler=sampler, objective=objective,
                                          cfg_scale=cfg_scale if conditional else 1.0, seed=seed,
                                          batch_size=batch_size):
        parts.append(samples.cpu())
        nfes.append(nfe)
    return {**digits_metrics(torch.cat(parts), labels, judge), "nfe": float(np.mean(nfes)),
            "count": float(count)}


def _run_config(config: Mapping[str, Any] | None) -> ExperimentConfig:
    """The config a run was saved with (defaults when unknown)."""
    return saved_config(config) if isinstance(config, Mapping) else ExperimentConfig()


def load_for_eval(path: Path, *, step: int | None, which: str, device: str,
                  objective_settings: Mapping[str, Any]) -> tuple[nn.Module, Objective, ExperimentConfig]:
    """(model, objective, the config it was trained with) from a run directory or an exported safetensors
    file (whose config YAML, written beside it by ``dimsum export``, holds the run's config)."""
    if path.is_dir():
        run = _run_config(client_state(checkpoint_dir(path, step))["config"])
        source = argparse.Namespace(weights=None, released=None, run=path, step=step, which=which)
    elif path.is_file():
        if step is not None:
            raise QualityError(f"--step: {path} is one exported file; --step is for run directories")
        beside = path.with_suffix(".yaml")
        run = _run_config(parse_yaml(beside.read_text()) if beside.is_file() else None)
        source = argparse.Namespace(weights=path, released=None, run=None)
    else:
        raise QualityError(f"{path}: no such run directory or weights file")
    model, objective = load_model(source, device, objective_settings)
    check_digits_model(model.cfg, str(path))
    return model, objective, run


def eval_digits(path: Path, *, count: int | None, sampler_settings: Mapping[str, Any],
                objective_settings: Mapping[str, Any], cfg_scale: float | None = None,
                step: int | None = None, which: str = "ema", seed: int | None = None,
                cache_dir: Path | None = None, device: str = "auto",
                log: Callable[[str], None] = print) -> dict[str, Any]:
    """``dimsum eval digits``: the scores of ``count`` samples drawn as the run's quality hook draws them
    (``None``: the run's ``quality.count`` and ``seed``; its grid sampler and ``quality.cfg_scale`` unless
    ``sampler_settings``/``cfg_scale`` say otherwise), so the figures it logged are reproduced."""
    if count is not None and count <= NEIGHBOURS:
        raise QualityError(f"--count: got {count}; expected more than {NEIGHBOURS} samples")
    device = resolve_device(device, "--device")
    model, objective, run = load_for_eval(path, step=step, which=which, device=device,
                                          objective_settings=objective_settings)
    count = run.quality.count if count is None else count
    seed = run.seed if seed is None else seed
    sampler = SamplerConfig.from_dict({**run.grid.sampler.to_dict(), **sampler_settings}, "sampler")
    scale = run.quality.cfg_scale if cfg_scale is None else cfg_scale
    judge = load_judge(cache_dir, log=log)
    metrics = sample_quality(model, objective, judge, count=count, sampler=sampler, cfg_scale=scale,
                             seed=seed)
    return {**metrics, "weights": str(path), "model": model.cfg.name, "cfg_scale": scale,
            "sampler": sampler.to_dict(), "judge_held_out_accuracy": judge.held_out_accuracy,
            "judge": judge.origin}

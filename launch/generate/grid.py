"""The trainer's EMA sample grid: ``RUN/samples/step-NNNNNNN.png`` from a checkpoint, as ``grid:`` says."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dimsum.diffusion import Objective
from launch.config import ExperimentConfig
from launch.generate.images import save_grid
from launch.generate.sample import class_conditional, decode, generate
from launch.generate.weights import instantiate, load_run_weights
from launch.train.checkpoint import step_name


def ema_model(run_dir: Path, step: int, cfg: ExperimentConfig, device: str) -> tuple[nn.Module, Objective]:
    """The EMA network of a run's checkpoint, ready to sample, and the objective it is trained with."""
    model_cfg, state = load_run_weights(run_dir, step, "ema")
    objective = cfg.objective.build()
    model = instantiate(model_cfg, state, f"{run_dir} step {step}", device,
                        objective.out_channels(model_cfg.in_channels))
    return model, objective


def write_grid(run_dir: Path, step: int, cfg: ExperimentConfig, manifest: Mapping[str, Any], *, device: str,
               log: Callable[[str], None] = print) -> Path | None:
    """EMA samples of a checkpoint as ``RUN/samples/step-NNNNNNN.png``: one column per class (up to 16
    evenly spaced classes) when class-conditional. Returns None (after a warning) when the decoder
    cannot be loaded."""
    grid = cfg.grid
    vae = None
    if manifest.get("space") != "pixels":
        from data_pipeline.vae import load_vae

        try:
            vae = load_vae(manifest["vae"], device)
        except Exception as err:
            log(f"sample grid skipped: cannot load the VAE {manifest.get('vae')!r} ({err})")
            return None
    model, objective = ema_model(run_dir, step, cfg, device)
    model_cfg = model.cfg
    conditional = class_conditional(model)
    columns = min(model_cfg.num_classes, 16) if conditional else 8
    spread = model_cfg.num_classes // columns  # e.g. every 62nd ImageNet class, every digit
    labels = (torch.arange(grid.count) % columns) * spread if conditional else None
    scale = grid.cfg_scale if conditional else 1.0
    samples = generate(model, labels, num=grid.count, cfg_scale=scale, sampler=grid.sampler,
                       objective=objective, seed=cfg.seed)
    path = save_grid(decode(samples, vae), run_dir / "samples" / f"{step_name(step)}.png", nrow=columns)
    log(f"sample grid: {path}")
    return path

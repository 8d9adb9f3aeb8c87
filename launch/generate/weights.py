"""Build a ready-to-sample model from wherever its weights live.

Three sources: an exported safetensors file (``dimsum export``; it carries its own ModelConfig in the
metadata, so nothing has to be restated), a released DiMSUM checkpoint (converted to our names; the
config is read off the tensor shapes, with the released behaviour switches), or a run directory.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dimsum.config import ConfigError
from dimsum.errors import UserError
from dimsum.models import ModelConfig, build_model

CONFIG_METADATA_KEY = "dimsum_model_config"


class WeightsError(UserError, ValueError):
    """Weights cannot be turned into a model; the message names the file and what is wrong."""


def load_exported(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(config, state dict) from a safetensors file written by ``dimsum export``."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such weights file")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            state_dict = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 -- not a dict
    except SafetensorError as err:
        raise WeightsError(f"{path}: not a readable safetensors file ({err})") from None
    if CONFIG_METADATA_KEY not in metadata:
        raise WeightsError(f"{path}: safetensors metadata has no {CONFIG_METADATA_KEY!r} entry (keys: "
                           f"{sorted(metadata)}); export with 'dimsum export', or pass a released checkpoint "
                           "with --released")
    try:
        cfg = ModelConfig.from_dict(json.loads(metadata[CONFIG_METADATA_KEY]), CONFIG_METADATA_KEY)
    except json.JSONDecodeError as err:
        raise WeightsError(f"{path}: metadata {CONFIG_METADATA_KEY!r} is not JSON ({err})") from None
    except ConfigError as err:
        raise WeightsError(f"{path}: invalid model config in the metadata: {err}") from None
    return cfg, state_dict


def load_released_checkpoint(path: str | Path, which: str = "ema", name: str | None = None,
                             overrides: Mapping[str, Any] | None = None) -> tuple[ModelConfig, dict]:
    """(config, state dict) from a released checkpoint (``which``: "ema" or "raw"); ``name`` forces a size."""
    from dimsum.models.dimsum.released import config_from_state_dict, released_config
    from launch.generate.released import load_released

    try:
        state_dict = load_released(path, which="ema" if which == "ema" else "model")
        overrides = dict(overrides or {})
        if name is None:
            return config_from_state_dict(state_dict, **overrides), state_dict
        inferred = config_from_state_dict(state_dict)
    except (FileNotFoundError, ValueError) as err:  # ConfigError (a bad override) included
        raise WeightsError(f"{path}: {err}" if str(path) not in str(err) else str(err)) from None
    sizes = {"input_size": inferred.input_size, "num_classes": inferred.num_classes,
             "label_dropout": inferred.label_dropout}
    return released_config(name, **{**sizes, **overrides}), state_dict


def load_run(run_dir: str | Path, step: int | None = None, which: str = "ema") -> tuple[ModelConfig, dict]:
    """(config, state dict) straight from a training run's checkpoint (the exporter's own reader)."""
    from launch.generate.export import ExportError, load_run_weights

    try:
        return load_run_weights(run_dir, step=step, which=which)
    except ExportError as err:
        raise WeightsError(str(err)) from None


def instantiate(cfg: ModelConfig, state_dict: Mapping[str, torch.Tensor], source: str,
                device: str | torch.device = "cpu") -> nn.Module:
    """Build ``cfg`` and load ``state_dict`` strictly: a missing or extra key is an error, never ignored."""
    model = build_model(cfg)
    try:
        result = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise WeightsError(f"{source}: weights do not fit {cfg.name}: {err}") from None
    if result.missing_keys or result.unexpected_keys:
        raise WeightsError(f"{source}: weights do not match {cfg.name} ({cfg.family}, depth {cfg.depth}, "
                           f"width {cfg.hidden_size}): missing {result.missing_keys[:5]}, "
                           f"unexpected {result.unexpected_keys[:5]}")
    return model.to(device).eval().requires_grad_(False)

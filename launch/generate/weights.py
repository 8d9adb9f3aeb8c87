"""Build a ready-to-sample model from wherever its weights live.

Three sources: an exported safetensors file (``dimsum export``; it carries its own ModelConfig and
objective in the metadata, so nothing has to be restated), a released DiMSUM or LaMamba-Diff checkpoint
(converted to our names; the config is read off the tensor shapes, with the released behaviour switches),
or a run directory, whose checkpoints this module reads for the exporter, the sample grid and
``dimsum sample``.

Only complete checkpoints whose checksums verify are read (launch/train/checkpoint.py: DeepSpeed's files
are unpickled, so nothing else may be); without a step a damaged newest one is skipped, with a warning,
for the newest intact one. Raw weights are consolidated from the ZeRO shards with DeepSpeed's
``zero_to_fp32`` (any stage, no process group needed); the EMA from our per-rank shards, with frozen
parameters and buffers (which the EMA does not track because they never change) taken from the raw ones.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from dimsum.config import ConfigError
from dimsum.errors import UserError
from dimsum.models import REGISTRY, ModelConfig, build_model
from dimsum.models.dimsum.released import config_from_state_dict, released_config
from dimsum.models.lamamba import released as lamamba_released
from launch.components import ObjectiveConfig
from launch.config import saved_config
from launch.generate.released import convert_released, read_released, released_family
from launch.logs import warn
from launch.train.checkpoint import CheckpointManager, damage
from launch.train.state import client_state, consolidate_ema

CONFIG_METADATA_KEY = "dimsum_model_config"
OBJECTIVE_METADATA_KEY = "dimsum_objective_config"


class WeightsError(UserError, ValueError):
    """Weights cannot be turned into a model; the message names the file and what is wrong."""


def load_exported(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(config, state dict) from a safetensors file written by ``dimsum export``."""
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
    """(config, state dict) from a released checkpoint (``which``: "ema" or "raw"); ``name`` forces a size.

    The family, and with it the released format, is ``name``'s, or read off the key names without one
    (DiMSUM sizes are then inferred from shapes; LaMamba-Diff is its one released size, XL).
    """
    try:
        released = read_released(path, which="ema" if which == "ema" else "model")
        family = REGISTRY[name].family if name in REGISTRY else released_family(released)
        state_dict = convert_released(released, family, path)
        overrides = dict(overrides or {})
        if family == "lamamba":
            size = name or "LaMamba-Diff-XL"
            return lamamba_released.config_from_state_dict(state_dict, size, **overrides), state_dict
        if name is None:
            return config_from_state_dict(state_dict, **overrides), state_dict
        inferred = config_from_state_dict(state_dict)
    except (FileNotFoundError, ValueError) as err:  # ConfigError (a bad override) included
        raise WeightsError(f"{path}: {err}" if str(path) not in str(err) else str(err)) from None
    sizes = {"input_size": inferred.input_size, "num_classes": inferred.num_classes,
             "label_dropout": inferred.label_dropout}
    return released_config(name, **{**sizes, **overrides}), state_dict


def checkpoint_dir(run_dir: str | Path, step: int | None = None) -> Path:
    """The intact complete checkpoint of ``step`` (default: the newest intact one) in ``run_dir``."""
    run_dir = Path(run_dir)
    manager = CheckpointManager(run_dir, log=lambda _: None)
    complete, _ = manager.scan()
    if not complete:
        raise WeightsError(f"{run_dir}: no complete checkpoint (step-NNNNNNN/ with a COMPLETE marker)")
    if step is not None:
        chosen = [c for c in complete if c.step == step]
        if not chosen:
            raise WeightsError(f"{run_dir}: no complete checkpoint at step {step}; "
                              f"complete steps: {', '.join(str(c.step) for c in complete)}")
        complete = chosen
    problems = []
    for ckpt in reversed(complete):
        problem = damage(ckpt.path)
        if problem is None:
            for line in problems:
                warn(f"{line}; using {ckpt.path.name} instead")
            return ckpt.path
        problems.append(f"checkpoint {ckpt.path} is damaged: {problem}")
    raise WeightsError("; ".join(problems))


def raw_weights(step_dir: Path) -> dict[str, torch.Tensor]:
    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed's logger binds stdout at import; ours is data
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # chatty
        state = get_fp32_state_dict_from_zero_checkpoint(str(step_dir.parent), tag=step_dir.name)
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def load_run_weights(run_dir: str | Path, step: int | None = None,
                     which: str = "ema") -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(model config, full fp32 state dict) of a run's checkpoint: ``which`` is "ema" or "raw"."""
    return step_weights(checkpoint_dir(run_dir, step), which)


def step_weights(step_dir: Path, which: str) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """:func:`load_run_weights` of one verified checkpoint directory."""
    if which not in ("ema", "raw"):
        raise WeightsError(f"which={which!r}: expected 'ema' or 'raw'")
    info = client_state(step_dir)
    model_cfg = ModelConfig.from_dict(info["config"]["model"], "model")
    state = raw_weights(step_dir)
    if which == "ema":
        ema = consolidate_ema(step_dir)
        unknown = sorted(ema.keys() - state.keys())
        if unknown:
            raise WeightsError(f"{step_dir}: EMA tensor {unknown[0]!r} is not a model parameter")
        state.update(ema)
    return model_cfg, state


def load_run(run_dir: str | Path, step: int | None = None,
             which: str = "ema") -> tuple[ModelConfig, dict[str, torch.Tensor], ObjectiveConfig]:
    """(model config, state dict, objective) of a run's checkpoint; a config saved before the
    ``objective:`` section existed reads as flow matching on the path it named (GVP by default)."""
    step_dir = checkpoint_dir(run_dir, step)
    return *step_weights(step_dir, which), saved_config(client_state(step_dir)["config"]).objective


def exported_objective(path: str | Path) -> ObjectiveConfig:
    """The objective an exported file was trained with (files exported before it was recorded: flow/GVP)."""
    with safe_open(str(path), framework="pt") as f:
        text = (f.metadata() or {}).get(OBJECTIVE_METADATA_KEY)
    try:
        return ObjectiveConfig.from_dict(json.loads(text) if text else {}, OBJECTIVE_METADATA_KEY)
    except (json.JSONDecodeError, ConfigError) as err:
        raise WeightsError(f"{path}: invalid objective in the metadata: {err}") from None


def instantiate(cfg: ModelConfig, state_dict: Mapping[str, torch.Tensor], source: str,
                device: str | torch.device = "cpu", out_channels: int | None = None) -> nn.Module:
    """Build ``cfg`` (with the objective's ``out_channels``; None: the family's default) and load
    ``state_dict`` strictly: a missing or extra key is an error, never ignored."""
    model = build_model(cfg, out_channels)
    try:
        result = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise WeightsError(f"{source}: weights do not fit {cfg.name}: {err}") from None
    if result.missing_keys or result.unexpected_keys:
        raise WeightsError(f"{source}: weights do not match {cfg.name} ({cfg.family}, depth {cfg.depth}, "
                           f"width {cfg.hidden_size}): missing {result.missing_keys[:5]}, "
                           f"unexpected {result.unexpected_keys[:5]}")
    return model.to(device).eval().requires_grad_(False)

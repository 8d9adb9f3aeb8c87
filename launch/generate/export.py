"""``dimsum export RUN [--step N] [--raw] [--out FILE]``: one safetensors file from a run's checkpoint.

The file holds our state-dict keys, fp32, with ``{"dimsum_model_config": json}`` in its metadata, and
the run's resolved config YAML is written beside it: exactly what ``dimsum sample`` reads. The EMA is the
default (the weights to sample with); ``--raw`` exports the trained fp32 master weights instead.

Only complete checkpoints whose checksums verify are read (see launch/train/checkpoint.py: DeepSpeed's files
are unpickled, so nothing else may be); without ``--step`` a damaged newest one is skipped, with a
warning, for the newest intact one. Raw weights are consolidated from the ZeRO shards with DeepSpeed's
``zero_to_fp32`` (any stage, no process group needed); the EMA from our per-rank shards, with frozen
parameters and buffers (which the EMA does not track because they never change) taken from the raw ones.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from dimsum.errors import UserError
from dimsum.models import ModelConfig, build_model
from launch.config import ExperimentConfig, dump_config
from launch.train.checkpoint import CheckpointManager, damage, step_name
from launch.train.state import client_state, consolidate_ema

CONFIG_METADATA_KEY = "dimsum_model_config"


class ExportError(UserError, ValueError):
    """The run directory or step cannot be exported; the message says which and why."""


def checkpoint_dir(run_dir: str | Path, step: int | None = None) -> Path:
    """The intact complete checkpoint of ``step`` (default: the newest intact one) in ``run_dir``."""
    run_dir = Path(run_dir)
    manager = CheckpointManager(run_dir, log=lambda _: None)
    complete, _ = manager.scan()
    if not complete:
        raise ExportError(f"{run_dir}: no complete checkpoint (step-NNNNNNN/ with a COMPLETE marker)")
    if step is not None:
        chosen = [c for c in complete if c.step == step]
        if not chosen:
            raise ExportError(f"{run_dir}: no complete checkpoint at step {step}; "
                              f"complete steps: {', '.join(str(c.step) for c in complete)}")
        complete = chosen
    problems = []
    for ckpt in reversed(complete):
        problem = damage(ckpt.path)
        if problem is None:
            for line in problems:
                print(f"WARNING: {line}; using {ckpt.path.name} instead", file=sys.stderr, flush=True)
            return ckpt.path
        problems.append(f"checkpoint {ckpt.path} is damaged: {problem}")
    raise ExportError("; ".join(problems))


def raw_weights(step_dir: Path) -> dict[str, torch.Tensor]:
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
        raise ExportError(f"which={which!r}: expected 'ema' or 'raw'")
    info = client_state(step_dir)
    model_cfg = ModelConfig.from_dict(info["config"]["model"], "model")
    state = raw_weights(step_dir)
    if which == "ema":
        ema = consolidate_ema(step_dir)
        unknown = sorted(ema.keys() - state.keys())
        if unknown:
            raise ExportError(f"{step_dir}: EMA tensor {unknown[0]!r} is not a model parameter")
        state.update(ema)
    return model_cfg, state


def export(run_dir: str | Path, out: str | Path | None = None, step: int | None = None,
           which: str = "ema") -> Path:
    """Write ``out`` (default ``RUN/export/step-NNNNNNN-<which>.safetensors``) and its config YAML."""
    from safetensors.torch import save_file

    if out is not None and Path(out).is_dir():
        raise ExportError(f"--out: {out} is a directory; expected a .safetensors file path")
    step_dir = checkpoint_dir(run_dir, step)
    model_cfg, state = step_weights(step_dir, which)
    out = Path(out) if out else Path(run_dir) / "export" / f"{step_dir.name}-{which}.safetensors"
    out.parent.mkdir(parents=True, exist_ok=True)
    metadata = {CONFIG_METADATA_KEY: json.dumps(model_cfg.to_dict()), "weights": which, "step": step_dir.name}
    save_file({k: v.contiguous() for k, v in state.items()}, str(out), metadata=metadata)
    config = ExperimentConfig.from_dict(client_state(step_dir)["config"])
    out.with_suffix(".yaml").write_text(dump_config(config))
    return out


def write_grid(run_dir: Path, step: int, cfg: ExperimentConfig, manifest: Mapping[str, Any], *, device: str,
               log: Callable[[str], None] = print) -> Path | None:
    """EMA samples of a checkpoint as ``RUN/samples/step-NNNNNNN.png``: one column per class (up to 16
    evenly spaced classes) when class-conditional. Returns None (after a warning) when the decoder
    cannot be loaded."""
    from launch.generate.images import save_grid
    from launch.generate.sample import decode, generate

    t = cfg.train
    vae = None
    if manifest.get("space") != "pixels":
        from data_pipeline.vae import load_vae

        try:
            vae = load_vae(manifest["vae"], device)
        except Exception as err:
            log(f"sample grid skipped: cannot load the VAE {manifest.get('vae')!r} ({err})")
            return None
    model_cfg, state = load_run_weights(run_dir, step, "ema")
    model = build_model(model_cfg).to(device)
    model.load_state_dict(state)
    model.eval()
    conditional = model.null_label is not None or model_cfg.num_classes > 1
    columns = min(model_cfg.num_classes, 16) if conditional else 8
    spread = model_cfg.num_classes // columns  # e.g. every 62nd ImageNet class, every digit
    labels = (torch.arange(t.sample_count) % columns) * spread if conditional else None
    scale = t.sample_cfg_scale if conditional else 1.0
    samples = generate(model, labels, num=t.sample_count, cfg_scale=scale, sampler="euler",
                       steps=t.sample_steps, seed=cfg.seed)
    path = save_grid(decode(samples, vae), run_dir / "samples" / f"{step_name(step)}.png", nrow=columns)
    log(f"sample grid: {path}")
    return path

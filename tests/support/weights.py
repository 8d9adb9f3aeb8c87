"""Tiny models with perturbed weights, saved in the ``dimsum export`` format (the sampling tests)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from dimsum.models import ModelConfig, build_model
from launch.generate.weights import CONFIG_METADATA_KEY


def export(model: torch.nn.Module, path: Path) -> Path:
    """The 'dimsum export' format: our state-dict keys, the ModelConfig as JSON in the metadata."""
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, path, metadata={CONFIG_METADATA_KEY: json.dumps(model.cfg.to_dict())})
    return path


def randomised(cfg: ModelConfig, seed: int = 0) -> torch.nn.Module:
    """``cfg`` built with every weight perturbed: the zero-initialised head would make every velocity 0."""
    torch.manual_seed(seed)
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()

"""Every experiment recipe loads through ``dimsum config show`` and states model.md §8's numbers."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from launch.cli import main
from launch.config import load_config
from launch.train.deepspeed_engine import deepspeed_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RECIPES = sorted(p for p in CONFIGS.glob("*.yaml") if p.name != "base.yaml")


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_loads_through_the_cli(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "show", str(path)]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown == load_config(path).to_dict() and shown["name"] == path.stem


@pytest.mark.parametrize("recipe", [
    ("imagenet_l2", "DiMSUM-L/2", 704, 1e-4, 1.0, 1000, 0.15),
    ("imagenet_xl2", "DiMSUM-XL/2", 704, 1e-4, 1.0, 1000, 0.15),
    ("celeba_l2", "DiMSUM-L/2", 16, 1e-4, 2.0, 1, 0.0),
    ("church_l2", "DiMSUM-L/2", 128, 5e-5, 2.0, 1, 0.0),
], ids=lambda r: r[0])
def test_released_recipes(recipe: tuple) -> None:
    name, model, batch, lr, clip, classes, dropout = recipe
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert (cfg.model.name, cfg.model.num_classes, cfg.model.label_dropout) == (model, classes, dropout)
    assert (cfg.model.input_size, cfg.model.in_channels) == (32, 4)
    t = cfg.train
    assert (t.global_batch, t.lr, t.grad_clip, t.weight_decay, t.warmup_steps) == (batch, lr, clip, 0.0, 0)
    assert (cfg.objective.path, t.ema_decay, cfg.deepspeed.zero_stage) == ("GVP", 0.9999, 2)
    ds = deepspeed_config(cfg, world_size=8)
    assert ds["train_batch_size"] == batch and ds["zero_optimization"]["stage"] == 2
    assert ds["optimizer"]["params"]["weight_decay"] == 0.0 and "scheduler" not in ds  # constant LR


def test_xl2_recipe_uses_accumulation_on_eight_gpus() -> None:
    ds = deepspeed_config(load_config(CONFIGS / "imagenet_xl2.yaml"), world_size=8)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (44, 2)


def test_demo_runs_on_two_cpu_ranks_with_the_digits_model() -> None:
    cfg = load_config(CONFIGS / "demo_cpu.yaml")
    assert cfg.train.device == "cpu" and cfg.deepspeed.zero_stage == 2
    assert (cfg.model.in_channels, cfg.model.input_size, cfg.model.num_classes) == (1, 16, 10)
    assert deepspeed_config(cfg, world_size=2)["train_micro_batch_size_per_gpu"] * 2 == cfg.train.global_batch

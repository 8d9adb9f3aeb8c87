"""Every experiment recipe loads through ``dimsum config show`` and states model.md §8's (DiMSUM) and
lamamba.md §13's (LaMamba-Diff) numbers."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from dimsum.models import count_parameters
from launch.cli import main
from launch.config import load_config
from launch.train.deepspeed_engine import deepspeed_config
from tests.support.paths import REPO

CONFIGS = REPO / "configs"
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


@pytest.mark.parametrize("recipe", [("imagenet_lamamba_xl", 32, 32, 1, 652_484_648),
                                    ("imagenet_lamamba_xl512", 64, 16, 2, 653_467_688)], ids=lambda r: r[0])
def test_lamamba_recipes_state_the_released_set_up(recipe: tuple) -> None:
    name, side, micro, accum, params = recipe
    cfg = load_config(CONFIGS / f"{name}.yaml")
    m, t = cfg.model, cfg.train
    assert (m.family, m.name, m.input_size, m.in_channels, m.num_classes, m.label_dropout) == \
        ("lamamba", "LaMamba-Diff-XL", side, 4, 1000, 0.1)
    assert count_parameters(m) == params
    assert (t.global_batch, t.lr, t.weight_decay, t.warmup_steps, t.grad_clip, t.ema_decay) == \
        (256, 1e-4, 0.01, 0, 0.0, 0.9999)
    assert t.milestone_every == 50_000 and t.max_steps % 5004 == 0 and cfg.deepspeed.zero_stage == 2
    ds = deepspeed_config(cfg, world_size=8)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (micro, accum)
    assert ds["optimizer"]["type"] == "AdamW" and "scheduler" not in ds and ds["gradient_clipping"] == 0.0
    assert {k: ds["optimizer"]["params"][k] for k in ("lr", "betas", "eps", "weight_decay")} == \
        {"lr": 1e-4, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01}
    assert (cfg.objective.kind, cfg.objective.timesteps) == ("ddpm", 1000)
    assert (cfg.grid.cfg_scale, cfg.grid.sampler.method, cfg.grid.sampler.steps) == (4.0, "ddpm", 250)
    assert cfg.grid.every % t.ckpt_every == 0


def test_every_sbatch_launches_an_existing_recipe_through_common_sh() -> None:
    for sbatch in sorted((REPO / "slurm").glob("*.sbatch")):
        text = sbatch.read_text()
        assert 'source "${DIMSUM_ROOT:-$SLURM_SUBMIT_DIR}/slurm/common.sh" || exit 2' in text, sbatch.name
        recipe = re.search(r'^dimsum_launch "?(?:\$\{DIMSUM_RECIPE:-)?([^"}\s]+)', text, re.M)
        assert recipe and (REPO / recipe[1]).is_file(), sbatch.name

"""Helpers shared by the trainer tests (test_trainer.py, test_slurm.py): tiny-run overrides and
bit-exact comparison of two runs' final weights and EMA."""

from __future__ import annotations

from pathlib import Path

import torch

from launch.checkpoint import CheckpointManager
from launch.export import load_run_weights


def overrides(root: Path, shards: Path, name: str, tracking: bool = False, **train: object) -> list[str]:
    """Dotted overrides for a tiny run ``root/name`` on the digits ``shards`` (8 images per step)."""
    settings = {"global_batch": 8, "max_steps": 6, "ckpt_every": 2, "log_every": 1, "ema_decay": 0.5,
                "sample_every": 0, "lr": 1e-3, **train}
    return [f"output_root={root}", f"name={name}", f"data.shards={shards}", "data.num_workers=0",
            f"tracking.enabled={str(tracking).lower()}", *(f"train.{k}={v}" for k, v in settings.items())]


def complete_steps(run_dir: Path) -> list[int]:
    return [c.step for c in CheckpointManager(run_dir, log=lambda _: None).scan()[0]]


def assert_same_weights(a: Path, b: Path) -> None:
    """The newest checkpoints of runs ``a`` and ``b`` hold bit-identical weights and EMA."""
    for which in ("raw", "ema"):
        (cfg_a, sd_a), (cfg_b, sd_b) = load_run_weights(a, which=which), load_run_weights(b, which=which)
        assert cfg_a == cfg_b and sd_a.keys() == sd_b.keys()
        different = [k for k in sd_a if not torch.equal(sd_a[k], sd_b[k])]
        assert not different, f"{which}: {len(different)} tensors differ, e.g. {different[0]}"

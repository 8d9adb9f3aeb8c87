"""Helpers shared by the trainer tests (test_trainer.py, test_slurm.py, test_faults_*.py, ...): tiny-run
overrides, the ZeRO-2 reference settings, the real ``torchrun``/``dimsum`` commands, and bit-exact
comparison of two runs' final weights and EMA."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from launch.generate.weights import load_run_weights
from launch.train.checkpoint import CheckpointManager
from tests.support import forked_cli
from tests.support.paths import REPO

CONFIG = REPO / "configs" / "demo_cpu.yaml"
# the ZeRO-2 reference runs also make EMA sample grids and score them with the digits judge (the demo
# config's quality hook) mid-run, which must not disturb the training RNG
ZERO2 = ["deepspeed.zero_stage=2", "grid.every=4", "grid.count=4", "grid.sampler.steps=2",
         "quality.count=16"]
# the ZeRO-2 kill/resume matrix: the demo's DiMSUM under flow matching, and LaMamba-debug under DDPM
RUNS = {"dimsum-flow": [], "lamamba-ddpm": ["model.name=LaMamba-debug", "model.patch_size=1",
                                             "objective.kind=ddpm", "grid.sampler.method=ddpm"]}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def base_env(**extra: str) -> dict[str, str]:
    dropped = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "DIMSUM_FAULTS", "MLFLOW_TRACKING_URI")
    env = {k: v for k, v in os.environ.items() if k not in dropped}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), **extra)
    return env


def torchrun(args: list[str], faults: str = "", timeout: float = 300, nproc: int = 2,
             config: Path = CONFIG) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "launch.cli", "train", str(config), *args]
    return subprocess.run(cmd, env=base_env(DIMSUM_FAULTS=faults), capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, check=False)


def dimsum(*args: str, faults: str = "", timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    """One ``dimsum`` process (``train`` then runs as a single rank, no launcher), forked from the
    session's warm interpreter (tests/support/forked_cli.py)."""
    return forked_cli.run("launch.cli", list(args), base_env(DIMSUM_FAULTS=faults, **env), REPO, timeout)


def ok(proc: subprocess.CompletedProcess, code: int = 0) -> str:
    assert proc.returncode == code, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout + proc.stderr


def overrides(root: Path, shards: Path, name: str, tracking: bool = False, workers: int = 0,
              **train: object) -> list[str]:
    """Dotted overrides for a tiny run ``root/name`` on the digits ``shards`` (8 images per step)."""
    settings = {"global_batch": 8, "max_steps": 6, "ckpt_every": 2, "log_every": 1, "ema_decay": 0.5,
                "lr": 1e-3, **train}
    return [f"output_root={root}", f"name={name}", f"data.shards={shards}", f"data.num_workers={workers}",
            f"tracking.enabled={str(tracking).lower()}", "grid.every=0",
            *(f"train.{k}={v}" for k, v in settings.items())]


def complete_steps(run_dir: Path) -> list[int]:
    return [c.step for c in CheckpointManager(run_dir, log=lambda _: None).scan()[0]]


def assert_same_weights(a: Path, b: Path) -> None:
    """The newest checkpoints of runs ``a`` and ``b`` hold bit-identical weights and EMA."""
    for which in ("raw", "ema"):
        (cfg_a, sd_a), (cfg_b, sd_b) = load_run_weights(a, which=which), load_run_weights(b, which=which)
        assert cfg_a == cfg_b and sd_a.keys() == sd_b.keys()
        different = [k for k in sd_a if not torch.equal(sd_a[k], sd_b[k])]
        assert not different, f"{which}: {len(different)} tensors differ, e.g. {different[0]}"

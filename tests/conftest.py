"""Shared fixtures: tiny random models built locally (nothing is fetched from a hub)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Tests use tiny tensors, where a second thread costs more than it gives, and multi-process tests start
# two ranks on two cores; one thread per process avoids oversubscription in both. Set before torch loads.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

from data_pipeline.demo import build_digits_shards
from launch.generate.judge import load_judge

INTEGRATION = Path(__file__).resolve().parent / "integration"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The in-process tests first, for quick feedback; tests/integration/ (real processes) after them."""
    items.sort(key=lambda item: item.path.is_relative_to(INTEGRATION))


@pytest.fixture(scope="session")
def tiny_vae_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised AutoencoderKL (3x64x64 -> 4x32x32) saved as a local diffusers directory."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32, sample_size=64,
    )
    path = tmp_path_factory.mktemp("vae") / "tiny-vae"
    vae.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The CPU demo's data set (scikit-learn digits as 1x16x16 pixel shards of 500, 500, 500, 297 samples).
    Shared read-only by the loader, trainer and SLURM tests."""
    folder = tmp_path_factory.mktemp("digits") / "shards"
    build_digits_shards(folder)
    return folder


@pytest.fixture(scope="session")
def judge_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache folder holding the trained digits judge (launch.generate.judge; seconds to train), shared
    read-only by the quality tests and the quality gate; tests that damage it copy it first."""
    folder = tmp_path_factory.mktemp("judge")
    assert load_judge(folder, log=print).origin == "trained"
    return folder


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 40 MiB tmpfs (mounting needs root, as in CI)."""
    mount = tmp_path / "small"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(mount)],
                          capture_output=True, text=True, check=False)
    if proc.returncode:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {proc.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)

"""Validation in launch.cluster.submit that needs no cluster: a bad config or launch setting is refused
before anything is submitted, and SLURM time limits parse to minutes."""

from __future__ import annotations

from pathlib import Path

import pytest

from dimsum.config import ConfigError
from launch.cluster.submit import slurm_minutes, submit
from launch.config import ExperimentConfig


def test_submit_rejects_bad_config_before_submitting(tmp_path: Path) -> None:
    folder = tmp_path / "never"
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("name: t\ntrain:\n  lr: -1.0\n")
    with pytest.raises(ConfigError, match=r"train\.lr"):
        submit(bad_yaml, folder=folder)
    with pytest.raises(ConfigError, match=r"train\.max_steps"):
        submit(bad_yaml, ["train.lr=1e-4", "train.max_steps=0"], folder=folder)
    with pytest.raises(ConfigError, match=r"launch\.nodes"):
        submit(ExperimentConfig(), nodes=0, folder=folder)
    with pytest.raises(ConfigError, match=r"launch\.time"):
        submit(ExperimentConfig(), time="soon", folder=folder)
    with pytest.raises(ConfigError, match="config"):
        submit(tmp_path / "missing.yaml", folder=folder)
    assert not folder.exists()


@pytest.mark.parametrize(("text", "minutes"), [
    ("90", 90), ("1:30", 2), ("72:00:00", 4320), ("3-00:00:00", 4320), ("1-12", 2160), ("0-00:10", 10)])
def test_slurm_minutes(text: str, minutes: int) -> None:
    assert slurm_minutes(text) == minutes

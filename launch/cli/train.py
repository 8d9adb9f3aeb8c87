"""``dimsum train CONFIG [key=value ...]``: train or auto-resume an experiment (one process per device)."""

from __future__ import annotations

import argparse
from pathlib import Path

from launch.config import load_config
from launch.train.trainer import run_training


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, help="experiment YAML, e.g. configs/demo_cpu.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=20")


def run(args: argparse.Namespace) -> int:
    return int(run_training(load_config(args.config, args.overrides))["exit_code"])

"""``dimsum config show CONFIG [key=value ...] [--save PATH]``: the fully resolved experiment config."""

from __future__ import annotations

import argparse
from pathlib import Path

from launch.config import dump_config, load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["show"], help="what to do with the config")
    parser.add_argument("config", help="experiment YAML, e.g. configs/imagenet_l2.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.global_batch=704")
    parser.add_argument("--save", type=Path, help="also write the resolved YAML here")


def run(args: argparse.Namespace) -> int:
    text = dump_config(load_config(args.config, args.overrides))
    print(text, end="")
    if args.save:
        args.save.parent.mkdir(parents=True, exist_ok=True)
        args.save.write_text(text)
    return 0

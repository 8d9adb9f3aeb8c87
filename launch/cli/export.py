"""``dimsum export RUN [--step N] [--raw] [--out FILE]``: a run's weights as one safetensors file + YAML."""

from __future__ import annotations

import argparse
from pathlib import Path

from launch.generate.export import export


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", type=Path, help="run directory, e.g. checkpoints/demo")
    parser.add_argument("--step", type=int, help="checkpoint step (default: the newest complete one)")
    parser.add_argument("--raw", action="store_true", help="export the trained weights instead of the EMA")
    parser.add_argument("--out", type=Path, help="output .safetensors path")


def run(args: argparse.Namespace) -> int:
    out = export(args.run, args.out, args.step, "raw" if args.raw else "ema")
    print(f"wrote {out} and {out.with_suffix('.yaml')}")
    return 0

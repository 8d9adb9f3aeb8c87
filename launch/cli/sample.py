"""``dimsum sample``: images (or latents) from an exported, released or run model, with CFG, on one
process or under torchrun (the sampling itself is :mod:`launch.generate.sample`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from data_pipeline.vae import VAEError
from dimsum.sampling import SamplerConfig
from launch.config import apply_overrides
from launch.generate.sample import SampleError, sample
from launch.generate.weights import WeightsError

INPUT_ERRORS = (SampleError, WeightsError, VAEError)  # reported in one line with exit code 1
INPUT_ERROR_EXIT = 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--weights", type=Path, help="safetensors file from 'dimsum export'")
    src.add_argument("--released", type=Path, help="released DiMSUM checkpoint (.pt/.bin/.safetensors, dir)")
    src.add_argument("--run", type=Path, help="training run directory (EMA weights of the latest step)")
    parser.add_argument("--step", type=int, help="with --run: this checkpoint step instead of the latest")
    parser.add_argument("--which", choices=["ema", "raw"], default="ema", help="EMA or raw (trained) weights")
    parser.add_argument("--model", help="with --released: registry size, e.g. DiMSUM-L/2 (default: by shape)")
    parser.add_argument("--model-set", action="append", default=[], metavar="KEY=VALUE",
                        help="with --released: override a model config field (repeatable)")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--count", type=int, help="number of samples (default: len(--labels) or 16)")
    parser.add_argument("--labels", default="random", help="'random', 'even' or a comma list of class ids")
    parser.add_argument("--cfg-scale", type=float, default=1.0, help="classifier-free guidance (1 = off)")
    parser.add_argument("settings", nargs="*", metavar="KEY=VALUE",
                        help="sampler.* (SamplerConfig: method, steps, atol, rtol, diffusion_norm, eta), "
                        "e.g. sampler.method=heun sampler.steps=30; objective.* for weights that lack it")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16, help="samples per network batch, per process")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="network autocast")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--vae", default="stabilityai/sd-vae-ft-ema",
                        help="diffusers AutoencoderKL dir or hub id; 'pixels' for pixel-space models")
    parser.add_argument("--latents-only", action="store_true", help="skip decoding; write latents.npz")
    parser.add_argument("--grid", type=int, default=64, help="images in grid.png (0: no grid)")
    parser.add_argument("--npz-min", type=int, default=1000,
                        help="write the ADM-style samples .npz when count >= this (0: always)")


def split_settings(settings: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(sampler fields, objective fields) from ``sampler.KEY=VALUE`` / ``objective.KEY=VALUE`` strings."""
    parsed = apply_overrides({}, settings)
    unknown = sorted(set(parsed) - {"sampler", "objective"})
    if unknown:
        raise SampleError(f"{unknown[0]}: expected sampler.KEY=VALUE or objective.KEY=VALUE settings")
    return parsed.get("sampler", {}), parsed.get("objective", {})


def run(args: argparse.Namespace) -> int:
    if args.batch_size <= 0:
        raise SampleError(f"--batch-size: got {args.batch_size}; expected a positive integer")
    if args.out.exists() and not args.out.is_dir():
        raise SampleError(f"--out: {args.out} is an existing file; expected a directory (or a new path)")
    sampler_settings, objective_settings = split_settings(args.settings)
    info = sample(args, SamplerConfig.from_dict(sampler_settings, "sampler"), objective_settings)
    if info is not None:
        print(json.dumps(info))
    return 0

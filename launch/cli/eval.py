"""``dimsum eval``: ``fid SAMPLES --ref REF`` (FID against cached reference statistics, launch.generate.fid)
and ``digits RUN_OR_WEIGHTS`` (the digits judge's accuracy, FD, precision and recall of fresh samples,
launch.generate.quality)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from data_pipeline.vae import VAEError
from launch.cli.sample import split_settings
from launch.generate.fid import INCEPTION_FILE, FIDError, fid
from launch.generate.quality import QualityError, eval_digits
from launch.generate.sample import SampleError
from launch.generate.weights import WeightsError

# unusable inputs (and arrays numpy refuses, bad sampler.* values): one line, exit code 1
INPUT_ERRORS = (FIDError, QualityError, WeightsError, SampleError, VAEError, ValueError)
INPUT_ERROR_EXIT = 1


def label(args: argparse.Namespace) -> str:
    return f"eval {args.metric}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    metrics = parser.add_subparsers(dest="metric", required=True, metavar="{fid,digits}")
    add_fid_arguments(metrics.add_parser("fid", help="FID of generated images against a reference set"))
    add_digits_arguments(metrics.add_parser(
        "digits", help="accuracy and FD of a digits model's samples, scored by the digits judge"))


def add_fid_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("samples", type=Path, help="generated images: ADM .npz (arr_0) or an image folder")
    parser.add_argument("--ref", type=Path, required=True,
                        help="reference: image folder / class folders / LMDB / .npz of images or of mu+sigma")
    parser.add_argument("--inception", type=Path, default=None,
                        help=f"local {INCEPTION_FILE} (default: $DIMSUM_INCEPTION or ~/.cache/dimsum/)")
    parser.add_argument("--resolution", type=int, default=None,
                        help="center-crop folder images to this size (default: the samples' size)")
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "dimsum" / "fid",
                        help="where reference statistics are cached")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")


def add_digits_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("weights", type=Path, metavar="RUN_OR_WEIGHTS",
                        help="a training run directory (its newest intact checkpoint) or an exported "
                        "safetensors file")
    parser.add_argument("--count", type=int, default=None,
                        help="number of samples to score (default: the run's quality.count)")
    parser.add_argument("--step", type=int, help="with a run: this checkpoint step instead of the newest")
    parser.add_argument("--which", choices=["ema", "raw"], default="ema",
                        help="with a run: EMA or raw weights")
    parser.add_argument("--cfg-scale", type=float, default=None,
                        help="classifier-free guidance (default: the run's quality.cfg_scale)")
    parser.add_argument("settings", nargs="*", metavar="KEY=VALUE",
                        help="right after RUN_OR_WEIGHTS: sampler.* over the run's grid.sampler (as for "
                        "'dimsum sample'), e.g. sampler.method=heun sampler.steps=30; objective.* for "
                        "weights that lack it")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed (default: the run's seed)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="where the judge is cached (default: $DIMSUM_CACHE/judge, else "
                        "~/.cache/dimsum/judge)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")


def run(args: argparse.Namespace) -> int:
    if args.metric == "fid":
        result = fid(args.samples, args.ref, inception=args.inception, resolution=args.resolution,
                     cache_dir=args.cache_dir, batch_size=args.batch_size, device=args.device)
    else:
        sampler, objective = split_settings(args.settings)
        result = eval_digits(args.weights, count=args.count, sampler_settings=sampler,
                             objective_settings=objective, cfg_scale=args.cfg_scale, step=args.step,
                             which=args.which, seed=args.seed, cache_dir=args.cache_dir, device=args.device)
    print(json.dumps(result))
    return 0

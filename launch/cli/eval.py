"""``dimsum eval fid SAMPLES --ref REF``: FID against cached reference statistics (launch.generate.fid)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from launch.generate.fid import INCEPTION_FILE, FIDError, fid

INPUT_ERRORS = (FIDError, ValueError)  # unusable inputs (and arrays numpy refuses): one line, exit code 1
INPUT_ERROR_EXIT = 1


def label(args: argparse.Namespace) -> str:
    return f"eval {args.metric}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("metric", choices=["fid"], help="what to compute")
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


def run(args: argparse.Namespace) -> int:
    result = fid(args.samples, args.ref, inception=args.inception, resolution=args.resolution,
                 cache_dir=args.cache_dir, batch_size=args.batch_size, device=args.device)
    print(json.dumps(result))
    return 0

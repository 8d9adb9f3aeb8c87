"""``dimsum submit CONFIG [key=value ...]``: a training run on SLURM through submitit (validated first)."""

from __future__ import annotations

import argparse
from pathlib import Path

from launch.cluster.submit import submit


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="experiment YAML, e.g. configs/imagenet_l2.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides; the cluster shape is launch.*, "
                        "e.g. launch.nodes=4 launch.partition=gpu")
    parser.add_argument("--folder", type=Path, help="submitit folder (default: <run_dir>/submitit/%%j)")
    parser.add_argument("--wait", action="store_true", help="block until the job ends and report its outcome")


def run(args: argparse.Namespace) -> int:
    job = submit(args.config, args.overrides, folder=args.folder)
    first = job.task(0)
    print(f"submitted job {job.job_id} ({job.num_tasks} task(s))")
    print(f"  stdout (rank 0): {first.paths.stdout}")
    print(f"  stderr (rank 0): {first.paths.stderr}")
    if not args.wait:
        return 0
    error = job.exception()
    print(f"job {job.job_id} finished: {job.state}" + (f"\n{error}" if error else ""))
    return 1 if error else 0

"""``dimsum demo``: the main job on a CPU machine, end to end, in a few minutes.

1. writes the digits data set as pixel-space shards (``dimsum prepare --demo digits``; skipped when present),
2. trains a small DiMSUM with DeepSpeed ZeRO-2 on 2 CPU ranks (one process and thread per rank) with
   checkpoints, auto-resume and the embedded MLflow store, and an EMA sample grid at the end,
3. exports the EMA weights to one safetensors file,
4. prints where everything is, the digits judge's accuracy and FD of the final grid's checkpoint
   (``quality:`` in the config), and the ``mlflow ui`` command.

Rerunning continues the same run (auto-resume); ``--fresh`` deletes it first, but only a directory that
dimsum created (it carries the ``.dimsum`` marker).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from data_pipeline.demo import build_digits_shards
from launch.config import load_config
from launch.generate.export import export
from launch.train.checkpoint import OURS, RunDirError, is_ours
from launch.train.distributed import resolve_env

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo_cpu.yaml"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("overrides", nargs="*", help="dotted overrides for configs/demo_cpu.yaml")
    parser.add_argument("--nproc", type=int, default=2, help="number of CPU ranks (default 2)")
    parser.add_argument("--fresh", action="store_true", help="delete the previous demo run first")


def launch_ranks(nproc: int, train_args: list[str]) -> int:
    """``nproc`` local ranks of ``dimsum train`` meeting on loopback (``torchrun --standalone`` would open
    two more unauthenticated stores on every interface). When one fails, the others get some seconds to
    notice their lost peer, then are killed. Returns the first non-zero exit code, else 0."""
    meet = resolve_env({})  # 127.0.0.1 and a free port
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WORLD_SIZE": str(nproc),
           "MASTER_ADDR": meet.master_addr, "MASTER_PORT": str(meet.master_port)}
    cmd = [sys.executable, "-m", "launch.cli", "train", *train_args]
    procs = [subprocess.Popen(cmd, env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)})
             for rank in range(nproc)]
    try:
        while None in (codes := [p.poll() for p in procs]) and not any(codes):
            time.sleep(0.2)
    finally:
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return next((p.returncode for p in procs if p.returncode), 0)


def quality_line(scores: dict) -> str:
    """The judge's figures of the grid's checkpoint, in words."""
    parts = [f"accuracy {100 * scores['accuracy']:.1f}%"] if "accuracy" in scores else []
    parts += [f"FD {scores['fd']:.2f}", f"precision {scores['precision']:.2f}",
              f"recall {scores['recall']:.2f}"]
    return f"{', '.join(parts)} of {int(scores['count'])} samples (digits judge)"


def run(args: argparse.Namespace) -> int:
    began = time.perf_counter()
    cfg = load_config(CONFIG, args.overrides)  # bad overrides fail here, before anything starts
    run_dir = cfg.run_dir
    if args.fresh and run_dir.exists():
        if not is_ours(run_dir):
            raise RunDirError(f"--fresh: {run_dir} was not created by dimsum (no {OURS} file); not deleting "
                              "it. Choose another name or output_root")
        shutil.rmtree(run_dir)
    shards = Path(cfg.data.shards)
    if not (shards / "manifest.json").is_file():

        build_digits_shards(shards)
        print(f"==> digits shards written to {shards}", flush=True)
    print(f"==> {args.nproc} ranks of: OMP_NUM_THREADS=1 dimsum train {CONFIG} {' '.join(args.overrides)}",
          flush=True)
    code = launch_ranks(args.nproc, [str(CONFIG), *args.overrides])
    if code:
        print(f"dimsum demo: training exited with code {code}", file=sys.stderr)
        return code
    weights = export(run_dir)
    grids = sorted((run_dir / "samples").glob("*.png"))
    print(f"\n==> done in {time.perf_counter() - began:.0f} s")
    print(f"    checkpoints:  {run_dir}/step-*/ (latest: {(run_dir / 'latest').read_text().strip()})")
    print(f"    EMA weights:  {weights}")
    if grids:
        print(f"    sample grid:  {grids[-1]}  (one column per digit class, EMA weights)")
        scores = grids[-1].with_suffix(".quality.json")  # written by launch.train.hooks.QualityHook
        if scores.is_file():
            print(f"    quality:      {quality_line(json.loads(scores.read_text()))}  "
                  f"(again: dimsum eval digits {run_dir})")
    print(f"    more samples: dimsum sample --weights {weights} --vae pixels --labels even --count 40 "
          f"--cfg-scale 4 --out {run_dir / 'samples' / 'more'}")
    print(f"    MLflow:       mlflow ui --backend-store-uri sqlite:///{run_dir.resolve() / 'mlflow.db'}")
    return 0

"""Elastic resume cost: converting a checkpoint for another world size vs writing it, in the same run.

Trains one step of a registry model on random 4x32x32 latents with 2 CPU ranks (gloo, real ``dimsum
train`` through torchrun), then resumes the run on 1 rank, which converts the 2-rank checkpoint into the
world-size-independent copy (DeepSpeed's ds_to_universal plus the consolidated EMA) and loads and verifies
it. The times are the trainer's own log lines: the 2-rank save (the baseline), the conversion, and the
1-rank load with its check of every fp32 master fragment and both AdamW moments against the copy.

    python -m benchmarks.reshard                       # DiMSUM-S/2 (35M parameters), ZeRO-2
    python -m benchmarks.reshard --model DiMSUM-B/2 --zero 3
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.loader import build

REPO = Path(__file__).resolve().parents[1]


def train(world: int, args: list[str]) -> str:
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, *(launcher if world > 1 else []), "-m", "launch.cli", "train",
               "configs/imagenet_l2.yaml", *args]
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    if proc.returncode:
        sys.exit(f"dimsum train on {world} rank(s) failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout + proc.stderr


def seconds(log: str, pattern: str) -> float:
    return float(re.search(pattern + r" in ([\d.]+) s", log)[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="DiMSUM-S/2")
    parser.add_argument("--zero", type=int, choices=[1, 2, 3], default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dimsum-reshard-bench-") as tmp:
        root = Path(tmp)
        build(root, 512, 256, block_size=64, per_file=False)
        common = [f"output_root={root}", "name=run", f"data.shards={root / 'shards'}", "data.streams=4",
                  "data.num_workers=0", f"model.name={args.model}", "train.device=cpu",
                  "train.precision=fp32", "train.global_batch=4", "train.ckpt_every=1",
                  "tracking.enabled=false", "grid.every=0", f"deepspeed.zero_stage={args.zero}"]
        if args.zero == 3:
            common.append("deepspeed.extra.zero_optimization.stage3_param_persistence_threshold=0")
        saved = train(2, [*common, "train.max_steps=1"])
        step = root / "run" / "step-0000001"
        size = sum(p.stat().st_size for p in step.iterdir() if p.is_file())
        resized = train(1, [*common, "train.max_steps=2"])
    save = seconds(saved, r"saved \S+")
    convert = seconds(resized, r"into the world-size-independent copy \S+")
    load = seconds(resized, r"loaded and verified \S+ on this world size")
    params = re.search(r"==> model \S+: ([\d,]+) parameters", saved)[1]
    print(f"{args.model} ({params} parameters), ZeRO-{args.zero}, checkpoint {size / 2**20:,.0f} MiB "
          "written by 2 ranks")
    print(f"save on 2 ranks (baseline)        {save:6.1f} s")
    print(f"convert for another world size    {convert:6.1f} s   {convert / save:.1f}x the save, "
          f"{size / 2**20 / convert:,.0f} MiB/s")
    print(f"load and verify on 1 rank         {load:6.1f} s")


if __name__ == "__main__":
    main()

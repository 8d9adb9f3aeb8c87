"""The CI quality gate's margins: its run at several seeds, and throw-away runs that it must fail.

    python -m benchmarks.quality_gate               # 4 seeds + 3 throw-away runs, about 7 minutes on 2 cores
    python -m benchmarks.quality_gate --seeds 0     # the gate's own run + the throw-away runs

Every run is the gate's (configs/quality_gate.yaml: DiMSUM-debug, 2 CPU ranks, ZeRO-2, 200 steps) through
``torchrun -m launch.cli train``; the quality hook scores its last checkpoint. The throw-away runs break one
thing each: a tenth of the steps; the digits' labels permuted before they are written to the shards; and
``model.cond_mamba=released`` (the conditional Mamba's h0 ignored, the class reaching the blocks through
adaLN only), which is not broken conditioning and should pass. The table gives each run's accuracy and FD
against the thresholds of tests/integration/test_quality_gate.py, and the verdict.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from unittest import mock

import numpy as np

from data_pipeline import demo
from launch.generate.judge import load_judge
from tests.integration.test_quality_gate import GATE_CONFIG, MAX_FD, MIN_ACCURACY, STEPS, gate_arguments
from tests.support.paths import REPO

TENTH = STEPS // 10
# name -> (whether its shards carry shuffled labels, its overrides)
BROKEN = {
    f"a tenth of the steps ({TENTH})": (False, [f"train.max_steps={TENTH}", f"train.ckpt_every={TENTH}",
                                                f"grid.every={TENTH}"]),
    "labels shuffled in the shards": (True, []),
    "`model.cond_mamba=released` (h0 ignored)": (False, ["model.cond_mamba=released"]),
}


def shuffled_label_shards(folder: Path) -> Path:
    """The digits shards with every image under another image's label (a fixed permutation)."""
    real = demo.digits_pixels

    def relabelled() -> tuple[np.ndarray, np.ndarray]:
        images, labels = real()
        return images, np.random.default_rng(0).permutation(labels)

    with mock.patch.object(demo, "digits_pixels", relabelled):
        demo.build_digits_shards(folder)
    return folder


def gate_run(root: Path, shards: Path, cache: Path, extra: list[str]) -> dict[str, float]:
    """Train one gate run under ``root`` and return the quality hook's figures of its last checkpoint."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "launch.cli", "train", str(GATE_CONFIG), *gate_arguments(root, shards, cache, *extra)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO, check=False)
    if proc.returncode:
        raise SystemExit(f"{' '.join(extra) or 'gate run'} failed (exit {proc.returncode}):\n"
                         f"{proc.stderr[-3000:]}")
    return json.loads(sorted((root / "quality_gate" / "samples").glob("*.quality.json"))[-1].read_text())


def verdict(scores: dict[str, float]) -> str:
    failed = [name for name, bad in (("accuracy", scores["accuracy"] < MIN_ACCURACY),
                                      ("FD", scores["fd"] > MAX_FD)) if bad]
    return f"fail ({' and '.join(failed)})" if failed else "pass"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3], help="seeds of the gate's run")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="the digits judge's cache (default: ~/.cache/dimsum/judge)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="quality-gate-") as tmp:
        root = Path(tmp)
        cache = args.cache_dir or root / "judge"
        load_judge(cache)
        shards = root / "shards"
        demo.build_digits_shards(shards)
        runs = [(f"the gate's run, seed {s}", shards, [f"seed={s}"]) for s in args.seeds]
        shuffled = shuffled_label_shards(root / "shuffled")
        runs += [(name, shuffled if relabelled else shards, extra)
                 for name, (relabelled, extra) in BROKEN.items()]
        print(f"thresholds: accuracy >= {MIN_ACCURACY}, FD <= {MAX_FD}")
        print("| run | accuracy | FD | gate |\n|---|---:|---:|---|")
        for index, (name, data, extra) in enumerate(runs):
            scores = gate_run(root / f"run{index}", data, cache, extra)
            row = f"| {name} | {scores['accuracy']:.2f} | {scores['fd']:.1f} | {verdict(scores)} |"
            print(row, flush=True)


if __name__ == "__main__":
    main()

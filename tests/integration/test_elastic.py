"""Elastic resume with real processes: a run written by 2 ranks continues on 1 and back on 2 (ZeRO-2), one
written by 1 rank continues on 2 and back on 1 (ZeRO-3), through DeepSpeed's universal checkpoint.

Each lineage is checked against an uninterrupted run at the new size from the same checkpoint: a copy of
the run directory resumed without faults. The two then run the same ranks, micro-batches and reduction
order, so they must agree bit for bit (no float tolerance). A run cannot be compared numerically with one
that never changed size: noise, times and label dropout come from per-rank generators
(docs/architecture.md, "Determinism"), so another rank layout draws other noise; what carries over exactly
is checked instead: every rank verifies its fp32 masters, AdamW moments and step counts against the
world-size-independent copy after loading (launch/train/reshard.py), and here the copy's fp32 weights and
EMA are compared with the original checkpoint's, assembled by DeepSpeed's zero_to_fp32 and our EMA reader.
The data order across world sizes is tested in tests/unit/data_pipeline/test_global_order.py.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from launch.generate.weights import raw_weights
from launch.train.checkpoint import MARKER, damage
from launch.train.reshard import EMA_FILE, UNIVERSAL
from launch.train.state import consolidate_ema, load_own
from tests.support.trainer_helpers import assert_same_weights, complete_steps, dimsum, ok, overrides, torchrun

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]
ZERO2 = ["deepspeed.zero_stage=2"]
ZERO3 = ["deepspeed.zero_stage=3", "deepspeed.extra.zero_optimization.stage3_param_persistence_threshold=0"]


def train(world: int, run: Path, shards: Path, stage: list[str], *, max_steps: int,
          faults: str = "") -> subprocess.CompletedProcess:
    """Train ``run`` to ``max_steps`` on ``world`` ranks (MLflow's resize tags: test_slurm.py)."""
    args = [*overrides(run.parent, shards, run.name, max_steps=max_steps), *stage]
    if world == 1:
        return dimsum("train", "configs/demo_cpu.yaml", *args, faults=faults)
    return torchrun(args, faults=faults, nproc=world)


def logged_losses(log: str) -> list[str]:
    """The progress lines' ``step N/M | loss X`` parts (4 decimals) of a run's log."""
    return re.findall(r"step \d+/\d+ \| loss [\d.]+", log)


def fingerprint(step_dir: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in step_dir.iterdir()}


def assert_copy_is_lossless(copy: Path, original: Path) -> None:
    """The world-size-independent copy holds the original's fp32 weights and EMA bit for bit."""
    weights, ema = raw_weights(original), consolidate_ema(original)
    for name, tensor in weights.items():
        saved = torch.load(copy / "zero" / name / "fp32.pt", map_location="cpu", weights_only=True)
        saved = saved["param"] if isinstance(saved, dict) else saved
        assert torch.equal(saved.flatten(), tensor.flatten()), name
    copied = load_own(copy / EMA_FILE)["shadow"]
    assert copied.keys() == ema.keys() and all(torch.equal(copied[n], ema[n]) for n in ema)


def test_zero2_two_ranks_to_one_killed_during_conversion_and_back_to_two(tmp_path: Path,
                                                                         digits_shards: Path) -> None:
    run, reference = tmp_path / "z2", tmp_path / "z2-ref"
    ok(train(2, run, digits_shards, ZERO2, max_steps=2))
    shutil.copytree(run, reference)
    original = run / "step-0000002"
    before = fingerprint(original)

    killed = train(1, run, digits_shards, ZERO2, max_steps=4, faults="kill_in_reshard@2")
    assert killed.returncode == -9, killed.stderr[-3000:]
    copy = run / UNIVERSAL / "step-0000002"
    assert (copy / "zero").is_dir() and not (copy / MARKER).exists()  # killed half-way: no marker
    assert fingerprint(original) == before and damage(original) is None  # the original is untouched

    log = ok(train(1, run, digits_shards, ZERO2, max_steps=4))
    assert f"removing the incomplete world-size-independent copy {copy}" in log
    assert "converted step-0000002 (written by 2 ranks)" in log and "resumed from step-0000002" in log
    assert ("resized: step-0000002: 2 -> 1 ranks, global batch 8 = 4 x 2 x 1 -> 4 x 1 x 2; data from "
            "global batch 2") in log
    assert "removed the world-size-independent copies" in log and not (run / UNIVERSAL).exists()
    uninterrupted = ok(train(1, reference, digits_shards, ZERO2, max_steps=4))  # the same, never killed
    assert_same_weights(reference, run)
    assert logged_losses(log) == logged_losses(uninterrupted) and len(logged_losses(log)) == 2

    log = ok(train(2, run, digits_shards, ZERO2, max_steps=6))  # and back to 2 ranks
    assert "resized: step-0000004: 1 -> 2 ranks, global batch 8 = 4 x 1 x 2 -> 4 x 2 x 1" in log
    assert "finished at step 6" in log and complete_steps(run) == [4, 6]


def test_zero3_one_rank_to_two_killed_after_the_resize_and_back_to_one(tmp_path: Path,
                                                                       digits_shards: Path) -> None:
    run, reference = tmp_path / "z3", tmp_path / "z3-ref"
    ok(train(1, run, digits_shards, ZERO3, max_steps=2))
    shutil.copytree(run, reference)

    # rank 1 dies at the first step after the resize, before any 2-rank checkpoint: the restart resizes
    # again, from the copy it made
    killed = train(2, run, digits_shards, ZERO3, max_steps=4, faults="kill@3:1")
    assert killed.returncode != 0 and "resized: step-0000002: 1 -> 2 ranks" in killed.stdout
    copy = run / UNIVERSAL / "step-0000002"
    assert damage(copy) is None
    assert_copy_is_lossless(copy, run / "step-0000002")
    log = ok(train(2, run, digits_shards, ZERO3, max_steps=4))
    assert f"reusing the world-size-independent copy {copy}" in log and "converted" not in log
    assert "global batch 8 = 8 x 1 x 1 -> 4 x 2 x 1; data from global batch 2" in log
    uninterrupted = ok(train(2, reference, digits_shards, ZERO3, max_steps=4))
    assert_same_weights(reference, run)
    assert logged_losses(log) == logged_losses(uninterrupted) and len(logged_losses(log)) == 2

    log = ok(train(1, run, digits_shards, ZERO3, max_steps=6))  # and back to 1 rank
    assert "resized: step-0000004: 2 -> 1 ranks, global batch 8 = 4 x 2 x 1 -> 4 x 1 x 2" in log
    assert "finished at step 6" in log and complete_steps(run) == [4, 6]

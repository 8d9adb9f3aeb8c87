"""The CI quality gate: DiMSUM-debug, trained on the digits by the real trainer (2 CPU ranks, DeepSpeed
ZeRO-2, MLflow) for a CI-sized budget (configs/quality_gate.yaml), must draw samples that the digits judge
finds good enough.

The thresholds sit between the gate's run at other seeds and throw-away runs that must fail: a tenth of the
steps, and shards whose labels are shuffled (``python -m benchmarks.quality_gate`` measures them all; the
figures are in the README). A conditional Mamba that ignores its initial state (``model.cond_mamba=released``)
passes, as it should: the class still reaches every block through adaLN. The quality hook runs inside
training at the grid, so this one run also checks what MLflow shows.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.support.paths import REPO
from tests.support.trainer_helpers import ok, torchrun

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

GATE_CONFIG = REPO / "configs" / "quality_gate.yaml"
STEPS = 200  # the config's train.max_steps
MIN_ACCURACY = 0.3
MAX_FD = 145.0


def gate_arguments(root: Path, shards: Path, judge_cache: Path, *extra: str) -> list[str]:
    """Overrides of the gate's run ``root/quality_gate`` (``extra``: more, for the runs that must fail)."""
    return [f"output_root={root}", f"data.shards={shards}", "data.num_workers=0", "tracking.enabled=true",
            f"quality.cache_dir={judge_cache}", *extra]


def test_dimsum_debug_learns_class_conditional_digits_within_the_ci_budget(
        tmp_path: Path, digits_shards: Path, judge_cache: Path) -> None:
    log = ok(torchrun(gate_arguments(tmp_path, digits_shards, judge_cache), timeout=600, config=GATE_CONFIG))
    run = tmp_path / "quality_gate"
    scores = json.loads((run / "samples" / f"step-{STEPS:07d}.quality.json").read_text())
    print(f"quality gate: {scores}")
    assert f"quality at step {STEPS}: accuracy {scores['accuracy']:.3f}" in log
    assert scores["count"] == 100 and scores["nfe"] == 10
    assert scores["accuracy"] >= MIN_ACCURACY, f"class accuracy {scores['accuracy']:.2f} < {MIN_ACCURACY}"
    assert scores["fd"] <= MAX_FD, f"FD {scores['fd']:.1f} > {MAX_FD}"

    client = MlflowClient(f"sqlite:///{run / 'mlflow.db'}")
    run_id = (run / "mlflow_run_id").read_text().strip()
    for name in ("accuracy", "fd", "precision", "recall"):
        (metric,) = client.get_metric_history(run_id, f"quality/{name}")
        assert (metric.step, metric.value) == (STEPS, scores[name])

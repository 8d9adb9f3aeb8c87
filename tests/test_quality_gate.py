"""The CI quality gate: DiMSUM-debug, trained on the digits by the real trainer (2 CPU ranks, DeepSpeed
ZeRO-2, MLflow) for a CI-sized budget, must draw samples that the digits judge finds good enough.

The thresholds are set so that the gate fails a model trained for a tenth of the steps and one trained on
shards whose labels are shuffled (throw-away runs; their figures are in the issue note and the README). A
conditional Mamba that ignores its initial state (``model.cond_mamba=released``) passes, as it should: the
class still reaches every block through adaLN, and such a model is as good at this budget. The quality
hook runs inside training at the grid, so this one run also checks what MLflow shows.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.support.trainer_helpers import ok, overrides, torchrun

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

STEPS = 200
# the demo's model and data; a higher LR and a shorter EMA than the demo's, so the class conditioning (which
# appears suddenly, after ~600 steps at the demo's lr 2e-3) is learnt within the budget; guidance 4 (the
# showcase grid's) for the measurement, which makes a young model's weak class signal visible
GATE = {"global_batch": 32, "lr": 1e-2, "ema_decay": 0.95, "max_steps": STEPS, "ckpt_every": STEPS,
        "log_every": 50}
GRID = [f"grid.every={STEPS}", "grid.count=20", "grid.sampler.method=euler", "grid.sampler.steps=10",
        "quality.count=100", "quality.cfg_scale=4.0"]
MIN_ACCURACY = 0.4
MAX_FD = 110.0


def gate_arguments(root: Path, shards: Path, judge_cache: Path, *extra: str) -> list[str]:
    """The gate's training run (``extra``: more overrides, for the throw-away runs that must fail)."""
    return [*overrides(root, shards, "gate", tracking=True, **GATE), *GRID, "quality.enabled=true",
            f"quality.cache_dir={judge_cache}", *extra]


def test_dimsum_debug_learns_class_conditional_digits_within_the_ci_budget(
        tmp_path: Path, digits_shards: Path, judge_cache: Path) -> None:
    log = ok(torchrun(gate_arguments(tmp_path, digits_shards, judge_cache), timeout=600))
    run = tmp_path / "gate"
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

"""``dimsum eval digits`` on a training run reproduces the figures its quality hook logged, and its
standard output is the JSON alone (DeepSpeed, which reads the run's ZeRO shards, logs to stderr)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.trainer_helpers import REPO, base_env

pytestmark = pytest.mark.multiprocess


def test_eval_digits_of_a_run_reproduces_the_hooks_figures(zero2_reference_of: Callable[[str], Path]) -> None:
    run = zero2_reference_of("dimsum-flow")
    logged = json.loads((run / "samples" / "step-0000008.quality.json").read_text())
    # a process of its own, not the forked CLI: the warm interpreter imported DeepSpeed with its own stdout
    proc = subprocess.run([sys.executable, "-m", "launch.cli", "eval", "digits", str(run)], env=base_env(),
                          capture_output=True, text=True, timeout=300, cwd=REPO, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["count"] == logged["count"] == 16 and result["nfe"] == logged["nfe"]
    for name in ("accuracy", "fd", "precision", "recall"):
        assert result[name] == logged[name], (name, result[name], logged[name])

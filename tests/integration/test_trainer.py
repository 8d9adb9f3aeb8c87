"""The trainer end to end with real processes, real DeepSpeed (gloo, 2 CPU ranks) and real MLflow.

Runs are tiny (DiMSUM-debug on 16x16 digits, 4 images per rank, a handful of steps) and shared between
assertions: one uninterrupted reference run per ZeRO stage is compared bit for bit with a run that is
killed and resumed. Failures are injected with ``DIMSUM_FAULTS`` (see launch/train/faults.py).
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from launch.generate.weights import load_run_weights
from launch.train.state import client_state
from tests.support.paths import FIXTURES
from tests.support.trainer_helpers import (
    CONFIG,
    REPO,
    RUNS,
    ZERO2,
    assert_same_weights,
    base_env,
    complete_steps,
    dimsum,
    free_port,
    ok,
    overrides,
    torchrun,
)

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]
# every parameter partitioned (the debug model's tensors are all below the default persistence threshold)
ZERO3 = ["deepspeed.zero_stage=3", "deepspeed.extra.zero_optimization.stage3_param_persistence_threshold=0"]



@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def zero2_reference(zero2_reference_of: Callable[[str], Path]) -> Path:
    return zero2_reference_of("dimsum-flow")


@pytest.fixture(scope="module")
def zero3_reference(root: Path, digits_shards: Path) -> Path:
    ok(torchrun([*overrides(root, digits_shards, "z3-ref", ckpt_every=1), *ZERO3]))
    return root / "z3-ref"


@pytest.mark.parametrize("kind", list(RUNS))
def test_zero2_kill_and_resume_is_bit_exact_and_continues_the_mlflow_run(
        root: Path, digits_shards: Path, zero2_reference_of: Callable[[str], Path], kind: str) -> None:
    zero2_reference = zero2_reference_of(kind)
    name = "z2-kill" if kind == "dimsum-flow" else f"z2-kill-{kind}"
    args = [*overrides(root, digits_shards, name, tracking=True, max_steps=8), *ZERO2, *RUNS[kind]]
    # the save at step 4 fails on rank 1 (disk full): removed, training goes on; rank 1 is killed at step 7
    killed = torchrun(args, faults="enospc_in_save@4:1,kill@7:1")
    assert killed.returncode != 0
    run = root / name
    assert complete_steps(run) == [2, 6] and not (run / "step-0000004").exists()
    assert "No space left on device" in killed.stderr and "was NOT saved" in killed.stderr
    log = ok(torchrun(args))
    assert "resumed from step-0000006" in log
    assert_same_weights(zero2_reference, run)

    client = MlflowClient(f"sqlite:///{run / 'mlflow.db'}")
    run_id = client_state(run / "step-0000008")["mlflow_run_id"]
    assert run_id == (run / "mlflow_run_id").read_text().strip()
    assert len(client.search_runs([client.get_experiment_by_name("dimsum").experiment_id])) == 1
    assert client.get_run(run_id).info.status == "FINISHED"  # the killed attempt left it RUNNING
    steps = {m.step for m in client.get_metric_history(run_id, "loss")}
    assert {7, 8} <= steps and min(steps) <= 6  # both attempts logged into the one run
    tags = client.get_run(run_id).data.tags
    assert tags["attempt"] == "2" and "attempt.1" in tags and tags["world_size"] == "2"
    assert client.get_run(run_id).data.params["train.global_batch"] == "8"
    assert "images_per_s" in client.get_run(run_id).data.metrics
    assert [a.path for a in client.list_artifacts(run_id, "samples")] == ["samples/step-0000008.png"]
    assert [m.step for m in client.get_metric_history(run_id, "quality/fd")] == [8]  # 4 was not saved


def test_a_checkpoint_written_before_the_refactor_resumes_bit_exact(tmp_path: Path,
                                                                    digits_shards: Path) -> None:
    """tests/fixtures/pre13b is a step-2 run directory written by main before issue 13 (its README has the
    command): today's trainer resumes it to step 4 exactly as an uninterrupted run of today's code."""
    shutil.copytree(FIXTURES / "pre13b", tmp_path / "pre13b")
    same = [f"output_root={tmp_path}", f"data.shards={digits_shards}", "data.num_workers=0",
            "tracking.enabled=false", "train.global_batch=8", "train.max_steps=4", "train.ckpt_every=2",
            "train.log_every=1", "grid.every=0", "train.ema_decay=0.5", "train.lr=1e-3",
            "deepspeed.zero_stage=2", "model.hidden_size=32", "model.depth=2", "model.attn_heads=2",
            "model.fusion_heads=2"]
    log = ok(dimsum("train", str(CONFIG), *same, "name=pre13b"))
    assert "resumed from step-0000002" in log and complete_steps(tmp_path / "pre13b") == [2, 4]
    ok(dimsum("train", str(CONFIG), *same, "name=fresh"))
    assert_same_weights(tmp_path / "fresh", tmp_path / "pre13b")


def test_zero3_kill_during_save_resumes_from_previous_checkpoint_bit_exact(
        root: Path, digits_shards: Path, zero3_reference: Path) -> None:
    args = [*overrides(root, digits_shards, "z3-kill", ckpt_every=1), *ZERO3]
    killed = torchrun(args, faults="kill_in_save@4:1")
    assert killed.returncode != 0
    run = root / "z3-kill"
    assert complete_steps(run) == [2, 3]
    assert (run / "step-0000004").is_dir() and not (run / "step-0000004" / "COMPLETE").exists()
    assert (run / "latest").read_text().strip() == "step-0000003"
    log = ok(torchrun(args))
    assert "ignoring incomplete checkpoint" in log and "resumed from step-0000003" in log
    assert_same_weights(zero3_reference, run)


def test_zero3_ema_is_the_fp32_average_of_the_master_weights(zero3_reference: Path,
                                                            zero2_reference: Path) -> None:
    """ema_6 = lerp(ema_5, raw_6, 1 - decay), with the shards of both steps assembled independently."""
    _, ema5 = load_run_weights(zero3_reference, step=5, which="ema")
    _, ema6 = load_run_weights(zero3_reference, step=6, which="ema")
    _, raw6 = load_run_weights(zero3_reference, step=6, which="raw")
    assert all(v.dtype == torch.float32 for v in ema6.values())
    for name in ema6:
        torch.testing.assert_close(ema6[name], torch.lerp(ema5[name], raw6[name], 0.5), rtol=0, atol=1e-6)
    assert any(not torch.equal(ema6[n], raw6[n]) for n in ema6)
    # ZeRO-2 and ZeRO-3 shard differently but train the same model: the EMAs agree to rounding
    _, ema6_z2 = load_run_weights(zero2_reference, step=6, which="ema")
    for name in ema6:
        torch.testing.assert_close(ema6[name], ema6_z2[name], rtol=1e-4, atol=1e-5)


class Ranks:
    """Two trainer processes started the way srun starts tasks (SLURM_* variables, no torchrun)."""

    def __init__(self, args: list[str], faults: str = "") -> None:
        port, self.lines = free_port(), []
        self.procs = []
        for rank in range(2):
            env = base_env(SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), SLURM_NTASKS="2",
                           MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DIMSUM_FAULTS=faults)
            out = subprocess.PIPE if rank == 0 else subprocess.DEVNULL  # rank 0 prints the log
            cmd = [sys.executable, "-m", "launch.cli", "train", str(CONFIG), *args]
            self.procs.append(subprocess.Popen(cmd, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                               text=True))
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.procs[0].stdout:
            self.lines.append(line)

    def wait_for(self, text: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.lines):
            assert time.monotonic() < deadline and self.procs[0].poll() is None, "".join(self.lines[-50:])
            time.sleep(0.05)

    def wait(self, timeout: float = 120) -> list[int]:
        codes = [p.wait(timeout) for p in self.procs]
        self.reader.join(5)
        return codes


def test_zero1_preemption_signal_saves_at_step_boundary_exits_75_and_resumes(root: Path,
                                                                            digits_shards: Path) -> None:
    args = [*overrides(root, digits_shards, "z1-preempt", max_steps=1000, ckpt_every=1000),
            "deepspeed.zero_stage=1"]
    # rank 0 also gets SIGTERM in the middle of writing the preemption checkpoint (a second signal)
    ranks = Ranks(args, faults="signal_in_save@1-:0")
    ranks.wait_for("step 3/1000")
    ranks.procs[1].send_signal(signal.SIGUSR2)  # only rank 1 is signalled: the ranks must agree
    assert ranks.wait() == [75, 75], "".join(ranks.lines[-40:])
    run = root / "z1-preempt"
    (stopped,) = complete_steps(run)
    assert stopped >= 3 and "exit code 75" in "".join(ranks.lines)
    resumed = Ranks([*args, f"train.max_steps={stopped + 2}"])
    assert resumed.wait() == [0, 0], "".join(resumed.lines[-40:])
    log = "".join(resumed.lines)
    assert f"resumed from step-{stopped:07d}" in log and f"finished at step {stopped + 2}" in log
    assert complete_steps(run) == [stopped, stopped + 2]


def test_nonfinite_losses_are_skipped_on_all_ranks_then_stop_the_run(root: Path, digits_shards: Path) -> None:
    args = [*overrides(root, digits_shards, "nan", ckpt_every=1, max_nonfinite=3), "deepspeed.zero_stage=2"]
    proc = torchrun(args, faults="nan@2:1,nan@4-:1")  # NaN on rank 1 only
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    # printed by rank 0, whose own loss was finite: the ranks agreed
    assert "non-finite loss at step 2: micro-batch dropped (1 in a row, 1 in total)" in out
    assert "3 consecutive non-finite losses at step 4 (train.max_nonfinite=3)" in out
    run = root / "nan"
    assert complete_steps(run) == [2, 3]
    assert client_state(run / "step-0000003")["nonfinite_total"] == 1
    load_run_weights(run)  # the last good checkpoint is intact and loadable


def test_bad_config_fails_before_any_work_with_the_field_named(root: Path, digits_shards: Path,
                                                              zero2_reference: Path) -> None:
    def train(*args: str, world: str = "2") -> subprocess.CompletedProcess:
        return dimsum("train", str(CONFIG), *args, timeout=120, RANK="0", WORLD_SIZE=world,
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))

    proc = train(*overrides(root, digits_shards, "bad", global_batch=7))
    assert proc.returncode == 2
    assert ("train.global_batch: got 7; global_batch=7 must be a multiple of micro_batch x world_size"
            in proc.stderr)
    proc = train(*overrides(root, digits_shards, "bad"), "train.lrr=1")
    assert proc.returncode == 2 and "train.lrr" in proc.stderr and "did you mean 'lr'" in proc.stderr
    proc = train(*overrides(root, digits_shards, "bad"), "model.in_channels=4", world="1")
    assert proc.returncode == 2 and "model.in_channels: got 4" in proc.stderr and "1 channels" in proc.stderr
    assert not (root / "bad").exists()
    # resume on a world size the global batch cannot be split over: refused before any conversion
    reference = overrides(zero2_reference.parent, digits_shards, zero2_reference.name, max_steps=9)
    proc = train(*reference, world="3")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert ("train.global_batch: got 8; global_batch=8 must be a multiple of micro_batch x world_size = "
            "2 x 3; 8 samples do not split over 3 ranks: world sizes that work: 1, 2, 4, 8") in proc.stderr
    proc = train(*reference, "train.micro_batch=3", world="1")
    assert proc.returncode == 2 and "micro_batch values that work on 1 rank(s): 1, 2, 4, 8" in proc.stderr
    assert complete_steps(zero2_reference) == [6, 8] and not (zero2_reference / "universal").exists()

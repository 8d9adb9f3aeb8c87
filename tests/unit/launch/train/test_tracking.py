"""The MLflow tracker: embedded store, resume into the same run, a dead server never blocking, and a
real ``mlflow server`` killed in the middle of a real training run."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from data_pipeline.demo import build_digits_shards
from launch.train.tracking import MLflowTracker, embedded_uri, flatten, make_tracker
from tests.support.paths import REPO


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate, timeout: float = 60, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_flatten_gives_dotted_params() -> None:
    assert flatten({"train": {"lr": 1e-4, "b": [1, 2]}, "name": "x", "extra": {}}) == {
        "train.lr": "0.0001", "train.b": "[1, 2]", "name": "x", "extra": "{}"}


def test_embedded_store_logs_everything_and_a_resume_continues_the_run(tmp_path: Path) -> None:
    logs: list[str] = []
    tracker = make_tracker(enabled=True, rank=0, uri=None, experiment="exp", run_dir=tmp_path, run_id=None,
                           params={"train.lr": "0.001"}, tags={"attempt": "1"}, log=logs.append)
    for step in (1, 2):
        tracker.log_metrics({"loss": 1.0 / step, "lr": 1e-3}, step)
    grid = tmp_path / "grid.png"
    grid.write_bytes(b"png")
    tracker.log_artifact(grid, "samples")
    tracker.close(status="KILLED")  # as after a preemption
    run_id = tracker.run_id
    assert MlflowClient(embedded_uri(tmp_path)).get_run(run_id).info.status == "KILLED"
    assert run_id and (tmp_path / "mlflow_run_id").read_text().strip() == run_id and not logs

    again = make_tracker(enabled=True, rank=0, uri=None, experiment="exp", run_dir=tmp_path, run_id=run_id,
                         params={"train.lr": "0.001"}, tags={"attempt": "2"}, log=logs.append)
    again.log_metrics({"loss": 0.25}, 3)
    again.close(status="FINISHED")
    assert again.run_id == run_id

    client = MlflowClient(embedded_uri(tmp_path))
    run = client.get_run(run_id)
    assert run.data.params == {"train.lr": "0.001"} and run.data.tags["attempt"] == "2"
    assert run.info.status == "FINISHED" and run.info.end_time is not None
    history = [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")]
    assert history == [(1, 1.0), (2, 0.5), (3, 0.25)]
    assert [a.path for a in client.list_artifacts(run_id, "samples")] == ["samples/grid.png"]
    assert (tmp_path / "mlruns").is_dir()  # artifacts stay inside the run directory


def test_other_ranks_and_disabled_tracking_get_a_null_tracker(tmp_path: Path) -> None:
    for enabled, rank in ((True, 1), (False, 0)):
        tracker = make_tracker(enabled=enabled, rank=rank, uri=None, experiment="e", run_dir=tmp_path,
                               run_id=None, params={}, tags={})
        tracker.log_metrics({"loss": 1.0}, 1)
        tracker.close()
        assert tracker.run_id is None
    assert not (tmp_path / "mlflow.db").exists()


def test_unreachable_server_never_blocks_and_the_loss_is_reported(tmp_path: Path) -> None:
    logs: list[str] = []
    tracker = MLflowTracker(uri=f"http://127.0.0.1:{free_port()}", experiment="e", run_name="r",
                            flush_timeout=3.0, log=logs.append, queue_size=100)
    began = time.perf_counter()
    for step in range(500):  # more than the queue holds
        tracker.log_metrics({"loss": 1.0}, step)
    assert time.perf_counter() - began < 1.0
    wait_until(lambda: any("cannot reach" in line for line in logs), 30, "the warning")
    began = time.perf_counter()
    tracker.close()
    assert time.perf_counter() - began < 10
    assert tracker.dropped >= 400 and "not delivered" in logs[-1]


@pytest.fixture()
def mlflow_server(tmp_path: Path):
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "server-artifacts")],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def healthy() -> bool:
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).status == 200
        except OSError:
            return False

    wait_until(healthy, 120, "mlflow server /health")
    yield f"http://127.0.0.1:{port}", proc
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.mark.multiprocess
@pytest.mark.slow
def test_training_logs_to_a_real_server_and_finishes_when_it_dies(tmp_path: Path, mlflow_server) -> None:
    uri, server = mlflow_server
    build_digits_shards(tmp_path / "shards")
    release = tmp_path / "release"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MLFLOW_TRACKING_URI")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), DIMSUM_FAULTS="pause@4",
               DIMSUM_FAULTS_RELEASE=str(release))
    # one process, no launcher: the trainer sets up its own single-rank process group
    trainer = subprocess.Popen(
        [sys.executable, "-m", "launch.cli", "train", str(REPO / "configs" / "demo_cpu.yaml"),
         f"output_root={tmp_path}", "name=served", f"data.shards={tmp_path / 'shards'}",
         "data.num_workers=0",
         "train.global_batch=4", "train.max_steps=8", "train.log_every=1", "train.ckpt_every=4",
         "grid.every=0", f"tracking.uri={uri}", "tracking.experiment=served",
         "tracking.flush_timeout=3"],
        env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    client = MlflowClient(uri)

    def logged() -> bool:
        exp = client.get_experiment_by_name("served")
        runs = client.search_runs([exp.experiment_id]) if exp else []
        return bool(runs) and "loss" in runs[0].data.metrics

    wait_until(logged, 120, "metrics on the server")
    run = client.search_runs([client.get_experiment_by_name("served").experiment_id])[0]
    assert run.data.params["train.global_batch"] == "4" and run.data.tags["world_size"] == "1"
    assert trainer.poll() is None  # still paused at step 4
    os.killpg(server.pid, signal.SIGKILL)
    server.wait()
    release.touch()
    out, _ = trainer.communicate(timeout=180)
    assert trainer.returncode == 0, out[-4000:]
    assert "finished at step 8" in out and "cannot reach" in out
    assert (tmp_path / "served" / "step-0000008" / "COMPLETE").is_file()

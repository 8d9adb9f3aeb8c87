"""The SLURM path against a real local cluster (slurm/local_cluster.sh, 2 emulated nodes, accounting on).

Covers the cluster script itself, the real sbatch recipe with the real trainer (2 nodes x 1 CPU task,
gloo, DeepSpeed ZeRO-2, MLflow): an uninterrupted run, and a run preempted with USR2 that saves, exits 75,
is requeued and resumes to bit-identical weights and EMA in the same MLflow run; the same through
launch.cluster.submit and submitit; cancellation. A stand-in for the trainer checks the rank/rendezvous
plumbing in seconds. (Validation before submission needs no cluster: tests/unit/launch/cluster.)
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import cloudpickle
import pytest
import submitit
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from launch.cluster.submit import submit, submit_task
from launch.train.distributed import slurm_master_port
from launch.train.state import client_state
from tests.support import slurm_helpers
from tests.support.slurm_helpers import (
    REPO,
    LocalCluster,
    clock,
    free_port_base,
    listening_addresses,
    logs_of,
    probe_records,
    wait_for_file_lines,
)
from tests.support.trainer_helpers import assert_same_weights, complete_steps, overrides

# The job processes import this module's helpers by value: tests/ is not on their sys.path.
cloudpickle.register_pickle_by_value(slurm_helpers)

CPU_SHAPE = ("--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1")


@pytest.fixture(scope="session")
def slurm_cluster() -> LocalCluster:
    """A 2-node cluster in its own folder and ports, stopped and deleted at the end of the session."""
    if os.geteuid() != 0:
        pytest.skip("the local SLURM cluster needs root")
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        pytest.skip("SLURM is not installed and apt-get is unavailable")
    base = Path(tempfile.mkdtemp(prefix="dimsum-slurm-test-"))
    base.chmod(0o755)  # munged runs as the munge user and must reach its folder
    env = {**os.environ, "DIMSUM_SLURM_BASE": str(base), "DIMSUM_SLURM_PORT_BASE": str(free_port_base()),
           "SLURM_CONF": str(base / "etc" / "slurm.conf")}
    cluster = LocalCluster(base, env)
    started = time.monotonic()
    cluster.script("start", "--nodes", "2")
    print(f"local SLURM cluster started in {time.monotonic() - started:.1f} s")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SLURM_CONF", env["SLURM_CONF"])  # submitit's sbatch/sacct/scancel calls need it
        yield cluster
    cluster.script("stop", check=False)
    shutil.rmtree(base, ignore_errors=True)


def daemon_pids(base: Path) -> dict[str, int]:
    pidfiles = [*sorted((base / "run").glob("*.pid")), base / "munge" / "munged.pid"]
    return {p.stem: int(p.read_text()) for p in pidfiles if p.exists()}


@pytest.mark.slow
@pytest.mark.multiprocess
def test_cluster_start_is_idempotent_and_stop_leaves_nothing(slurm_cluster: LocalCluster) -> None:
    pids = daemon_pids(slurm_cluster.base)
    assert set(pids) == {"munged", "mariadbd", "slurmdbd", "slurmctld", "slurmd-node1", "slurmd-node2"}
    again = slurm_cluster.script("start", "--nodes", "2")
    assert "already running" in again.stderr
    assert daemon_pids(slurm_cluster.base) == pids
    status = slurm_cluster.script("status")
    assert "slurmd-node2   running" in status.stdout and "node1 idle" in status.stdout
    env_line = slurm_cluster.script("env").stdout.strip()
    assert env_line == f"export SLURM_CONF={slurm_cluster.env['SLURM_CONF']}"
    assert (slurm_cluster.base / "env.sh").read_text().strip() == env_line
    listening = listening_addresses(list(pids.values()))
    assert len(listening) == 5 and all(addr.startswith("127.0.0.1:") for addr in listening), listening

    slurm_cluster.script("stop")
    alive = {name: pid for name, pid in pids.items() if Path(f"/proc/{pid}").exists()}
    assert not alive, f"daemons left after stop: {alive}"
    assert slurm_cluster.script("status", check=False).returncode == 3

    slurm_cluster.script("start", "--nodes", "2")  # from the kept state, for the tests that follow
    assert slurm_cluster.script("status").returncode == 0
    assert slurm_cluster.run("sacctmgr", "-n", "list", "cluster", "format=cluster").split() == ["dimsum"]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_cluster_refuses_another_shape_while_running(slurm_cluster: LocalCluster) -> None:
    proc = slurm_cluster.script("start", "--nodes", "3", check=False)
    assert proc.returncode != 0 and "another shape" in proc.stderr
    bad = slurm_cluster.script("start", "--nodes", "zero", check=False)
    assert bad.returncode != 0 and "--nodes must be a positive integer, got 'zero'" in bad.stderr


@pytest.mark.slow
@pytest.mark.multiprocess
def test_sbatch_recipe_exports_ranks_and_rendezvous(slurm_cluster: LocalCluster, tmp_path: Path) -> None:
    """Seconds-fast plumbing check of the real recipe with a stand-in for the trainer: one task per node,
    ranks from SLURM, the first node's address, the job-derived port, and the argument order."""
    job = slurm_cluster.sbatch(
        *CPU_SHAPE, f"--output={tmp_path}/%x-%j.out", "slurm/imagenet_l2.sbatch", "train.max_steps=7",
        env={"DIMSUM_TRAIN_CMD": f"{sys.executable} tests/support/slurm_helpers.py",
             "DIMSUM_LOG_DIR": str(tmp_path), "DIMSUM_OVERRIDES": "model.name=DiMSUM-debug train.device=cpu"})
    assert slurm_cluster.wait_state(job, {"COMPLETED", "FAILED"}) == "COMPLETED", logs_of(tmp_path, job)
    records = probe_records((tmp_path / f"dimsum-l2-{job}.restart0.log").read_text())
    assert sorted(r["RANK"] for r in records) == ["0", "1"]
    assert sorted(r["node"] for r in records) == ["node1", "node2"]
    for record in records:
        assert record["WORLD_SIZE"] == "2" and record["LOCAL_RANK"] == "0" and record["restart"] == 0
        assert record["MASTER_ADDR"] == "127.0.0.1"  # node1's NodeAddr: the node names do not resolve
        assert record["MASTER_PORT"] == str(slurm_master_port(int(job)))
        assert record["rank_sum"] == 1.0  # the gloo all-reduce really ran across both tasks
        assert record["argv"] == ["configs/imagenet_l2.yaml", "model.name=DiMSUM-debug", "train.device=cpu",
                                  "train.max_steps=7"]


# The real DiMSUM-L/2 ImageNet recipe shrunk to the digits debug model (patch 4, 578k parameters) on CPU.
# It goes in through DIMSUM_OVERRIDES (the recipe's knob); the run's own settings are sbatch arguments.
TINY_RECIPE = ("model.name=DiMSUM-debug model.input_size=16 model.patch_size=4 model.in_channels=1 "
               "model.num_classes=10 data.streams=2 train.device=cpu")
STEPS = 8
# Every rank waits at the start of step 4 until the test creates the release file: the preemption
# signal is then known to have arrived before step 4's stop vote, so the job always saves at step 4.
PAUSE = "pause@4"


@dataclass
class RecipeRun:
    job: str
    run_dir: Path
    logs: Path

    def task_log(self, restart: int) -> Path:
        return self.logs / f"dimsum-l2-{self.job}.restart{restart}.log"


def sbatch_recipe(cluster: LocalCluster, root: Path, digits_shards: Path, name: str, **env: str) -> RecipeRun:
    logs = root / f"{name}-logs"
    logs.mkdir()
    job = cluster.sbatch(*CPU_SHAPE, f"--output={logs}/%x-%j.out", "slurm/imagenet_l2.sbatch",
                         *overrides(root, digits_shards, name, tracking=True, max_steps=STEPS),
                         env={"DIMSUM_LOG_DIR": str(logs), "DIMSUM_OVERRIDES": TINY_RECIPE,
                              "OMP_NUM_THREADS": "1", **env})
    return RecipeRun(job, root / name, logs)


def finished(cluster: LocalCluster, run: RecipeRun) -> None:
    state = cluster.wait_state(run.job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout=400)
    assert state == "COMPLETED", logs_of(run.logs, run.job)


def mlflow_run(run_dir: Path) -> Run:
    """The only MLflow run in the run directory's embedded store."""
    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    (found,) = client.search_runs([client.get_experiment_by_name("dimsum").experiment_id])
    assert found.info.status == "FINISHED"  # also after a preempted (KILLED) attempt: the resume reopens it
    return found


def loss_steps(run_dir: Path, run_id: str) -> list[int]:
    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    return sorted(m.step for m in client.get_metric_history(run_id, "loss"))


@pytest.fixture(scope="module")
def reference(slurm_cluster: LocalCluster, digits_shards: Path,
              tmp_path_factory: pytest.TempPathFactory) -> RecipeRun:
    """An uninterrupted sbatch run of the recipe: the bit-exact reference for the interrupted ones."""
    run = sbatch_recipe(slurm_cluster, tmp_path_factory.mktemp("runs"), digits_shards,
                        "reference")
    finished(slurm_cluster, run)
    return run


@pytest.mark.slow
@pytest.mark.multiprocess
def test_sbatch_recipe_trains_to_a_complete_checkpoint_and_an_mlflow_run(reference: RecipeRun) -> None:
    run = reference.run_dir
    assert complete_steps(run) == [STEPS - 2, STEPS]
    assert (run / "latest").read_text().strip() == f"step-{STEPS:07d}"
    log = reference.task_log(0).read_text()
    assert "2 x cpu, fp32, ZeRO-2" in log and f"finished at step {STEPS}; exit code 0" in log
    assert "tasks exited with code 0" in next(reference.logs.glob("*.out")).read_text()

    found = mlflow_run(run)
    assert found.info.run_id == client_state(run / f"step-{STEPS:07d}")["mlflow_run_id"]
    tags, params = found.data.tags, found.data.params
    assert tags["slurm_job_id"] == reference.job and tags["restart_count"] == "0"
    assert tags["world_size"] == "2" and tags["hosts"] == "node[1-2]"
    # the recipe's composed settings (base.yaml), then DIMSUM_OVERRIDES, then the sbatch arguments
    assert params["train.milestone_every"] == "50000" and params["train.global_batch"] == "8"
    assert params["model.name"] == "DiMSUM-debug" and params["model.patch_size"] == "4"
    assert params["train.max_steps"] == str(STEPS)
    assert loss_steps(run, found.info.run_id) == list(range(1, STEPS + 1))


def preempted_at_step_4(slurm_cluster: LocalCluster, tmp_path: Path, shards: Path, name: str) -> RecipeRun:
    """The recipe's job, preempted near its time limit while both ranks wait at step 4 (a paused fault):
    what ``--signal=B:USR2@120`` does, the batch shell alone signalled (it forwards). Returns once every
    rank got the signal and the pause is released, so the job saves at step 4 and is requeued."""
    release = tmp_path / "release"
    run = sbatch_recipe(slurm_cluster, tmp_path, shards, name, DIMSUM_FAULTS=PAUSE,
                        DIMSUM_FAULTS_RELEASE=str(release))
    try:
        # Step 3's log line is a collective: both ranks are past step 3 and will wait at step 4.
        wait_for_file_lines(run.task_log(0), r"step 3/", 1, timeout=300)
    except TimeoutError:
        pytest.fail(logs_of(run.logs, run.job))
    assert complete_steps(run.run_dir) == [2]
    slurm_cluster.run("scancel", "--batch", "--signal=USR2", run.job)
    wait_for_file_lines(run.task_log(0), r"\[preemption\] SIGUSR2 received", 2)
    release.touch()
    return run


@pytest.mark.slow
@pytest.mark.multiprocess
def test_sbatch_recipe_preempted_saves_requeues_and_resumes_bit_exact(
        slurm_cluster: LocalCluster, digits_shards: Path, reference: RecipeRun, tmp_path: Path) -> None:
    run = preempted_at_step_4(slurm_cluster, tmp_path, digits_shards, "preempted")
    finished(slurm_cluster, run)

    first, second = run.task_log(0).read_text(), run.task_log(1).read_text()
    assert "preempted at step 4; exit code 75" in first and "step 5/" not in first
    assert "resumed from step-0000004 (attempt 2)" in second and f"finished at step {STEPS}" in second
    batch = next(run.logs.glob("*.out"))
    assert f"scontrol requeue {run.job}" in batch.read_text()
    assert slurm_cluster.job_field(run.job, "Restarts") == "1"
    assert_same_weights(reference.run_dir, run.run_dir)

    found = mlflow_run(run.run_dir)  # the only run: attempt 2 continued the run id saved at step 4
    assert found.info.run_id == client_state(run.run_dir / f"step-{STEPS:07d}")["mlflow_run_id"]
    assert found.data.tags["attempt"] == "2" and found.data.tags["restart_count"] == "1"
    assert found.data.tags["attempt.1"].startswith(f"start_step=0 job={run.job} restart=0")
    assert found.data.tags["attempt.2"].startswith(f"start_step=4 job={run.job} restart=1")
    assert loss_steps(run.run_dir, found.info.run_id) == list(range(1, STEPS + 1))

    signalled = clock(batch, "signal received")
    requeued, restarted = clock(batch, "scontrol requeue"), clock(batch, "restart 1 on")
    resumed = clock(run.task_log(1), r"step 5/")
    print(f"\nrequeue-to-resume: signal -> first resumed step {resumed - signalled} s (save and exit "
          f"{requeued - signalled} s, SLURM requeue {restarted - requeued} s, trainer start "
          f"{resumed - restarted} s)")


@pytest.mark.slow
@pytest.mark.multiprocess
def test_sbatch_job_preempted_on_2_nodes_comes_back_on_1_and_resumes_through_the_resize(
        slurm_cluster: LocalCluster, digits_shards: Path, tmp_path: Path) -> None:
    run = preempted_at_step_4(slurm_cluster, tmp_path, digits_shards, "resized")
    # Saved at step 4, exit 75, requeued by the batch script. While it waits to run again the job is given
    # one node, as a scheduler or an admin does to a requeued job when a node is drained.
    slurm_cluster.wait_state(run.job, {"PENDING"}, timeout=300)
    slurm_cluster.run("scontrol", "hold", run.job)
    slurm_cluster.run("scontrol", "update", f"JobId={run.job}", "NumNodes=1", "NumTasks=1")
    slurm_cluster.run("scontrol", "release", run.job)
    finished(slurm_cluster, run)

    first, second = run.task_log(0).read_text(), run.task_log(1).read_text()
    assert "preempted at step 4; exit code 75" in first and "2 x cpu" in first
    assert "1 x cpu" in second and "resumed from step-0000004 (attempt 2)" in second
    assert "resized: step-0000004: 2 -> 1 ranks, global batch 8 = 4 x 2 x 1 -> 4 x 1 x 2" in second
    assert f"finished at step {STEPS}" in second
    assert "restart 1 on node1: 1 task(s)" in next(run.logs.glob("*.out")).read_text()
    found = mlflow_run(run.run_dir)  # the same run, continued on one node
    tags = found.data.tags
    assert tags["world_size"] == "1" and tags["attempt"] == "2"
    assert tags["resized"] == tags["resize.2"] and tags["resized"].startswith("step-0000004: 2 -> 1 ranks")
    assert loss_steps(run.run_dir, found.info.run_id) == list(range(1, STEPS + 1))


@pytest.mark.slow
@pytest.mark.multiprocess
def test_submit_trains_is_interrupted_requeues_and_resumes_bit_exact(
        slurm_cluster: LocalCluster, digits_shards: Path, reference: RecipeRun, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """launch.cluster.submit of the same tiny recipe through submitit; job._interrupt() as on preemption."""
    release = tmp_path / "release"
    monkeypatch.setenv("DIMSUM_FAULTS", PAUSE)  # sbatch exports the submitting environment to the job
    monkeypatch.setenv("DIMSUM_FAULTS_RELEASE", str(release))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    tiny = overrides(tmp_path, digits_shards, "submitted", tracking=True, max_steps=STEPS)
    args = [*TINY_RECIPE.split(), *tiny]
    job = submit(REPO / "configs" / "imagenet_l2.yaml", args, cluster="slurm", nodes=2, gpus_per_node=0,
                 cpus_per_task=1, time="60", folder=tmp_path / "%j")
    folder = tmp_path / job.job_id
    out, err = (folder / f"{job.job_id}_0_log.out"), [folder / f"{job.job_id}_{t}_log.err" for t in range(2)]
    try:
        wait_for_file_lines(out, r"step 3/", 1, timeout=300)
    except TimeoutError:
        pytest.fail(logs_of(folder, job.job_id))
    job._interrupt()  # SIGTERM then USR2 to every task
    for path in err:
        wait_for_file_lines(path, r"\[preemption\] SIG(TERM|USR2) received", 1)
    release.touch()
    summary, other = job.results()  # the trainer's summary, from each rank

    assert summary["status"] == "finished" and summary["step"] == STEPS and summary["exit_code"] == 0
    assert other["step"] == STEPS and other["mlflow_run_id"] is None  # only rank 0 talks to MLflow
    assert summary["run_dir"] == str(tmp_path / "submitted")
    log = out.read_text()
    assert "preempted at step 4; exit code 75" in log and f"Requeued job {job.job_id}" in log
    assert "resumed from step-0000004 (attempt 2)" in log
    run = tmp_path / "submitted"
    found = mlflow_run(run)  # the only run, continued by the second attempt
    assert summary["mlflow_run_id"] == found.info.run_id
    assert found.data.tags["attempt"] == "2" and found.data.tags["restart_count"] == "1"
    assert loss_steps(run, found.info.run_id) == list(range(1, STEPS + 1))
    # submitit's launch and the sbatch recipe train the same model to the same bits
    assert_same_weights(reference.run_dir, run)
    submission = (folder / f"{job.job_id}_submission.sh").read_text()
    assert "#SBATCH --signal=USR2@120" in submission and "gpus" not in submission


@pytest.mark.slow
@pytest.mark.multiprocess
def test_submitit_cancelled_job_raises(slurm_cluster: LocalCluster, tmp_path: Path) -> None:
    job = submit_task(slurm_helpers.sleep_long, folder=tmp_path / "%j", cluster="slurm", nodes=1,
                      gpus_per_node=0, cpus_per_task=1, time="60", name="cancel")
    slurm_cluster.wait_state(job.job_id, {"RUNNING"})
    job.cancel()
    with pytest.raises(submitit.core.utils.UncompletedJobError, match="CANCELLED"):
        job.result()


@pytest.fixture
def signals_restored() -> None:
    """The debug executor runs the task in this process, and the task ignores SIGTERM (submit.py says
    why): left so, every process the later tests start would inherit that and outlive ``terminate()``."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR2)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


@pytest.mark.multiprocess
def test_submit_task_on_submitit_local_executor(tmp_path: Path, signals_restored: None) -> None:
    """The same task wrapper without SLURM: submitit's local executor (2 processes) and debug (in-process)."""
    job = submit_task(slurm_helpers.rendezvous, folder=tmp_path / "%j", cluster="local", gpus_per_node=0,
                      tasks_per_node=2, time="10")
    results = job.results()
    assert [r["RANK"] for r in results] == ["0", "1"] and {r["rank_sum"] for r in results} == {1.0}
    assert {r["MASTER_PORT"] for r in results} == {str(slurm_master_port(int(job.job_id)))}
    debug = submit_task(slurm_helpers.rendezvous, folder=tmp_path / "debug", cluster="debug", gpus_per_node=0)
    record = debug.result()
    assert record["RANK"] == "0" and record["WORLD_SIZE"] == "1" and record["rank_sum"] == 0.0
    with pytest.raises(ValueError, match="SLURM parameters"):
        submit_task(slurm_helpers.rendezvous, folder=tmp_path / "x", cluster="local", account="proj")

"""The SLURM path against a real local cluster (slurm/local_cluster.sh, 2 emulated nodes, accounting on).

Covers the cluster script itself, the sbatch recipes' shared launch logic (ranks, rendezvous, USR2 ->
exit 75 -> requeue -> restart) with a trainer stand-in, and launch.submit through submitit (results,
requeue on interrupt, cancellation, validation before submission).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import cloudpickle
import pytest
import slurm_helpers
import submitit
from slurm_helpers import (
    LocalCluster,
    free_port_base,
    listening_addresses,
    probe_records,
    wait_for_file_lines,
)

from dimsum.config import ConfigError
from launch.config import ExperimentConfig
from launch.distributed import slurm_master_port
from launch.submit import slurm_minutes, submit, submit_task

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
def test_sbatch_recipe_ranks_rendezvous_and_requeue(slurm_cluster: LocalCluster, tmp_path: Path) -> None:
    """The real recipe, GPU-less: 2 nodes x 1 task run the stand-in; USR2 -> exit 75 -> requeue -> restart."""
    job = slurm_cluster.sbatch(
        *CPU_SHAPE, f"--output={tmp_path}/%x-%j.out", "slurm/imagenet_l2.sbatch", "train.max_steps=7",
        env={"DIMSUM_TRAIN_CMD": f"{sys.executable} tests/slurm_helpers.py", "DIMSUM_LOG_DIR": str(tmp_path),
             "DIMSUM_OVERRIDES": "model.name=DiMSUM-debug train.device=cpu", "PROBE_WAIT_FOR_SIGNAL": "1"})
    first_log = tmp_path / f"dimsum-l2-{job}.restart0.log"
    first = probe_records("\n".join(wait_for_file_lines(first_log, "PROBE ", 2)))
    assert sorted(r["RANK"] for r in first) == ["0", "1"]
    assert sorted(r["node"] for r in first) == ["node1", "node2"]
    for record in first:
        assert record["WORLD_SIZE"] == "2" and record["LOCAL_RANK"] == "0" and record["restart"] == 0
        assert record["MASTER_ADDR"] == "127.0.0.1"  # node1's NodeAddr: the node names do not resolve
        assert record["MASTER_PORT"] == str(slurm_master_port(int(job)))
        assert record["rank_sum"] == 1.0  # the gloo all-reduce really ran across both tasks
        assert record["argv"] == ["configs/imagenet_l2.yaml", "model.name=DiMSUM-debug", "train.device=cpu",
                                  "train.max_steps=7"]

    # What --signal=B:USR2@120 does near the time limit: signal the batch shell only.
    slurm_cluster.run("scancel", "--batch", "--signal=USR2", job)
    second_log = tmp_path / f"dimsum-l2-{job}.restart1.log"
    second = probe_records("\n".join(wait_for_file_lines(second_log, "PROBE ", 2, timeout=180)))
    assert sorted(r["restart"] for r in second) == [1, 1]
    assert {r["MASTER_PORT"] for r in second} == {str(slurm_master_port(int(job)))}
    assert slurm_cluster.wait_state(job, {"COMPLETED", "FAILED"}) == "COMPLETED"

    assert first_log.read_text().count("PROBE_SIGNAL USR2") == 2
    batch_log = (tmp_path / f"dimsum-l2-{job}.out").read_text()
    assert f"scontrol requeue {job}" in batch_log and "tasks exited with code 0" in batch_log


def _cpu_task(fn, folder: Path, **kwargs) -> submitit.Job:
    return submit_task(fn, folder=folder / "%j", cluster="slurm", nodes=2, gpus_per_node=0, cpus_per_task=1,
                       time="60", **kwargs)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_submitit_tasks_get_distributed_env_and_return(slurm_cluster: LocalCluster, tmp_path: Path) -> None:
    job = _cpu_task(slurm_helpers.rendezvous, tmp_path, name="rendezvous")
    results = job.results()
    assert [r["RANK"] for r in results] == ["0", "1"]
    for record in results:
        assert record["WORLD_SIZE"] == "2" and record["rank_sum"] == 1.0
        assert record["MASTER_ADDR"] == "127.0.0.1"
        assert record["MASTER_PORT"] == str(slurm_master_port(int(job.job_id)))
    submission = (tmp_path / job.job_id / f"{job.job_id}_submission.sh").read_text()
    assert "#SBATCH --signal=USR2@120" in submission and "gpus" not in submission


@pytest.mark.slow
@pytest.mark.multiprocess
def test_submitit_interrupt_requeues_and_resumes(slurm_cluster: LocalCluster, tmp_path: Path) -> None:
    job = _cpu_task(slurm_helpers.report_after_requeue, tmp_path, name="requeue")
    for task in range(2):
        stdout = tmp_path / job.job_id / f"{job.job_id}_{task}_log.out"
        wait_for_file_lines(stdout, "^READY$", 1)
    job._interrupt()  # SIGTERM then USR2 to every task, as on preemption
    results = job.results()
    assert results == [{"RANK": "0", "restart": 1}, {"RANK": "1", "restart": 1}]
    assert f"Requeued job {job.job_id}" in (tmp_path / job.job_id / f"{job.job_id}_0_log.out").read_text()


@pytest.mark.slow
@pytest.mark.multiprocess
def test_submitit_cancelled_job_raises(slurm_cluster: LocalCluster, tmp_path: Path) -> None:
    job = submit_task(slurm_helpers.sleep_long, folder=tmp_path / "%j", cluster="slurm", nodes=1,
                      gpus_per_node=0, cpus_per_task=1, time="60", name="cancel")
    slurm_cluster.wait_state(job.job_id, {"RUNNING"})
    job.cancel()
    with pytest.raises(submitit.core.utils.UncompletedJobError, match="CANCELLED"):
        job.result()


def test_submit_rejects_bad_config_before_submitting(tmp_path: Path) -> None:
    folder = tmp_path / "never"
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("name: t\ntrain:\n  lr: -1.0\n")
    with pytest.raises(ConfigError, match=r"train\.lr"):
        submit(bad_yaml, folder=folder)
    with pytest.raises(ConfigError, match=r"train\.max_steps"):
        submit(bad_yaml, ["train.lr=1e-4", "train.max_steps=0"], folder=folder)
    with pytest.raises(ConfigError, match=r"launch\.nodes"):
        submit(ExperimentConfig(), nodes=0, folder=folder)
    with pytest.raises(ConfigError, match=r"launch\.time"):
        submit(ExperimentConfig(), time="soon", folder=folder)
    with pytest.raises(ConfigError, match="config"):
        submit(tmp_path / "missing.yaml", folder=folder)
    assert not folder.exists()


@pytest.mark.parametrize(("text", "minutes"), [
    ("90", 90), ("1:30", 2), ("72:00:00", 4320), ("3-00:00:00", 4320), ("1-12", 2160), ("0-00:10", 10)])
def test_slurm_minutes(text: str, minutes: int) -> None:
    assert slurm_minutes(text) == minutes



@pytest.mark.multiprocess
def test_submit_task_on_submitit_local_executor(tmp_path: Path) -> None:
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

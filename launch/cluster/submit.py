"""``dimsum submit`` / :func:`submit`: the trainer on SLURM through submitit, one task per GPU.

The config is validated before anything is submitted. Each task exports RANK / LOCAL_RANK / WORLD_SIZE /
MASTER_ADDR / MASTER_PORT (the same scheme as slurm/common.sh) and calls
``launch.train.trainer.run_training(cfg)``.

Preemption and timeout: submitit asks SLURM for USR2 on every task ``signal_delay_s`` before the end.
The trainer catches it, all ranks save collectively and the trainer ends with
``launch.train.preemption.REQUEUE_EXIT_CODE``; rank 0 then hands over to the handler submitit installed, which
dumps the (unchanged) submission and runs ``scontrol requeue``. The job restarts and auto-resumes.
:meth:`DistributedTask.checkpoint` therefore never saves: submitit calls it on rank 0 alone, and
saving is collective.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import submitit

from dimsum.config import ConfigError
from launch.config import ExperimentConfig, load_config
from launch.train.distributed import slurm_master_port
from launch.train.preemption import REQUEUE_EXIT_CODE
from launch.train.trainer import run_training

SIGNAL_DELAY_S = 120  # same lead time as `--signal=B:USR2@120` in the sbatch recipes


def resolve_master_addr(host: str) -> str:
    """``host`` if it resolves, else its NodeAddr from SLURM (emulated nodes have unresolvable names)."""
    try:
        socket.getaddrinfo(host, None)
        return host
    except socket.gaierror:
        pass
    out = subprocess.run(["scontrol", "show", "node", "-o", host], capture_output=True, text=True,
                         check=False).stdout
    match = re.search(r"\bNodeAddr=(\S+)", out)
    if match is None:
        raise RuntimeError(f"master host {host!r} does not resolve and SLURM knows no NodeAddr for it")
    return match.group(1)


def slurm_minutes(time: str) -> int:
    """Minutes in a SLURM time limit (``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH[:MM[:SS]]``), rounded up."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", time.strip())
    if match is None:
        raise ConfigError("launch.time", time, "expected a SLURM time such as 72:00:00 or 3-00:00:00")
    days, a, b, c = (int(g) if g else None for g in match.groups())
    if days is not None:  # D-HH, D-HH:MM, D-HH:MM:SS
        seconds = ((days * 24 + a) * 60 + (b or 0)) * 60 + (c or 0)
    elif c is not None:  # HH:MM:SS
        seconds = (a * 60 + b) * 60 + c
    else:  # MM or MM:SS
        seconds = a * 60 + (b or 0)
    if seconds <= 0:
        raise ConfigError("launch.time", time, "expected a positive time limit")
    return -(-seconds // 60)


def export_distributed_env() -> dict[str, str]:
    """Export the torch.distributed env:// variables for this task from submitit's job environment."""
    env = submitit.JobEnvironment()
    job_id = os.environ.get("SLURM_JOB_ID") or re.sub(r"\D", "", env.job_id)  # local/debug: a pid or id
    values = {
        "RANK": str(env.global_rank),
        "LOCAL_RANK": str(env.local_rank),
        "WORLD_SIZE": str(env.num_tasks),
        "MASTER_ADDR": resolve_master_addr(env.hostnames[0]),
        "MASTER_PORT": str(slurm_master_port(int(job_id or 0))),
    }
    os.environ.update(values)
    return values


class DistributedTask(submitit.helpers.Checkpointable):
    """Runs ``fn(*args)`` in every task, and requeues the job when ``fn`` asks for it.

    ``fn`` asks for a requeue by raising ``SystemExit(REQUEUE_EXIT_CODE)`` after it has saved what it
    needs (the trainer saves collectively on USR2/TERM).
    """

    def __init__(self, fn: Callable[..., Any], *args: Any, max_requeues: int = 20) -> None:
        self.fn, self.args, self.max_requeues = fn, args, max_requeues

    def __call__(self) -> Any:
        export_distributed_env()
        # submitit only logs SIGTERM; ignoring it outright also protects our children, above all the
        # `scontrol requeue` whose own SIGTERM to the job would otherwise kill it before it reports
        # success (submitit then records the requeue as a failure). The trainer handles TERM itself.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        # The trainer replaces submitit's USR2 handler with its own; keep submitit's to requeue with.
        preempt_signal = getattr(signal, "SIG" + submitit.JobEnvironment.USR_SIG)
        submitit_handler = signal.getsignal(preempt_signal)
        try:
            return self.fn(*self.args)
        except SystemExit as exit_:
            if exit_.code != REQUEUE_EXIT_CODE:
                raise
        if int(os.environ["RANK"]) != 0:
            raise SystemExit(REQUEUE_EXIT_CODE)  # rank 0 requeues; leave no result file behind
        if not callable(submitit_handler):
            raise RuntimeError(f"{self.fn.__name__} saved and asked for a requeue, but this executor "
                               "cannot requeue; run it again to resume")
        submitit_handler(preempt_signal, None)  # checkpoint() + scontrol requeue + exit; raises if refused
        raise AssertionError("unreachable: submitit's handler requeues and exits")

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """Resubmit ourselves unchanged; never save here (rank 0 only, while saving is collective)."""
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        if restarts >= self.max_requeues:
            raise submitit.core.utils.UncompletedJobError(
                f"not requeued: {restarts} restarts reached max_requeues={self.max_requeues}")
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def submit_task(
    fn: Callable[..., Any],
    *args: Any,
    folder: str | Path,
    cluster: str = "slurm",
    nodes: int = 1,
    gpus_per_node: int = 8,
    tasks_per_node: int | None = None,
    cpus_per_task: int = 10,
    partition: str | None = None,
    time: str = "72:00:00",
    max_requeues: int = 20,
    name: str = "dimsum",
    **slurm_kwargs: Any,
) -> submitit.Job:
    """Submit ``DistributedTask(fn, *args)`` with one task per GPU (``tasks_per_node`` when GPU-less).

    ``slurm_kwargs`` are submitit's SLURM parameters (``account``, ``qos``, ``mem_gb``, ...).
    """
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster, slurm_max_num_timeout=max_requeues,
                                     local_max_num_timeout=max_requeues)
    params: dict[str, Any] = {
        "name": name,
        "nodes": nodes,
        "tasks_per_node": tasks_per_node or gpus_per_node or 1,
        "cpus_per_task": cpus_per_task,
        "timeout_min": slurm_minutes(time),
    }
    if gpus_per_node:
        params["gpus_per_node"] = gpus_per_node
    if cluster == "slurm":
        params.update(slurm_signal_delay_s=SIGNAL_DELAY_S, slurm_partition=partition,
                      **{f"slurm_{key}": value for key, value in slurm_kwargs.items()})
    elif slurm_kwargs:
        raise ValueError(f"SLURM parameters {sorted(slurm_kwargs)} given for cluster={cluster!r}")
    executor.update_parameters(**params)
    return executor.submit(DistributedTask(fn, *args, max_requeues=max_requeues))


def _train(cfg: ExperimentConfig) -> dict[str, Any]:
    """The task body: the trainer's summary, or SystemExit(75) once it saved after a signal."""
    summary = run_training(cfg)
    if summary["exit_code"] == REQUEUE_EXIT_CODE:
        raise SystemExit(REQUEUE_EXIT_CODE)
    return summary


def resolve_config(config: ExperimentConfig | str | Path, overrides: Sequence[str] = (),
                   **launch: Any) -> ExperimentConfig:
    """The validated config, with non-None ``launch`` keyword values written into ``cfg.launch``."""
    if isinstance(config, ExperimentConfig):
        if overrides:
            raise ValueError("overrides apply to a config path; edit the ExperimentConfig instead")
        data = config.to_dict()
    else:
        data = load_config(config, overrides).to_dict()
    data["launch"].update({key: value for key, value in launch.items() if value is not None})
    cfg = ExperimentConfig.from_dict(data)
    slurm_minutes(cfg.launch.time)
    return cfg


def submit(
    config: ExperimentConfig | str | Path,
    overrides: Sequence[str] = (),
    *,
    cluster: str | None = None,
    nodes: int | None = None,
    gpus_per_node: int | None = None,
    cpus_per_task: int | None = None,
    partition: str | None = None,
    time: str | None = None,
    max_requeues: int | None = None,
    folder: str | Path | None = None,
    **slurm_kwargs: Any,
) -> submitit.Job:
    """Validate, then submit a training run. Unset arguments come from the config's ``launch`` section.

    ``folder`` (submitit's pickles and logs, ``%j`` allowed) defaults to ``<run_dir>/submitit/%j``.
    """
    cfg = resolve_config(config, overrides, cluster=cluster, nodes=nodes, gpus_per_node=gpus_per_node,
                         cpus_per_task=cpus_per_task, partition=partition, time=time,
                         max_requeues=max_requeues)
    launch = cfg.launch
    return submit_task(
        _train, cfg, folder=folder or cfg.run_dir / "submitit" / "%j", cluster=launch.cluster,
        nodes=launch.nodes, gpus_per_node=launch.gpus_per_node, cpus_per_task=launch.cpus_per_task,
        partition=launch.partition, time=launch.time, max_requeues=launch.max_requeues,
        name=f"dimsum-{cfg.name}", **slurm_kwargs,
    )

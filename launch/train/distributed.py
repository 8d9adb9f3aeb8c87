"""Process-group set-up from whatever started us: torchrun, srun/sbatch, submitit, or nothing at all.

DeepSpeed reads RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT; without them it goes looking for
mpi4py. So the variables are resolved first, in this order: already exported (torchrun, our sbatch
scripts, submitit) > SLURM's own task variables > one process on this machine. Then they are exported,
and only then is ``deepspeed.init_distributed`` called (never the pdsh/ssh launcher).

DeepSpeed JIT-compiles a shared-memory comm op on every process start when it is not cached (30-60 s on
CPU). :func:`extensions_dir` keeps that cache inside the virtualenv, and ``python -m launch.train.distributed
--prebuild`` fills it once at install time.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import datetime
import os
import signal
import socket
import sys
from collections.abc import Mapping, MutableMapping
from pathlib import Path

import torch
import torch.distributed as dist

from dimsum.devices import rank_device


@dataclasses.dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int

    def export(self, environ: MutableMapping[str, str] = os.environ) -> None:
        environ.update(RANK=str(self.rank), LOCAL_RANK=str(self.local_rank), WORLD_SIZE=str(self.world_size),
                       MASTER_ADDR=self.master_addr, MASTER_PORT=str(self.master_port))


def _int(environ: Mapping[str, str], key: str) -> int:
    try:
        return int(environ[key])
    except ValueError:
        raise RuntimeError(f"environment variable {key}={environ[key]!r} is not an integer") from None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def slurm_master_port(job_id: int) -> int:
    """A port derived from the job id, so a requeued job (same id) rendezvous on the same port."""
    return 20000 + job_id % 10000


def resolve_env(environ: Mapping[str, str] = os.environ) -> DistEnv:
    """The process's rank and rendezvous, from launcher variables, SLURM's, or single-process defaults."""
    if "RANK" in environ and "WORLD_SIZE" in environ:
        rank, world = _int(environ, "RANK"), _int(environ, "WORLD_SIZE")
        local = _int(environ, "LOCAL_RANK") if "LOCAL_RANK" in environ else rank
    elif "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ:
        rank, world = _int(environ, "SLURM_PROCID"), _int(environ, "SLURM_NTASKS")
        local = _int(environ, "SLURM_LOCALID") if "SLURM_LOCALID" in environ else 0
    else:
        return DistEnv(0, 0, 1, environ.get("MASTER_ADDR", "127.0.0.1"),
                       _int(environ, "MASTER_PORT") if "MASTER_PORT" in environ else _free_port())
    if not 0 <= rank < world:
        raise RuntimeError(f"rank {rank} is outside world size {world}")
    if world > 1 and "MASTER_ADDR" not in environ:
        raise RuntimeError("MASTER_ADDR is not set for a multi-process job; the launcher (torchrun, "
                           "slurm/*.sbatch, launch.cluster.submit) must export the first host's address")
    if "MASTER_PORT" in environ:
        port = _int(environ, "MASTER_PORT")
    elif "SLURM_JOB_ID" in environ:
        port = slurm_master_port(_int(environ, "SLURM_JOB_ID"))
    elif world == 1:
        port = _free_port()
    else:
        raise RuntimeError("MASTER_PORT is not set for a multi-process job outside SLURM")
    return DistEnv(rank, local, world, environ.get("MASTER_ADDR", "127.0.0.1"), port)


def die_with_launcher() -> None:
    """Under torchrun, have the kernel SIGKILL this rank when the torchrun agent that started it dies.

    torchrun starts every rank in its own session, so a ``kill -9`` of the agent (an OOM killer, a lost
    login shell) would leave the ranks training unsupervised and holding their devices. Checkpoints are
    written atomically, so being killed costs at most the steps since the last one. Linux only; an agent
    killed during the rank's interpreter start-up, before this call, is not covered.
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")


def extensions_dir() -> Path:
    """Where torch keeps JIT-built ops: ``$TORCH_EXTENSIONS_DIR``, else a folder inside the virtualenv."""
    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path(sys.prefix) / "torch_extensions")


def init_distributed(device: str, *, with_deepspeed: bool = True) -> DistEnv:
    """The one way a process joins its job (trainer and sampler): export the resolved variables, then start
    the default process group, NCCL on GPU and gloo on CPU. Under torchrun the agent hosts the store and
    the group is created from ``env://``; otherwise the ranks meet at :func:`rendezvous_store`.
    ``with_deepspeed`` hands the group to DeepSpeed (which creates it itself under torchrun)."""
    env = resolve_env()
    env.export()
    if device.startswith("cuda"):
        torch.cuda.set_device(rank_device(device, env.local_rank))
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":  # torchrun's agent hosts the store itself
        bound = {}  # eager NCCL set-up on this rank's device, as DeepSpeed's own init would do
        if device.startswith("cuda") and env.world_size > 1:
            bound["device_id"] = rank_device(device, env.local_rank)
        dist.init_process_group(backend, store=rendezvous_store(env), rank=env.rank,
                                world_size=env.world_size, **bound)
    elif not with_deepspeed:
        dist.init_process_group(backend)
    if with_deepspeed:
        os.environ["TORCH_EXTENSIONS_DIR"] = str(extensions_dir())
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)  # adopts the group
    return env


def rendezvous_store(env: DistEnv) -> dist.TCPStore:
    """The unauthenticated key-value store the ranks meet at. torch's own server listens on every
    interface; rank 0's socket here is bound to MASTER_ADDR only (loopback for a one-machine job)."""
    timeout = datetime.timedelta(minutes=10)
    if env.rank:
        return dist.TCPStore(env.master_addr, env.master_port, env.world_size, False, timeout)
    family = socket.AF_INET6 if ":" in env.master_addr else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((env.master_addr, env.master_port))
        listener.listen()
        return dist.TCPStore(env.master_addr, env.master_port, env.world_size, True, timeout,
                             master_listen_fd=listener.detach())
    finally:
        listener.close()


def prebuild_ops() -> Path:
    """Compile DeepSpeed's CPU shared-memory comm op into :func:`extensions_dir` (no-op when cached)."""
    os.environ["TORCH_EXTENSIONS_DIR"] = str(extensions_dir())
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        builder.load(verbose=False)
    return extensions_dir()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prebuild", action="store_true", help="compile DeepSpeed's comm op into the cache")
    args = parser.parse_args()
    if args.prebuild:
        print(f"DeepSpeed ops cached in {prebuild_ops()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Helpers for tests/integration/test_slurm.py: a handle on the local SLURM cluster, log readers, and a probe.

Run as a script (``python tests/support/slurm_helpers.py CONFIG overrides...``) this module is a
``DIMSUM_TRAIN_CMD`` stand-in that joins a real gloo process group through the MASTER_ADDR/MASTER_PORT
the launcher exported and prints what it sees: a check of the sbatch rank/rendezvous plumbing that takes
seconds. The requeue path is tested with the real trainer.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# not tests.support.paths: as the probe this file runs as a script, where only the standard library imports
REPO = Path(__file__).resolve().parents[2]
CLUSTER_SCRIPT = REPO / "slurm" / "local_cluster.sh"
DISTRIBUTED_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass
class LocalCluster:
    """The cluster started by slurm/local_cluster.sh under ``base``; ``env`` is what clients need."""

    base: Path
    env: dict[str, str]

    def script(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["bash", str(CLUSTER_SCRIPT), *args], env=self.env, text=True,
                              capture_output=True, check=check, timeout=300)

    def run(self, *cmd: str) -> str:
        return subprocess.run(cmd, env=self.env, text=True, capture_output=True, check=True,
                              timeout=60).stdout

    def sbatch(self, *args: str, env: dict[str, str] | None = None) -> str:
        out = subprocess.run(["sbatch", "--parsable", *args], env={**self.env, **(env or {})}, text=True,
                             capture_output=True, check=True, cwd=REPO, timeout=60).stdout
        return out.strip().split(";")[0]

    def job_field(self, job_id: str, field: str) -> str:
        """A field of ``scontrol show job`` (e.g. JobState, Restarts), '' once the job is forgotten."""
        proc = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=self.env, text=True,
                              capture_output=True, check=False, timeout=60)
        match = re.search(rf"\b{field}=(\S*)", proc.stdout)
        return match.group(1) if match else ""

    def wait_state(self, job_id: str, states: set[str], timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.job_field(job_id, "JobState")
            if state in states:
                return state
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} not in {states} after {timeout} s (last: {state!r})")


def listening_addresses(pids: list[int]) -> list[str]:
    """``ip:port`` of every TCP listener owned by ``pids`` (from /proc, so no iproute2 is needed)."""
    inodes = set()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                match = re.fullmatch(r"socket:\[(\d+)\]", os.readlink(fd))
                if match:
                    inodes.add(match.group(1))
    found = []
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                addr, port = fields[1].split(":")
                raw = bytes.fromhex(addr)  # the kernel prints each 32-bit word in host (little-endian) order
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                found.append(f"{socket.inet_ntop(family, raw)}:{int(port, 16)}")
    return found


def free_port_base(span: int = 30) -> int:
    """A base B (below the MASTER_PORT range, 20000+) such that B..B+span are free on 127.0.0.1."""
    for base in range(14000, 15000 - span, 50):
        try:
            for port in range(base, base + span):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise RuntimeError("no free port range for a test cluster in 14000-15000")


def wait_for_file_lines(path: Path, pattern: str, count: int, timeout: float = 120) -> list[str]:
    """Lines of ``path`` matching ``pattern``, once there are ``count`` of them."""
    deadline = time.monotonic() + timeout
    lines: list[str] = []
    while time.monotonic() < deadline:
        if path.exists():
            lines = [ln for ln in path.read_text().splitlines() if re.search(pattern, ln)]
            if len(lines) >= count:
                return lines
        time.sleep(0.3)
    raise TimeoutError(f"{path}: {len(lines)}/{count} lines matching {pattern!r} after {timeout} s")


def logs_of(folder: Path, job_id: str, tail: int = 40) -> str:
    """The last lines of every log in ``folder`` that names the job: context for a failed assertion."""
    paths = [p for p in sorted(folder.rglob(f"*{job_id}*")) if p.suffix in (".log", ".out", ".err")]
    parts = [f"--- {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-tail:]) for p in paths]
    return "\n".join(parts) or f"no logs of job {job_id} in {folder}"


def clock(path: Path, pattern: str) -> int:
    """Seconds since midnight stamped (``[HH:MM:SS]`` or ``[dimsum HH:MM:SS]``) on the first line of
    ``path`` matching ``pattern``; the trainer and slurm/common.sh stamp their lines this way."""
    for line in path.read_text().splitlines():
        if re.search(pattern, line):
            stamp = re.search(r"\[(?:dimsum )?(\d\d):(\d\d):(\d\d)\]", line)
            if stamp:
                hours, minutes, seconds = map(int, stamp.groups())
                return (hours * 60 + minutes) * 60 + seconds
    raise AssertionError(f"{path}: no time-stamped line matches {pattern!r}")


def probe_records(text: str) -> list[dict]:
    """The JSON records the probe printed (srun --label prefixes each line with the task id)."""
    return [json.loads(line.split("PROBE ", 1)[1]) for line in text.splitlines() if "PROBE " in line]


def rendezvous() -> dict:
    """Join a gloo group through the exported env:// variables, all-reduce the ranks, report the env."""
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    total = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(total)
    dist.destroy_process_group()
    record = {name: os.environ.get(name) for name in DISTRIBUTED_VARS}
    record.update(restart=int(os.environ.get("SLURM_RESTART_COUNT", "0")), rank_sum=total.item(),
                  node=os.environ.get("SLURMD_NODENAME"))
    return record


def sleep_long() -> None:
    time.sleep(600)


def probe_main(argv: list[str]) -> int:
    record = rendezvous()
    record["argv"] = argv
    print("PROBE " + json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(probe_main(sys.argv[1:]))

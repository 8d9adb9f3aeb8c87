"""No unauthenticated listener outside loopback in a single-node run: the rendezvous store and gloo's
sockets of a 1-rank ``dimsum train`` and of the 2-rank ``dimsum demo``, seen in /proc while training is
paused (``DIMSUM_FAULTS=pause@2``)."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.slurm_helpers import listening_addresses
from tests.support.trainer_helpers import CONFIG, REPO, base_env, overrides

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]
LOOPBACK = ("127.", "::1:")


def trainer_pids(pid: int) -> list[int]:
    """``pid`` and its descendants that run ``launch.cli train``."""
    pids, todo = [], [pid]
    while todo:
        current = todo.pop()
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):  # a process may just have ended
            if b"\0train\0" in Path(f"/proc/{current}/cmdline").read_bytes():
                pids.append(current)
            for task in Path(f"/proc/{current}/task").iterdir():
                todo += [int(child) for child in (task / "children").read_text().split()]
    return pids


def listeners_while_paused(cmd: list[str], tmp_path: Path, ranks: int) -> list[str]:
    release = tmp_path / "release"
    proc = subprocess.Popen(cmd, env=base_env(DIMSUM_FAULTS="pause@2", DIMSUM_FAULTS_RELEASE=str(release)),
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while True:  # paused once every rank's store and gloo sockets are up and step 1 has run
            assert proc.poll() is None and time.monotonic() < deadline, "training ended or never paused"
            pids = trainer_pids(proc.pid)
            found = listening_addresses(pids) if len(pids) >= ranks else []
            if found and (tmp_path / "run" / "config.yaml").is_file():
                time.sleep(2)
                found = listening_addresses(pids)
                break
            time.sleep(0.5)
        release.touch()
        assert proc.wait(300) == 0
        return found
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_single_rank_train_listens_on_loopback_only(tmp_path: Path, digits_shards: Path) -> None:
    cmd = [sys.executable, "-m", "launch.cli", "train", str(CONFIG),
           *overrides(tmp_path, digits_shards, "run", max_steps=2)]
    found = listeners_while_paused(cmd, tmp_path, ranks=1)
    assert found and all(address.startswith(LOOPBACK) for address in found), found


def test_demo_ranks_listen_on_loopback_only(tmp_path: Path, digits_shards: Path) -> None:
    cmd = [sys.executable, "-m", "launch.cli", "demo", f"output_root={tmp_path}", "name=run",
           f"data.shards={digits_shards}", "data.num_workers=0", "tracking.enabled=false",
           "train.global_batch=8", "train.max_steps=2", "train.ckpt_every=2", "grid.every=0"]
    found = listeners_while_paused(cmd, tmp_path, ranks=2)
    assert found and all(address.startswith(LOOPBACK) for address in found), found

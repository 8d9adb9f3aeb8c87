"""No unauthenticated listener outside loopback in a single-node run: the rendezvous store and gloo's
sockets of a 1-rank ``dimsum train`` and of the 2-rank ``dimsum demo``, seen in /proc while training is
paused (``DIMSUM_FAULTS=pause@2``). The demo run is also the end-to-end check of ``dimsum demo``."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch.config import load_config
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


def listeners_while_paused(cmd: list[str], run_dir: Path, ranks: int,
                           cwd: Path = REPO) -> tuple[list[str], str]:
    """The listening addresses of ``cmd``'s trainer ranks while they wait at step 2, and its output once
    released (it must then finish with 0)."""
    release, log = run_dir.parent / "release", run_dir.parent / "output.log"
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    env = base_env(DIMSUM_FAULTS="pause@2", DIMSUM_FAULTS_RELEASE=str(release))
    with open(log, "wb") as output:
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=output, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while True:  # paused once every rank's store and gloo sockets are up and step 1 has run
            assert proc.poll() is None and time.monotonic() < deadline, \
                f"training ended or never paused:\n{log.read_text()[-3000:]}"
            pids = trainer_pids(proc.pid)
            found = listening_addresses(pids) if len(pids) >= ranks else []
            if found and (run_dir / "config.yaml").is_file():
                time.sleep(2)
                found = listening_addresses(pids)
                break
            time.sleep(0.5)
        release.touch()
        assert proc.wait(300) == 0, log.read_text()[-4000:]
        return found, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_single_rank_train_listens_on_loopback_only(tmp_path: Path, digits_shards: Path) -> None:
    cmd = [sys.executable, "-m", "launch.cli", "train", str(CONFIG),
           *overrides(tmp_path, digits_shards, "run", max_steps=2)]
    found, _ = listeners_while_paused(cmd, tmp_path / "run", ranks=1)
    assert found and all(address.startswith(LOOPBACK) for address in found), found


def test_demo_end_to_end_with_ranks_that_listen_on_loopback_only(tmp_path: Path) -> None:
    """``dimsum demo`` (the README's main job) with a 2-step budget, in a fresh folder with the config's
    own output and data locations: prepares the digits, trains on two ranks that listen on loopback only,
    samples, exports, explains. (It was a smoke test and an exposure test, each with its own demo run; one
    run checks both.)"""
    args = ["data.num_workers=0", "train.global_batch=8", "train.max_steps=2", "train.ckpt_every=2",
            "grid.every=2", "grid.count=4", "grid.sampler.steps=2", "quality.count=8"]
    cfg = load_config(CONFIG)
    run = tmp_path / cfg.run_dir
    found, out = listeners_while_paused([sys.executable, "-m", "launch.cli", "demo", *args], run, ranks=2,
                                        cwd=tmp_path)
    assert found and all(address.startswith(LOOPBACK) for address in found), found
    assert (tmp_path / cfg.data.shards / "manifest.json").is_file()
    assert (run / "samples" / "step-0000002.png").is_file()
    assert (run / "export" / "step-0000002-ema.safetensors").is_file()
    assert f"mlflow ui --backend-store-uri sqlite:///{run.resolve() / 'mlflow.db'}" in out
    scores = json.loads((run / "samples" / "step-0000002.quality.json").read_text())
    assert (f"quality:      accuracy {100 * scores['accuracy']:.1f}%, FD {scores['fd']:.2f}, precision "
            f"{scores['precision']:.2f}, recall {scores['recall']:.2f} of 8 samples (digits judge)") in out

"""Error paths end the job, on 1 and 2 ranks, with DataLoader workers on (the demo's and the recipes'
setting): workers, threads and the process group are torn down and every process exits non-zero.

Each test is bounded by a wall-clock hang guard on the real processes (a hang is forever; the guard is
generous), never by a speed assertion. A real full disk is a 40 MiB tmpfs filled up to a few MiB.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.support.trainer_helpers import CONFIG, REPO, base_env, complete_steps, ok, overrides

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]
STARTUP_GUARD = 300  # seconds until the error shows up (includes DeepSpeed start-up on a busy machine)
EXIT_GUARD = 60  # seconds from the error's message to the exit of every process


def train_command(nproc: int, args: list[str]) -> list[str]:
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    if nproc == 1:
        launcher = []  # one process without a launcher, like a plain ``dimsum train``
    return [sys.executable, *launcher, "-m", "launch.cli", "train", str(CONFIG), *args]


def exits_after(cmd: list[str], text: str, faults: str = "") -> tuple[int, str]:
    """Run ``cmd`` until ``text`` is printed, then require every process to exit within the guard."""
    proc = subprocess.Popen(cmd, env=base_env(DIMSUM_FAULTS=faults), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + STARTUP_GUARD
        while not any(text in line for line in lines) and proc.poll() is None:
            assert time.monotonic() < deadline, f"{text!r} never printed:\n{''.join(lines[-40:])}"
            time.sleep(0.1)
        try:
            code = proc.wait(EXIT_GUARD)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {EXIT_GUARD} s after {text!r}: hung\n{''.join(lines[-40:])}")
    finally:
        with_group_killed(proc)
    reader.join(10)
    out = "".join(lines)
    assert text in out, out[-4000:]
    return code, out


def with_group_killed(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.mark.parametrize("nproc", [1, 2])
def test_nonfinite_stop_exits_with_workers_on(tmp_path: Path, digits_shards: Path, nproc: int) -> None:
    args = overrides(tmp_path, digits_shards, "nan", workers=1, max_nonfinite=2)
    code, _ = exits_after(train_command(nproc, args), "consecutive non-finite losses", faults="nan@2-")
    assert code != 0 and complete_steps(tmp_path / "nan") == []


@pytest.mark.parametrize("nproc", [1, 2])
def test_failed_final_save_exits_with_workers_on(tmp_path: Path, digits_shards: Path, nproc: int) -> None:
    args = overrides(tmp_path, digits_shards, "full", workers=1, max_steps=4)
    code, _ = exits_after(train_command(nproc, args), "the final checkpoint (step 4) could not be written",
                          faults="enospc_in_save@4")
    assert code != 0 and complete_steps(tmp_path / "full") == [2]


def test_real_full_disk_mid_save_keeps_training_then_exits_and_recovers(small_disk: Path,
                                                                        digits_shards: Path) -> None:
    """torch.save reports a full tmpfs as a RuntimeError from its zip writer, not as OSError."""
    ballast = small_disk / "ballast"
    with open(ballast, "wb") as handle:  # leave 6 MiB: a checkpoint of the debug model needs about 12
        handle.write(b"\0" * (shutil.disk_usage(small_disk).free - (6 << 20)))
    args = overrides(small_disk, digits_shards, "run", workers=1, max_steps=4)
    code, out = exits_after(train_command(1, args), "the final checkpoint (step 4) could not be written")
    assert code != 0
    assert "checkpoint at step 2 was NOT saved" in out and "the disk may be full" in out
    assert not [p for p in (small_disk / "run").iterdir() if p.name.startswith("step-")]  # nothing partial
    ballast.unlink()
    ok(subprocess.run(train_command(1, args), env=base_env(), cwd=REPO, capture_output=True, text=True,
                      timeout=STARTUP_GUARD, check=False))
    assert complete_steps(small_disk / "run") == [2, 4]

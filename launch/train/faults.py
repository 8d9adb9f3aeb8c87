"""Fault injection for the trainer's failure tests, switched on only by ``DIMSUM_FAULTS``.

The resilience paths (kill -9 mid-run, death or a full disk during a save, NaN losses, a tracking
server dying mid-run) must be tested with real processes, so the tests need to make them happen at an
exact step. ``DIMSUM_FAULTS`` is a comma-separated list of ``kind@steps[:rank]``; ``steps`` is ``N``
(fires once, at step N) or ``N-`` (every attempt from step N on); without ``:rank`` every rank fires.

    kill             SIGKILL this process when step N starts
    kill_in_save     SIGKILL this process after its first file write of the checkpoint save at step N
    enospc_in_save   every checkpoint file write of the save at step N fails with ENOSPC
    signal_in_save   SIGTERM to this process just before its first file write of the save at step N
    nan              the loss of the first micro-batch attempted for step N becomes NaN
    pause            at step N, wait until the file ``$DIMSUM_FAULTS_RELEASE`` exists
    kill_in_reshard  SIGKILL this process once DeepSpeed's files of the world-size-independent copy of the
                     checkpoint of step N are written (before the EMA, the file list and the marker)
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

from launch.train.deepspeed_engine import disk_full

KINDS = ("kill", "kill_in_save", "enospc_in_save", "signal_in_save", "nan", "pause", "kill_in_reshard")


@dataclasses.dataclass
class Fault:
    kind: str
    first: int
    open_ended: bool
    rank: int | None
    fired: bool = False


def parse(spec: str) -> list[Fault]:
    faults = []
    for entry in filter(None, (e.strip() for e in spec.split(","))):
        try:
            kind, _, rest = entry.partition("@")
            steps, _, rank = rest.partition(":")
            open_ended = steps.endswith("-")
            fault = Fault(kind, int(steps.rstrip("-")), open_ended, int(rank) if rank else None)
        except ValueError:
            raise ValueError(f"DIMSUM_FAULTS entry {entry!r}: expected kind@N[-][:rank]") from None
        if kind not in KINDS:
            raise ValueError(f"DIMSUM_FAULTS entry {entry!r}: unknown kind; choose from {', '.join(KINDS)}")
        faults.append(fault)
    return faults


class Faults:
    """The faults that apply to this rank; every query is a no-op when ``DIMSUM_FAULTS`` is unset."""

    def __init__(self, spec: str, rank: int) -> None:
        self.faults = [f for f in parse(spec) if f.rank in (None, rank)]

    @classmethod
    def from_env(cls, rank: int) -> Faults:
        return cls(os.environ.get("DIMSUM_FAULTS", ""), rank)

    def fires(self, kind: str, step: int) -> bool:
        for fault in self.faults:
            if fault.kind == kind and (step >= fault.first if fault.open_ended
                                       else step == fault.first and not fault.fired):
                fault.fired = True
                return True
        return False

    def at_step_start(self, step: int) -> None:
        if self.fires("kill", step):
            os.kill(os.getpid(), signal.SIGKILL)
        if self.fires("pause", step):
            release = Path(os.environ["DIMSUM_FAULTS_RELEASE"])
            while not release.exists():
                time.sleep(0.05)

    def save_hook(self, step: int) -> Callable[[str], None]:
        """``before_write(file)``, called before each file the save of ``step`` writes on this rank."""
        kill, enospc = self.fires("kill_in_save", step), self.fires("enospc_in_save", step)
        interrupt = self.fires("signal_in_save", step)
        writes = 0

        def before_write(path: str) -> None:
            nonlocal writes
            if interrupt and not writes:
                os.kill(os.getpid(), signal.SIGTERM)
            if enospc:
                raise disk_full(path)
            if kill and writes:
                os.kill(os.getpid(), signal.SIGKILL)
            writes += 1

        return before_write

    def reshard_hook(self, step: int) -> Callable[[str], None]:
        """``progress(stage)`` for the conversion of the checkpoint of ``step`` (launch/train/reshard.py)."""
        kill = self.fires("kill_in_reshard", step)

        def progress(stage: str) -> None:
            if kill and stage == "written":
                os.kill(os.getpid(), signal.SIGKILL)

        return progress

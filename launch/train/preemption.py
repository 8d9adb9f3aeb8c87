"""Preemption and time limits: a signal only sets a flag; the trainer acts on it at a step boundary.

SLURM sends SIGUSR2 (``--signal=B:USR2@120``) or SIGTERM before it kills a job. Saving is collective,
so the handler must not save: it records the request, and at the next step boundary all ranks agree
(an all-reduce, since the signal may reach only some of them), save together, and exit with
:data:`REQUEUE_EXIT_CODE`. A second signal during that save only sets the flag again, so it cannot
interrupt or corrupt the checkpoint being written.
"""

from __future__ import annotations

import signal
from types import FrameType

from launch.logs import notice_log

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: "state saved, please requeue"; exit 0 means the run finished
_notice = notice_log("preemption")


class PreemptionFlag:
    """SIGUSR2/SIGTERM handlers that only record the request (``install``/``uninstall``, or ``with``)."""

    def __init__(self, signals: tuple[signal.Signals, ...] = (signal.SIGUSR2, signal.SIGTERM)) -> None:
        self.signals = signals
        self.received: list[str] = []
        self._previous: dict[signal.Signals, object] = {}

    @property
    def requested(self) -> bool:
        return bool(self.received)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if not self.received:
            _notice(f"{name} received: saving and exiting at the next step boundary")
        self.received.append(name)

    def install(self) -> PreemptionFlag:
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        """Put the previous handlers back (e.g. submitit's, once training is over)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __enter__(self) -> PreemptionFlag:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.uninstall()

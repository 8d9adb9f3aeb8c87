"""The service's one logging convention, on stdlib ``logging``: two kinds of line, each with its own stream.

* Progress, from :func:`progress_log`: ``[HH:MM:SS] message`` on stdout, from rank 0 only. It is the run's
  story (banner, step lines, saves), which N ranks would otherwise print N times.
* Notices, from :func:`notice_log` and :func:`warn`: ``[topic] message`` and ``WARNING: message`` on
  stderr, from every rank, for events each rank reports itself (a signal it received, a damaged
  checkpoint it stepped over).

Both are plain loggers (``dimsum.progress``, ``dimsum.notices``) with their own handler and
``propagate = False``, so what DeepSpeed or MLflow do to the root logger cannot change the format, while
ordinary logging configuration can still re-route them. The handlers look ``sys.stdout`` and
``sys.stderr`` up when they write, so redirection (pytest's capture, ``contextlib.redirect_stdout``) sees
the lines. ``data_pipeline`` sits below this package and logs through ``logging.getLogger(__name__)``.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import IO

Log = Callable[[str], None]  # what the ``log=`` parameters of the trainer's parts take


class _CurrentStream(logging.StreamHandler):
    """A StreamHandler on whatever ``sys.<name>`` is at the time of each line."""

    def __init__(self, name: str, fmt: str) -> None:
        self._stream_name = name
        super().__init__()
        self.setFormatter(logging.Formatter(fmt, datefmt="%H:%M:%S"))

    @property
    def stream(self) -> IO[str]:
        return getattr(sys, self._stream_name)

    @stream.setter
    def stream(self, _ignored: IO[str]) -> None:  # StreamHandler.__init__ assigns one; the getter decides
        pass


def _logger(name: str, stream: str, fmt: str) -> logging.Logger:
    logger = logging.getLogger(name)
    if not logger.handlers:
        logger.addHandler(_CurrentStream(stream, fmt))
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


_PROGRESS = _logger("dimsum.progress", "stdout", "[%(asctime)s] %(message)s")
_NOTICES = _logger("dimsum.notices", "stderr", "%(message)s")


def _quiet(_message: str) -> None:
    pass


def progress_log(rank: int = 0) -> Log:
    """``[HH:MM:SS] message`` lines on stdout for rank 0; nothing for the other ranks."""
    return _PROGRESS.info if rank == 0 else _quiet


def notice_log(topic: str) -> Log:
    """``[topic] message`` lines on stderr, from whichever rank calls it."""

    def notice(message: str) -> None:
        _NOTICES.info("[%s] %s", topic, message)

    return notice


def warn(message: str) -> None:
    """A ``WARNING: message`` line on stderr."""
    _NOTICES.warning("WARNING: %s", message)

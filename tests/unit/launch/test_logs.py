"""launch.logs: the lines look as they did when each module printed its own, whatever the root logger does."""

from __future__ import annotations

import logging
import re

import pytest

from launch.logs import notice_log, progress_log, warn


def test_progress_is_a_stamped_stdout_line_from_rank_0_only(capsys: pytest.CaptureFixture[str]) -> None:
    progress_log(0)("step 3/8 | loss 0.5000")
    progress_log(1)("step 3/8 from another rank")
    out, err = capsys.readouterr()
    assert re.fullmatch(r"\[\d\d:\d\d:\d\d\] step 3/8 \| loss 0\.5000\n", out), out
    assert err == ""


def test_notices_and_warnings_go_to_stderr_from_every_rank(capsys: pytest.CaptureFixture[str]) -> None:
    notice_log("checkpoint")("rank 1 saved 100% of step-0000004")
    warn("checkpoint step-0000004 is damaged: COMPLETE is missing; using step-0000002 instead")
    out, err = capsys.readouterr()
    assert out == ""
    assert err == ("[checkpoint] rank 1 saved 100% of step-0000004\n"
                   "WARNING: checkpoint step-0000004 is damaged: COMPLETE is missing; using step-0000002 "
                   "instead\n")


def test_a_configured_root_logger_neither_reformats_nor_repeats_the_lines(
        capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    handler = logging.StreamHandler()  # what a library's basicConfig would add: stderr, "LEVEL:name:msg"
    root.addHandler(handler)
    try:
        progress_log()("banner")
        notice_log("preemption")("SIGUSR2 received")
    finally:
        root.removeHandler(handler)
    out, err = capsys.readouterr()
    assert out.endswith("] banner\n") and out.count("banner") == 1
    assert err == "[preemption] SIGUSR2 received\n"

"""The fork server the CLI tests run commands in (tests/support/forked_cli.py) against fresh interpreters:
the same exit code, stdout and stderr for a user error, a failed data check, ``SystemExit`` with a
message and an uncaught exception, and the call's own process, session, environment and directory."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import forked_cli
from tests.support.trainer_helpers import CONFIG, base_env

pytestmark = pytest.mark.multiprocess
PROBES = {
    "exits_with_a_message": "raise SystemExit('refused: the probe says so')\n",
    "raises": "def deeper():\n    raise KeyError('probe')\n\n\ndeeper()\n",
    "reports": "import os\nprint(os.getpid(), os.getsid(0), os.environ['DIMSUM_FAULTS'], os.getcwd())\n",
}


@pytest.fixture
def probes(tmp_path: Path) -> Path:
    """A folder of probe modules: ``python -m`` finds them in its working directory."""
    for name, text in PROBES.items():
        (tmp_path / f"{name}.py").write_text(text)
    return tmp_path


Runs = tuple[subprocess.CompletedProcess, subprocess.CompletedProcess]


def both(cwd: Path, module: str, *args: str) -> Runs:
    """``python -m module args`` fresh, then forked."""
    env = base_env(DIMSUM_FAULTS="")
    fresh = subprocess.run([sys.executable, "-m", module, *args], env=env, capture_output=True, text=True,
                           timeout=120, cwd=cwd, check=False)
    return fresh, forked_cli.run(module, list(args), env, cwd, timeout=120)


@pytest.mark.parametrize("command", [
    ["launch.cli", "config", "show", str(CONFIG), "train.lrr=1"],  # the error funnel's one line
    ["launch.cli", "data", "verify", "{tmp}"],  # no manifest: data verify's own report
    ["exits_with_a_message"],
], ids=["user-error", "data-verify", "exit-message"])
def test_a_fork_prints_and_exits_as_a_fresh_interpreter(command: list[str], probes: Path) -> None:
    fresh, forked = both(probes, *(part.format(tmp=probes) for part in command))
    assert fresh.returncode != 0 and fresh.stderr
    assert (forked.returncode, forked.stdout, forked.stderr) == (fresh.returncode, fresh.stdout, fresh.stderr)


def test_an_uncaught_exception_prints_its_traceback_and_exits_1(probes: Path) -> None:
    fresh, forked = both(probes, "raises")
    assert fresh.returncode == forked.returncode == 1
    for proc in (fresh, forked):  # the frames above the probe's own differ (runpy's entry points)
        lines = proc.stderr.splitlines()
        assert lines[0] == "Traceback (most recent call last):" and lines[-1] == "KeyError: 'probe'"
        assert "in deeper" in proc.stderr


def test_each_call_is_a_process_of_its_own_with_its_environment(probes: Path) -> None:
    runs = [forked_cli.run("reports", [], base_env(DIMSUM_FAULTS=faults), probes, timeout=60).stdout.split()
            for faults in ("kill@3", "nan@2")]
    assert [faults for _, _, faults, _ in runs] == ["kill@3", "nan@2"]
    assert all(pid == session and cwd == str(probes) for pid, session, _, cwd in runs)  # own session
    assert runs[0][0] != runs[1][0]

"""Command lines (``python -m launch.cli ...``) run in forks of a warm interpreter.

Most of a short ``dimsum`` process is spent importing torch, DeepSpeed and MLflow and tearing them down
again (3-6 s of CPU each time), and the CLI tests start about a hundred of them. Here one server process
imports those once; each call forks it into a real process of its own (own pid, session, environment,
working directory, standard streams and exit code) that runs the module with ``runpy`` exactly as
``python -m`` does.

What a fork does not repeat: the imports (what they print, such as DeepSpeed's accelerator line, goes to
the server's log, and what a library reads from the environment at import time is the server's
``base_env()``; the project reads its variables when it runs), and the part of interpreter exit that
tears the modules down. A fork ends as the interpreter would otherwise: it joins non-daemon threads, runs
``atexit`` handlers, collects its own garbage (the server froze everything before it) and flushes its
streams. Tests about start-up output, signals or launchers (torchrun, SLURM, ``Popen`` of a running
trainer) start fresh processes.

Run as ``python -m tests.support.forked_cli REQUEST_FD REPLY_FD``, this module is the server.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import importlib
import json
import os
import runpy
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import NoReturn

# Everything a dimsum command imports before or while it runs (the CLI imports each command lazily).
PRELOAD = ("launch.cli", "launch.cli.train", "launch.cli.export", "launch.cli.sample", "launch.cli.config",
           "launch.cli.demo", "data_pipeline.prepare", "data_pipeline.verify", "launch.train.checkpoint",
           "launch.train.trainer", "launch.train.tracking", "deepspeed", "mlflow", "mlflow.tracking")


class ForkServer:
    """The client: starts the server with ``env`` and runs one command at a time in a fork of it."""

    def __init__(self, env: dict[str, str], cwd: Path, start_timeout: float = 300) -> None:
        request_read, self._requests = os.pipe()
        self._replies, reply_write = os.pipe()
        self.log = Path(tempfile.mkstemp(prefix="dimsum-forkserver-", suffix=".log")[1])
        with open(self.log, "wb") as log:
            self._server = subprocess.Popen(
                [sys.executable, "-m", __name__, str(request_read), str(reply_write)], env=env, cwd=cwd,
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                pass_fds=(request_read, reply_write))
        os.close(request_read)
        os.close(reply_write)
        self._pending = b""
        self._lock = threading.Lock()
        ready = self._reply(time.monotonic() + start_timeout)
        assert ready == "ready", f"fork server did not start: {ready!r}\n{self.log.read_text()[-4000:]}"

    def run(self, module: str, args: list[str], env: dict[str, str], cwd: Path,
            timeout: float) -> subprocess.CompletedProcess[str]:
        """Like ``subprocess.run([python, -m, module, *args], capture_output=True, text=True)``."""
        cmd = [sys.executable, "-m", module, *args]
        with self._lock, tempfile.TemporaryDirectory(prefix="dimsum-fork-") as tmp:
            out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
            request = {"module": module, "args": args, "env": env, "cwd": str(cwd), "stdout": str(out),
                       "stderr": str(err)}
            os.write(self._requests, json.dumps(request).encode() + b"\n")
            deadline = time.monotonic() + timeout
            pid = int(self._reply(deadline).removeprefix("pid "))
            try:
                code = int(self._reply(deadline).removeprefix("exit "))
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)  # the command and everything it started
                self._reply(time.monotonic() + 60)
                raise subprocess.TimeoutExpired(cmd, timeout, out.read_text(), err.read_text()) from None
            return subprocess.CompletedProcess(cmd, code, out.read_text(), err.read_text())

    def _reply(self, deadline: float) -> str:
        while b"\n" not in self._pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self._replies], [], [], remaining)[0]:
                raise TimeoutError("no reply from the fork server")
            chunk = os.read(self._replies, 4096)
            if not chunk:
                raise RuntimeError(f"the fork server died:\n{self.log.read_text()[-4000:]}")
            self._pending += chunk
        line, _, self._pending = self._pending.partition(b"\n")
        return line.decode()

    def close(self) -> None:
        os.close(self._requests)  # the server ends at the end of its requests
        self._server.wait(60)
        os.close(self._replies)
        self.log.unlink(missing_ok=True)


_servers: dict[tuple[tuple[str, str], ...], ForkServer] = {}


# Read when a command runs, never at import: calls may differ in these and share a server.
PER_CALL = ("DIMSUM_FAULTS", "DIMSUM_FAULTS_RELEASE", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
            "MASTER_PORT", "SLURM_CONF", "PYTEST_CURRENT_TEST")


def run(module: str, args: list[str], env: dict[str, str], cwd: Path,
        timeout: float) -> subprocess.CompletedProcess[str]:
    """``python -m module *args`` in a fork of the session's server for ``env`` (minus :data:`PER_CALL`):
    a server imported with another environment would not be a faithful stand-in for a fresh start."""
    key = tuple(sorted((k, v) for k, v in env.items() if k not in PER_CALL))
    if key not in _servers:
        _servers[key] = ForkServer({k: v for k, v in key}, cwd)
    return _servers[key].run(module, args, env, cwd, timeout)


@atexit.register
def _close_servers() -> None:
    for server in _servers.values():
        server.close()
    _servers.clear()


# ----------------------------------------------------------------------------------------- the server

def serve(requests: int, replies: int) -> dict | None:
    """Answer requests until they end (None); in each forked child, return that child's request."""
    for name in PRELOAD:
        importlib.import_module(name)
    gc.freeze()  # the forks' collections then skip (and never copy) the server's objects
    os.write(replies, b"ready\n")
    with os.fdopen(requests, "rb", buffering=0) as lines:
        for line in iter(lines.readline, b""):
            if threading.active_count() != 1:  # a fork copies only this thread: refuse a half-copied state
                raise RuntimeError(f"fork server has Python threads: {threading.enumerate()}")
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                os.close(replies)
                return json.loads(line)
            os.write(replies, f"pid {pid}\n".encode())
            _, status = os.waitpid(pid, 0)
            os.write(replies, f"exit {os.waitstatus_to_exitcode(status)}\n".encode())
    return None


def become(request: dict) -> NoReturn:
    """Turn this fork into ``python -m MODULE ARGS`` run with the request's environment and streams."""
    os.setsid()  # a session of its own, so a timeout kills the command with everything it started
    with open(os.devnull, "rb") as null:
        os.dup2(null.fileno(), 0)
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    os.chdir(request["cwd"])
    sys.path[0] = os.getcwd()  # where ``python -m`` looks first
    os.environ.clear()
    os.environ.update(request["env"])
    if "numpy" in sys.modules:  # a fresh interpreter seeds numpy's global generator (random reseeds itself)
        sys.modules["numpy"].random.seed()
    sys.argv = [sys.argv[0], *request["args"]]
    try:
        runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exit_:
        code = exit_code(exit_.code)
    except BaseException:  # what the interpreter does with an uncaught exception
        sys.excepthook(*sys.exc_info())
        code = 1
    threading._shutdown()  # join the non-daemon threads, as the interpreter does before it exits
    atexit._run_exitfuncs()
    gc.collect()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def exit_code(value: object) -> int:
    """The exit status the interpreter gives ``SystemExit(value)``."""
    if value is None:
        return 0
    if isinstance(value, int):
        return value
    print(value, file=sys.stderr)
    return 1


if __name__ == "__main__":
    child_request = serve(int(sys.argv[1]), int(sys.argv[2]))
    if child_request is not None:
        become(child_request)

"""MLflow tracking on rank 0 that can never stop or slow training.

Every call from the training loop only puts an item on a bounded queue; one background thread owns
the MLflow client, creates or resumes the run, and sends metrics in batches. When the tracking server
is down or slow the thread warns (rate-limited), keeps the items, and retries with backoff; when the
buffer is full the oldest metrics are dropped and counted. At the end, :meth:`MLflowTracker.close`
waits a bounded time for the backlog and reports what could not be delivered.

By default the store is embedded in the run directory (``mlflow.db`` sqlite + ``mlruns/`` artifacts,
both explicit so nothing lands in the current directory); ``tracking.uri`` or ``MLFLOW_TRACKING_URI``
points it at a server instead. The run id is returned by :attr:`run_id` once known; the trainer keeps it
in the checkpoint (and in ``mlflow_run_id`` beside it, for a server that was unreachable until after a
save), so a resumed attempt continues the same run. The embedded store is opened synchronously, so its
run id is known from the first step.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

RUN_ID_FILE = "mlflow_run_id"
MAX_BATCH = 1000  # MLflow's log_batch limit on metrics per request


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config dict -> dotted MLflow params (``train.lr``: ``0.0001``)."""
    out: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = str(value)
    return out


def embedded_uri(run_dir: Path) -> str:
    return f"sqlite:///{run_dir.resolve() / 'mlflow.db'}"


class NullTracker:
    """What every rank but 0 (and runs with tracking disabled) get: the same calls, doing nothing."""

    run_id: str | None = None

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...
    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...
    def close(self, status: str | None = None) -> None: ...


class MLflowTracker:
    """Asynchronous MLflow client for one run (see the module docstring for the failure behaviour)."""

    def __init__(self, *, uri: str, experiment: str, run_name: str, run_id: str | None = None,
                 artifact_location: Path | None = None, params: Mapping[str, str] | None = None,
                 tags: Mapping[str, str] | None = None, queue_size: int = 10_000, flush_timeout: float = 30.0,
                 run_id_file: Path | None = None, log: Callable[[str], None] = print) -> None:
        self.uri, self.experiment, self.run_name = uri, experiment, run_name
        self.sqlite_path = Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None
        if uri.startswith(("http://", "https://")):  # our thread retries; MLflow's own minutes-long retry
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")  # loop would only delay the warning
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        self.artifact_location, self.run_id_file = artifact_location, run_id_file
        self.run_id = run_id
        self._params = dict(params or {}) if run_id is None else {}  # logged once, on a fresh run
        self._queue: queue.Queue[tuple] = queue.Queue(maxsize=queue_size)
        self._queue.put_nowait(("tags", dict(tags or {})))
        if run_id is not None:  # a resumed run was left KILLED (preempted) or FAILED by its last attempt
            self._queue.put_nowait(("status", "RUNNING"))
        self._pending: list[tuple] = []
        self._capacity = queue_size
        self.dropped = 0
        self.flush_timeout = flush_timeout
        self.log = log
        self._closing = threading.Event()
        self._last_warning = 0.0
        self._client: Any = None
        for name in ("alembic", "mlflow.store.db.utils"):
            logging.getLogger(name).setLevel(logging.WARNING)
        if self.sqlite_path is not None:  # local, cannot be "down": connect now so run_id is known at once
            try:
                self._client = self._connect()
            except Exception as err:
                self.log(f"[mlflow] cannot open {self.uri} ({err}); will retry in the background")
        self._thread = threading.Thread(target=self._work, name="mlflow-tracker", daemon=True)
        self._thread.start()

    # ---- called from the training loop: never blocks -------------------------------------------
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self._put(("metrics", dict(metrics), step, int(time.time() * 1000)))

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self._put(("artifact", str(path), artifact_path))

    def _put(self, item: tuple) -> None:
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self.dropped += 1

    def close(self, status: str | None = None) -> None:
        """Deliver the backlog within ``flush_timeout`` seconds, ending the run with ``status`` (FINISHED,
        KILLED for a preempted attempt, FAILED); report whatever is left (once)."""
        if self._closing.is_set():
            return
        if status is not None:
            self._put(("status", status))
        self._closing.set()
        self._thread.join(self.flush_timeout)
        left = self._queue.qsize() + len(self._pending)
        if left or self.dropped:
            self.log(f"[mlflow] {left} item(s) not delivered and {self.dropped} dropped ({self.uri})")

    # ---- background thread ---------------------------------------------------------------------
    def _work(self) -> None:
        client, failures = self._client, 0
        while True:
            self._drain()
            if self._closing.is_set() and not self._pending and self._queue.empty() and client is not None:
                return
            try:
                if client is None:
                    client = self._connect()
                self._send(client)
                failures = 0
            except Exception as err:
                failures += 1
                self._warn(f"[mlflow] cannot reach {self.uri} ({type(err).__name__}: {str(err)[:200]}); "
                           f"{len(self._pending)} item(s) buffered, retrying")
                if self._closing.is_set():
                    return  # one last attempt was made; close() reports what is left
                self._closing.wait(min(30.0, 0.5 * 2 ** failures))
                continue
            if not self._closing.is_set():
                time.sleep(0.2)

    def _drain(self) -> None:
        while True:
            try:
                self._pending.append(self._queue.get_nowait())
            except queue.Empty:
                break
        overflow = len(self._pending) - self._capacity
        if overflow > 0:  # keep the newest; the oldest metrics are the least useful to a live view
            metric_idx = [i for i, item in enumerate(self._pending) if item[0] == "metrics"][:overflow]
            self.dropped += len(metric_idx)
            for i in reversed(metric_idx):
                del self._pending[i]

    def _connect(self) -> Any:
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        if self.sqlite_path is not None and not self.sqlite_path.exists():
            self._create_sqlite_store()
        client = MlflowClient(tracking_uri=self.uri)
        if self.run_id is not None:
            try:
                client.get_run(self.run_id)
            except MlflowException as err:
                self.log(f"[mlflow] cannot resume run {self.run_id} ({err}); starting a new run")
                self.run_id = None
        if self.run_id is None:
            exp = client.get_experiment_by_name(self.experiment)
            exp_id = exp.experiment_id if exp else client.create_experiment(
                self.experiment, artifact_location=self.artifact_location.resolve().as_uri()
                if self.artifact_location else None)
            run = client.create_run(exp_id, run_name=self.run_name)
            self.run_id = run.info.run_id
            if self.run_id_file is not None:
                self.run_id_file.write_text(self.run_id + "\n")
            self._pending.insert(0, ("params", self._params))
        return client

    def _create_sqlite_store(self) -> None:
        """MLflow's schema migration takes seconds and is not atomic: a process killed during it would
        leave a store that never opens again. So it runs on a temporary file that is renamed when done."""
        from mlflow.tracking import MlflowClient

        tmp = self.sqlite_path.with_name(f".{self.sqlite_path.name}.tmp-{os.getpid()}")
        tmp.unlink(missing_ok=True)
        MlflowClient(tracking_uri=f"sqlite:///{tmp}").search_experiments()
        os.replace(tmp, self.sqlite_path)

    def _send(self, client: Any) -> None:
        from mlflow.entities import Metric, Param, RunTag

        while self._pending:
            kind, *rest = self._pending[0]
            if kind == "metrics":
                items, batch = [], []
                while (self._pending and self._pending[0][0] == "metrics"
                       and (not batch or len(batch) + len(self._pending[0][1]) <= MAX_BATCH)):
                    _, metrics, step, stamp = item = self._pending.pop(0)
                    items.append(item)
                    batch += [Metric(k, float(v), stamp, step) for k, v in metrics.items()]
                try:
                    client.log_batch(self.run_id, metrics=batch)
                except Exception:
                    self._pending[:0] = items
                    raise
                continue
            if kind == "params":
                params = [Param(k, v[:6000]) for k, v in rest[0].items()]
                for i in range(0, len(params), 100):  # MLflow accepts at most 100 params per batch
                    client.log_batch(self.run_id, params=params[i:i + 100])
            elif kind == "tags":
                client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in rest[0].items()])
            elif kind == "artifact":
                client.log_artifact(self.run_id, rest[0], rest[1])
            elif kind == "status" and rest[0] == "RUNNING":
                client.update_run(self.run_id, status="RUNNING")
            elif kind == "status":
                client.set_terminated(self.run_id, status=rest[0])
            self._pending.pop(0)

    def _warn(self, text: str) -> None:
        now = time.monotonic()
        if now - self._last_warning > 60:
            self._last_warning = now
            self.log(text)


def saved_run_id(run_dir: Path) -> str | None:
    """The run id the tracker recorded beside the checkpoints (for resumes saved before it was known)."""
    path = run_dir / RUN_ID_FILE
    return (path.read_text().strip() or None) if path.is_file() else None


def make_tracker(*, enabled: bool, rank: int, uri: str | None, experiment: str, run_dir: Path,
                 run_id: str | None, params: Mapping[str, str], tags: Mapping[str, str],
                 flush_timeout: float = 30.0,
                 log: Callable[[str], None] = print) -> MLflowTracker | NullTracker:
    """Rank 0 gets an :class:`MLflowTracker` (embedded store unless a URI is given); others a null one.

    ``run_id`` continues an existing run (a resume); None creates a new one and logs ``params`` once.
    """
    if not enabled or rank != 0:
        return NullTracker()
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or None
    embedded = uri is None
    run_dir.mkdir(parents=True, exist_ok=True)
    return MLflowTracker(uri=embedded_uri(run_dir) if embedded else uri, experiment=experiment,
                         run_name=run_dir.name, run_id=run_id,
                         artifact_location=run_dir / "mlruns" if embedded else None, params=params, tags=tags,
                         flush_timeout=flush_timeout, run_id_file=run_dir / RUN_ID_FILE, log=log)

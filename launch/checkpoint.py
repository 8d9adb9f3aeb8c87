"""Checkpoint directories that are either complete or ignored: nothing lost, nothing half-loaded.

Layout under the run directory::

    step-0000500/   every rank writes its part (DeepSpeed shards + our per-rank state)
    step-0000500/COMPLETE   written by rank 0 only after every rank reported success
    latest          "step-0000500", replaced atomically (temp file, fsync, rename)

The marker is the single source of truth: resume scans for it and never trusts a directory without
it (a crash, a kill -9 or a full disk during a save leaves such a directory; it is reported and
skipped). Pruning removes a checkpoint's marker before its files, so an interrupted deletion can never
leave a "complete" directory with missing shards, and it runs only after a newer save completed.

The manager is independent of DeepSpeed: rank, world size and the two collectives are injected, so it
is unit-tested with simulated ranks (torchtitan style) and driven by ``torch.distributed`` in training.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

STEP_DIR = re.compile(r"^step-(\d{7})$")
MARKER = "COMPLETE"
POINTER = "latest"


def step_name(step: int) -> str:
    return f"step-{step:07d}"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Readers see the old content or the new one, never a torn file (temp file, fsync, rename)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def fsync_tree(path: Path) -> None:
    """Flush every file under ``path`` (cheap for files that are already clean)."""
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    step: int
    path: Path


class CheckpointManager:
    """Save, find and prune ``step-NNNNNNN`` directories under ``root`` for one rank of a job.

    ``barrier()`` and ``all_true(flag)`` must be collectives over all ranks (every rank calls them in
    the same order); ``all_true`` returns True only when every rank passed True.
    """

    def __init__(self, root: str | Path, *, rank: int = 0, world_size: int = 1,
                 barrier: Callable[[], None] = lambda: None, all_true: Callable[[bool], bool] = lambda ok: ok,
                 keep_last: int = 2, milestone_every: int = 0, log: Callable[[str], None] = print) -> None:
        if keep_last < 2:
            raise ValueError(f"keep_last must be >= 2 (a newer save may fail half-way), got {keep_last}")
        self.root = Path(root)
        self.rank, self.world_size = rank, world_size
        self.barrier, self.all_true = barrier, all_true
        self.keep_last, self.milestone_every = keep_last, milestone_every
        self.log = log

    def step_dir(self, step: int) -> Path:
        return self.root / step_name(step)

    def scan(self) -> tuple[list[Checkpoint], list[Checkpoint]]:
        """(complete, incomplete) checkpoint directories, each sorted by step."""
        complete, incomplete = [], []
        if self.root.is_dir():
            for path in self.root.iterdir():
                match = STEP_DIR.match(path.name)
                if match and path.is_dir():
                    ckpt = Checkpoint(int(match.group(1)), path)
                    (complete if (path / MARKER).is_file() else incomplete).append(ckpt)
        return sorted(complete, key=lambda c: c.step), sorted(incomplete, key=lambda c: c.step)

    def latest(self) -> Checkpoint | None:
        """The newest complete checkpoint; newer incomplete directories are reported and ignored."""
        complete, incomplete = self.scan()
        newest = complete[-1] if complete else None
        if self.rank == 0:
            for ckpt in incomplete:
                if newest is None or ckpt.step > newest.step:
                    self.log(f"ignoring incomplete checkpoint {ckpt.path} (no {MARKER} marker)")
        return newest

    def save(self, step: int, write: Callable[[Path], None]) -> bool:
        """Collective save: every rank runs ``write(dir)``; rank 0 commits only if all succeeded.

        Returns False (and removes the partial directory) when any rank's write raised ``OSError``
        (disk full, quota, I/O error). The previous complete checkpoint is untouched either way.
        """
        path = self.step_dir(step)
        if self.all_true((path / MARKER).is_file()):
            return True  # e.g. a preemption right after resuming: this exact state is already saved
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if path.exists():
                self.log(f"removing incomplete checkpoint {path} left by an earlier attempt")
                shutil.rmtree(path)
        self.barrier()
        ok = True
        try:
            path.mkdir(parents=True, exist_ok=True)
            write(path)
            fsync_tree(path)
        except OSError as err:
            self.log(f"rank {self.rank}: writing checkpoint {path} failed: {err}")
            ok = False
        if self.all_true(ok) and self.rank == 0:
            try:
                self._commit(step, path)
            except OSError as err:
                self.log(f"committing checkpoint {path} failed: {err}")
                ok = False
        if not self.all_true(ok):  # everyone learns whether rank 0's commit worked
            if self.rank == 0:
                shutil.rmtree(path, ignore_errors=True)
                self.log(f"checkpoint at step {step} was NOT saved; the previous complete one is kept")
            return False
        if self.rank == 0:
            self._prune()
        return True

    def _commit(self, step: int, path: Path) -> None:
        info = {"step": step, "world_size": self.world_size, "time": time.time()}
        atomic_write_text(path / MARKER, json.dumps(info) + "\n")
        atomic_write_text(self.root / POINTER, step_name(step) + "\n")

    def _prune(self) -> None:
        complete, incomplete = self.scan()
        keep = {c.step for c in complete[-self.keep_last:]}
        if self.milestone_every:
            keep |= {c.step for c in complete if c.step % self.milestone_every == 0}
        newest = complete[-1].step
        for ckpt in complete:
            if ckpt.step not in keep:
                (ckpt.path / MARKER).unlink()
                shutil.rmtree(ckpt.path, ignore_errors=True)
        for ckpt in incomplete:
            if ckpt.step < newest:
                self.log(f"removing stale incomplete checkpoint {ckpt.path}")
                shutil.rmtree(ckpt.path, ignore_errors=True)

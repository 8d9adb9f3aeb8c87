"""Checkpoint directories that are either complete or ignored: nothing lost, nothing half-loaded.

Layout under the run directory::

    step-0000500/   every rank writes its part (DeepSpeed shards + our per-rank state)
    step-0000500/COMPLETE   written by rank 0 only after every rank reported success
    latest          "step-0000500", replaced atomically (temp file, fsync, rename)

The marker is the single source of truth: resume scans for it and never trusts a directory without
it (a crash, a kill -9 or a full disk during a save leaves such a directory; it is reported and
skipped). Pruning removes a checkpoint's marker before its files, so an interrupted deletion can never
leave a "complete" directory with missing shards, and it runs only after a newer save completed.

Integrity and trust. Before the marker, every rank writes ``sha256-rank-NNNNN.json``: the name, size and
sha256 of each file it wrote. :func:`damage` checks a checkpoint against those lists (every rank's list
present, every listed file intact, nothing unlisted in the directory) before anything unpickles a byte of
it: DeepSpeed's loader and ``zero_to_fp32`` use ``torch.load(weights_only=False)``, so a planted or
flipped file must be refused here. Resume falls back to the newest intact checkpoint and moves damaged
newer ones aside (``step-NNNNNNN.damaged``), deleting nothing.

Ownership. Directories we create carry an ``.dimsum`` file (the run directory and every step
directory); every deletion here is limited to directories that carry it, so a clumsy ``name`` or a
foreign folder in the run directory is never removed.

The manager is independent of DeepSpeed: rank, world size and the two collectives are injected, so it
is unit-tested with simulated ranks (torchtitan style) and driven by ``torch.distributed`` in training.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path, PurePosixPath
from typing import Any

from dimsum.errors import UserError

STEP_DIR = re.compile(r"^step-(\d{7})$")
MARKER = "COMPLETE"
POINTER = "latest"
OURS = ".dimsum"  # "created by dimsum": the only directories dimsum ever deletes
FILE_LISTS = "sha256-rank-*.json"
LEGACY_HINT = "python -m launch.train.checkpoint seal"


class CheckpointError(UserError):
    """No checkpoint can be used; the message names the file and what is wrong with it."""


class RunDirError(UserError):
    """A run directory cannot be used as asked (not dimsum's, or holds a run that would be mixed in)."""


def file_list_name(rank: int) -> str:
    return f"sha256-rank-{rank:05d}.json"


def fully_written(step_dir: Path, world_size: int) -> bool:
    """Every rank finished its part (its file list is there), whether or not the marker followed."""
    return len([*step_dir.glob(FILE_LISTS)]) >= world_size


def sha256_file(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def is_ours(path: Path) -> bool:
    return (path / OURS).is_file()


def mark_ours(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / OURS).touch()


def remove_ours(path: Path, log: Callable[[str], None]) -> bool:
    """``rmtree(path)`` only when dimsum created it; otherwise leave it and say so."""
    if not is_ours(path):
        log(f"leaving {path} alone: it has no {OURS} marker, so dimsum did not create it")
        return False
    shutil.rmtree(path, ignore_errors=True)
    return True


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


def write_file_list(step_dir: Path, rank: int, files: Iterable[Path]) -> None:
    """Flush this rank's ``files`` and record their sizes and sha256 (read back from the page cache), by
    their path relative to ``step_dir`` (a world-size-independent copy keeps files in subfolders)."""
    entries = {}
    for file in sorted(set(files)):
        if not file.is_relative_to(step_dir) or file == step_dir:
            raise OSError(f"checkpoint file {file} is outside its directory {step_dir}")
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())
        entries[file.relative_to(step_dir).as_posix()] = {"bytes": file.stat().st_size,
                                                          "sha256": sha256_file(file)}
    atomic_write_text(step_dir / file_list_name(rank), json.dumps({"rank": rank, "files": entries}) + "\n")


class _DamageError(Exception):
    """Why a checkpoint must not be loaded (internal to :func:`damage`)."""


def marker(step_dir: Path) -> dict[str, Any]:
    """The ``COMPLETE`` marker of a checkpoint: step, world size, time and the manager's ``facts``."""
    return json.loads((step_dir / MARKER).read_text())


def damage(step_dir: Path) -> str | None:
    """Why the checkpoint in ``step_dir`` must not be loaded, or None when it is intact: the marker
    parses, every rank's file list is there, every listed file has its size and sha256, and nothing else
    (no planted file) is in the directory."""
    try:
        expected, listed = _file_lists(step_dir)
        folders = {parent.as_posix() for name in listed for parent in PurePosixPath(name).parents}
        present = {p.relative_to(step_dir).as_posix() for p in step_dir.rglob("*")}
        for name in sorted(present - expected - listed.keys() - folders):
            raise _DamageError(f"{name} is not one of the files the ranks wrote")
        for name, entry in sorted(listed.items()):
            path = step_dir / name
            if ".." in PurePosixPath(name).parts or name.startswith("/") or name in expected \
                    or not path.is_file():
                raise _DamageError(f"{name} is missing")
            if path.stat().st_size != entry["bytes"]:
                raise _DamageError(f"{name} has {path.stat().st_size} bytes, {entry['bytes']} were written")
            if sha256_file(path) != entry["sha256"]:
                raise _DamageError(f"{name} does not match its sha256 (changed after it was written)")
    except _DamageError as why:
        return str(why)
    return None


def _file_lists(step_dir: Path) -> tuple[set[str], dict[str, dict]]:
    """(our bookkeeping file names, {file: {bytes, sha256}} over every rank's list)."""
    try:
        info = json.loads((step_dir / MARKER).read_text())
        world, step = int(info["world_size"]), info["step"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise _DamageError(f"{MARKER} marker is unreadable ({type(err).__name__}: {err})") from None
    if step != int(STEP_DIR.match(step_dir.name).group(1)):
        raise _DamageError(f"{MARKER} says step {step}")
    expected, listed = {MARKER, OURS}, {}
    for rank in range(world):
        name = file_list_name(rank)
        expected.add(name)
        try:
            listed.update(json.loads((step_dir / name).read_text())["files"])
        except FileNotFoundError:
            if not any(step_dir.glob(FILE_LISTS)):
                raise _DamageError(f"written without checksums (before dimsum verified checkpoints); if you "
                               f"trust this directory, run '{LEGACY_HINT} {step_dir}'") from None
            raise _DamageError(f"{name} (the file list of rank {rank}/{world}) is missing") from None
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise _DamageError(f"{name} is unreadable ({type(err).__name__}: {err})") from None
    return expected, listed


def seal(step_dir: Path) -> None:
    """Trust a checkpoint written before checksums existed: record its files as they are now (the
    ranks' files are all listed under rank 0) and mark the directories as dimsum's."""
    info = json.loads((step_dir / MARKER).read_text())
    files = [p for p in step_dir.iterdir()
             if p.name not in (MARKER, OURS) and not p.match(FILE_LISTS) and p.is_file()]
    write_file_list(step_dir, 0, files)
    for rank in range(1, int(info["world_size"])):
        atomic_write_text(step_dir / file_list_name(rank), json.dumps({"rank": rank, "files": {}}) + "\n")
    mark_ours(step_dir)
    mark_ours(step_dir.parent)


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
                 keep_last: int = 2, milestone_every: int = 0, log: Callable[[str], None] = print,
                 facts: Callable[[], dict[str, Any]] = dict) -> None:
        if keep_last < 2:
            raise ValueError(f"keep_last must be >= 2 (a newer save may fail half-way), got {keep_last}")
        self.root = Path(root)
        self.rank, self.world_size = rank, world_size
        self.barrier, self.all_true = barrier, all_true
        self.keep_last, self.milestone_every = keep_last, milestone_every
        self.log = log
        self.facts = facts  # more plain values for the marker, readable without unpickling anything

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

    def latest_intact(self) -> tuple[Checkpoint | None, list[str]]:
        """(the newest complete checkpoint that passes :func:`damage`, a line per damaged newer one).

        Damaged newer checkpoints are renamed ``step-NNNNNNN.damaged`` (kept for inspection, never
        scanned again), so the run continues from the intact one and re-saves those steps. When every
        complete checkpoint is damaged nothing is renamed and :class:`CheckpointError` says why each is.
        """
        complete, _ = self.scan()
        self.latest()  # reports newer incomplete directories
        damaged = []
        for ckpt in reversed(complete):
            problem = damage(ckpt.path)
            if problem is None:
                for line, _ in damaged:
                    self.log(f"WARNING: {line}")
                for _, path in damaged:
                    quarantine = path.with_name(f"{path.name}.damaged")
                    while quarantine.exists():
                        quarantine = quarantine.with_name(quarantine.name + "+")
                    path.rename(quarantine)
                    self.log(f"moved the damaged checkpoint aside to {quarantine}")
                return ckpt, [line for line, _ in damaged]
            damaged.append((f"checkpoint {ckpt.path} is damaged: {problem}", ckpt.path))
        if damaged:
            raise CheckpointError(f"{self.root}: no intact checkpoint to resume from; "
                                  + "; ".join(line for line, _ in damaged))
        return None, []

    def save(self, step: int, write: Callable[[Path], Iterable[Path]]) -> bool:
        """Collective save: every rank runs ``write(dir)``, which returns the files it wrote there; each
        rank lists them with their sha256, and rank 0 commits only if all ranks succeeded.

        Returns False (and removes the partial directory) when any rank's write raised ``OSError``
        (disk full, quota, I/O error). The previous complete checkpoint is untouched either way.
        """
        path = self.step_dir(step)
        if self.all_true((path / MARKER).is_file()):
            # e.g. a preemption right after resuming: this exact state is already saved
            if self.rank == 0:
                self.log(f"{path} is already complete; nothing written")
            return True
        in_the_way = False
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            in_the_way = path.exists() and not is_ours(path)
            if path.exists() and not in_the_way:
                self.log(f"removing incomplete checkpoint {path} left by an earlier attempt")
                shutil.rmtree(path)
            if not in_the_way:
                mark_ours(path)
        if not self.all_true(not in_the_way):
            raise CheckpointError(f"{path} is in the way of the checkpoint of step {step} and was not "
                                  f"created by dimsum (no {OURS} file); move it out of {self.root}")
        ok = True
        try:
            path.mkdir(parents=True, exist_ok=True)
            write_file_list(path, self.rank, write(path))
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
                remove_ours(path, self.log)
                self.log(f"checkpoint at step {step} was NOT saved; the previous complete one is kept")
            return False
        if self.rank == 0:
            self._prune()
        return True

    def _commit(self, step: int, path: Path) -> None:
        info = {**self.facts(), "step": step, "world_size": self.world_size, "time": time.time()}
        atomic_write_text(path / MARKER, json.dumps(info) + "\n")
        atomic_write_text(self.root / POINTER, step_name(step) + "\n")

    def _prune(self) -> None:
        complete, incomplete = self.scan()
        keep = {c.step for c in complete[-self.keep_last:]}
        if self.milestone_every:
            keep |= {c.step for c in complete if c.step % self.milestone_every == 0}
        newest = complete[-1].step
        for ckpt in complete:
            if ckpt.step not in keep and is_ours(ckpt.path):
                (ckpt.path / MARKER).unlink()
                remove_ours(ckpt.path, self.log)
        for ckpt in incomplete:
            if ckpt.step < newest and remove_ours(ckpt.path, self.log):
                self.log(f"removed stale incomplete checkpoint {ckpt.path}")


def main() -> int:
    parser = argparse.ArgumentParser(description="Trust checkpoints written before dimsum verified them.")
    parser.add_argument("command", choices=["seal"])
    parser.add_argument("step_dirs", nargs="+", type=Path, help="RUN/step-NNNNNNN directories you trust")
    for step_dir in parser.parse_args().step_dirs:
        seal(step_dir)
        print(f"sealed {step_dir}: {damage(step_dir) or 'intact'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

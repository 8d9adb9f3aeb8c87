"""The trainer's checkpointer: which checkpoint a job starts from, when it saves, and what it saves.

The directory protocol (atomic markers, checksums, ownership, pruning) is :class:`CheckpointManager`'s;
what a checkpoint holds is the :class:`CheckpointStates` registry the trainer hands over. This module
joins the two with the run's policy: the resume vote, the run-directory rules of a fresh start, and the
cadence (every ``train.ckpt_every`` steps, the last step, and whenever the job is stopping).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from dimsum.config import ConfigError
from dimsum.errors import UserError
from launch.config import ExperimentConfig, check_resume_config
from launch.train.checkpoint import (
    MARKER,
    OURS,
    POINTER,
    Checkpoint,
    CheckpointManager,
    RunDirError,
    fully_written,
    is_ours,
    marker,
    remove_ours,
)
from launch.train.collectives import Collectives
from launch.train.deepspeed_engine import batch_layout
from launch.train.reshard import Resize, prepare
from launch.train.state import CheckpointStates

BeforeWrite = Callable[[str], None]  # called with each file a save is about to write


def resume_point(manager: CheckpointManager, cfg: ExperimentConfig, collectives: Collectives,
                 log: Callable[[str], None],
                 reshard_progress: Callable[[int], Callable[[str], None]] = lambda step: lambda stage: None,
                 ) -> tuple[Checkpoint | None, list[str], Resize | None]:
    """(rank 0's newest intact checkpoint, or None for a fresh start it allowed, agreed by all ranks;
    a line per damaged newer checkpoint skipped; the :class:`Resize` when it was written by another
    number of ranks, converted for this one). Runs before any heavy work, so a refusal is quick."""
    start, refusal, fallback = None, None, []
    if manager.rank == 0:
        try:
            start, fallback = claim_run_dir(manager, cfg, log)
        except UserError as err:
            refusal = err
    step, refused = collectives.max([start.step if start else -1.0, float(refusal is not None)])
    if refusal is not None:
        raise refusal
    if refused:
        raise RunDirError(f"rank 0 refused the run directory {manager.root} (see its message)")
    if step < 0:
        return None, fallback, None
    start = Checkpoint(int(step), manager.step_dir(int(step)))
    for change in check_resume_config(manager.root, cfg):
        log(f"resuming with a changed config: {change}")
    saved_world = int(marker(start.path)["world_size"])
    if saved_world == manager.world_size:
        return start, fallback, None
    _, written_accumulation = batch_layout(cfg.train, saved_world)  # for markers that predate recording it
    resize = prepare(start, manager.rank, manager.world_size, written_accumulation, collectives, log=log,
                     progress=reshard_progress(start.step))
    return start, fallback, resize


def claim_run_dir(manager: CheckpointManager, cfg: ExperimentConfig,
                  log: Callable[[str], None]) -> tuple[Checkpoint | None, list[str]]:
    """On rank 0: the checkpoint to resume from, or permission for a fresh start. A fresh start never
    mixes into another run or a foreign folder, and deletes only checkpoints dimsum wrote."""
    t, run_dir = cfg.train, manager.root
    if t.resume:
        start, fallback = manager.latest_intact()
        if start is not None:
            return start, fallback
    if not run_dir.is_dir() or not any(run_dir.iterdir()):
        return None, []
    if not is_ours(run_dir):
        raise RunDirError(f"{run_dir} is not empty and was not created by dimsum (no {OURS} file); "
                          "choose another name or output_root")
    complete, incomplete = manager.scan()
    # one incomplete save may be our own first one, killed part-way; more, or a fully written one, is a
    # run whose markers were lost: starting over would delete its checkpoints one by one
    lost = len(incomplete) > 1 or any(fully_written(c.path, manager.world_size) for c in incomplete)
    if t.resume and lost:
        raise RunDirError(f"{run_dir} holds checkpoint directories but none is complete "
                          f"({', '.join(c.path.name for c in incomplete)} have no {MARKER} marker); "
                          "not starting over on top of them: restore the markers, or start over with "
                          "train.resume=false train.overwrite=true")
    if not t.resume:
        if not t.overwrite:
            raise ConfigError("train.resume", False, f"{run_dir} already holds a run; resume it "
                              "(train.resume=true), choose another name, or start over with "
                              "train.overwrite=true (deletes its checkpoints)")
        for ckpt in [*complete, *incomplete]:
            remove_ours(ckpt.path, manager.log)
        (run_dir / POINTER).unlink(missing_ok=True)
        log(f"==> train.overwrite: deleted the earlier checkpoints in {run_dir}")
    return None, []


class Checkpointer:
    """Saves :class:`CheckpointStates` on the run's cadence and loads them back.

    ``before_write(step)`` gives the per-file callback of the save of ``step`` (fault injection in the
    tests; by default nothing).
    """

    def __init__(self, manager: CheckpointManager, states: CheckpointStates, *, every: int, last_step: int,
                 before_write: Callable[[int], BeforeWrite] = lambda step: lambda path: None,
                 log: Callable[[str], None] = print) -> None:
        self.manager, self.states = manager, states
        self.every, self.last_step = every, last_step
        self.before_write, self.log = before_write, log

    def due(self, step: int, stopping: bool) -> bool:
        return step % self.every == 0 or step == self.last_step or stopping

    def after_step(self, step: int, stopping: bool) -> bool:
        """Save when due; True when a checkpoint of ``step`` now exists. Only a failed final save is an
        error: any other one is retried at the next due step, and the previous checkpoint is intact."""
        if not self.due(step, stopping):
            return False
        saved = self.save(step)
        if not saved and step == self.last_step:
            raise RuntimeError(f"the final checkpoint (step {step}) could not be written; "
                               "free space and rerun: it resumes from the last complete one")
        return saved

    def save(self, step: int) -> bool:
        """A collective save of every state (see :meth:`CheckpointManager.save`)."""
        rank = self.manager.rank
        began, new = time.perf_counter(), not (self.manager.step_dir(step) / MARKER).is_file()
        saved = self.manager.save(step, lambda path: self.states.save(path, rank, self.before_write(step)))
        if saved and new:
            self.log(f"saved {self.manager.step_dir(step)} in {time.perf_counter() - began:.1f} s")
        return saved

    def load(self, start: Checkpoint) -> None:
        self.states.load(start.path, self.manager.rank)

    def latest(self) -> Checkpoint | None:
        return self.manager.latest()

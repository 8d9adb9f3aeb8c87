"""Elastic resume: a checkpoint written by N ranks continues on M ranks, under ZeRO-1, 2 or 3.

The route is DeepSpeed's own universal checkpoint: ``deepspeed.checkpoint.ds_to_universal`` rewrites the
N rank partitions as one folder per parameter (fp32 master weight, AdamW ``exp_avg`` / ``exp_avg_sq`` and
step count) plus the optimizer's param groups and the model-states files (LR scheduler, DeepSpeed's
counters, our ``client_state``), and an engine built with ``checkpoint.load_universal`` re-partitions
them for any world size. In the pinned DeepSpeed this serves ZeRO-1/2/3 on CPU/gloo (tried 1 -> 2 and
2 -> 1 ranks for each stage: fp32 masters and both moments load bit-identical). Our parts are added next
to it: the fp32 EMA, consolidated from every rank's shard (each rank of the new job takes the slice of its
own master fragments), and nothing of the RNG: the new ranks reseed (see the trainer).

``run_dir/universal/step-NNNNNNN/`` holds the copy. It is made on rank 0 at resume time from a verified
checkpoint, which is only read, and committed like a checkpoint: a ``sha256-rank-00000.json`` list of
every file in it, then the ``COMPLETE`` marker. A copy without the marker (a kill -9 during conversion)
or with a damaged file is removed and made again on the next start; an intact one is reused, by any
world size. Once the resized run has saved a checkpoint of its own, the copies are deleted.

After loading, every rank compares what the engine holds with the copy (its fp32 master fragments, both
moments, the step counts): DeepSpeed's universal loader is not checked by anything else, and a silent
misplacement would train on without an error. Model buffers are not in the copy; every model family
computes its buffers from the config.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from launch.train.checkpoint import (
    MARKER,
    OURS,
    Checkpoint,
    CheckpointError,
    atomic_write_text,
    damage,
    is_ours,
    mark_ours,
    marker,
    remove_ours,
    write_file_list,
)
from launch.train.collectives import Collectives
from launch.train.deepspeed_engine import master_fragments
from launch.train.state import (
    CLIENT_KEY,
    CheckpointStates,
    client_state,
    consolidate_ema,
    load_own,
    rank_file,
    seed_everything,
)

UNIVERSAL = "universal"  # the folder of the copies, inside the run directory
EMA_FILE = "dimsum-ema.pt"
MOMENTS = ("exp_avg", "exp_avg_sq")


class ReshardError(RuntimeError):
    """A checkpoint could not be converted or loaded for another world size; the original is intact."""


@dataclasses.dataclass(frozen=True)
class Resize:
    """A resume on another world size: the checkpoint, its world-size-independent copy, and the world size
    and accumulation it was written with."""

    source: Checkpoint
    copy: Path
    world_size: int
    accumulation: int

    def next_position(self, data_position: int, accumulation: int) -> int:
        """The new ranks' first micro-batch: the first of the next global batch not fully consumed. Each
        rank had consumed ``data_position`` micro-batches, ``accumulation`` per global batch without
        non-finite drops; a dropped micro-batch leaves a global batch part-consumed, which is not replayed."""
        return math.ceil(data_position / self.accumulation) * accumulation


def prepare(start: Checkpoint, rank: int, world_size: int, accumulation: int, collectives: Collectives, *,
            log: Callable[[str], None], progress: Callable[[str], None]) -> Resize:
    """Collective: rank 0 makes (or finds) the copy of ``start``; every rank learns whether it worked.
    ``accumulation`` is the written run's, used when its marker predates recording it."""
    saved = marker(start.path)
    copy, failure = None, None
    if rank == 0:
        log(f"==> {start.path.name} was written by {saved['world_size']} ranks; this job has {world_size}: "
            "converting it for the new world size")
        try:
            copy = convert(start.path, log=log, progress=progress)
        except (ReshardError, CheckpointError, OSError) as err:
            failure = err
    (failed,) = collectives.max([float(failure is not None)])
    if failure is not None:
        raise failure
    if failed:
        raise ReshardError(f"rank 0 could not convert {start.path} for {world_size} ranks (see its message)")
    return Resize(start, copy or universal_dir(start.path), int(saved["world_size"]),
                  int(saved.get("accumulation", accumulation)))


def restore(states: CheckpointStates, resize: Resize, *, accumulation: int, seed: int, rank: int,
            log: Callable[[str], None]) -> None:
    """Load ``resize``'s copy into ``states`` (the engine built for the new world size): DeepSpeed's state,
    the train state with its data position moved to the next global batch, this rank's EMA slice, and a
    fresh RNG seeded by (seed, rank, step), last. The EMA offsets are the new layout's own."""
    began = time.perf_counter()
    client = load(states.engine, resize.copy)
    log(f"loaded and verified {resize.copy} on this world size in {time.perf_counter() - began:.1f} s")
    states.train.load_state_dict(client[CLIENT_KEY])
    states.train.data_position = resize.next_position(states.train.data_position, accumulation)
    states.per_rank["ema"].load_state_dict(ema_shard(resize.copy, master_fragments(states.engine)))
    seed_everything(seed, rank, resized_at=states.train.step)


def universal_dir(step_dir: Path) -> Path:
    return step_dir.parent / UNIVERSAL / step_dir.name


def convert(step_dir: Path, *, log: Callable[[str], None],
            progress: Callable[[str], None] = lambda stage: None) -> Path:
    """On rank 0: the intact world-size-independent copy of the verified checkpoint ``step_dir``, made now
    when there is none. ``progress(stage)`` is called before ("convert") and after ("written") DeepSpeed's
    conversion; the fault-injection tests kill the process there."""
    target = universal_dir(step_dir)
    if (target / MARKER).is_file():
        problem = damage(target)
        if problem is None:
            log(f"reusing the world-size-independent copy {target}")
            return target
        log(f"the world-size-independent copy {target} is damaged ({problem}); converting again")
    if target.exists():
        if not is_ours(target):
            raise CheckpointError(f"{target} is in the way of the world-size-independent copy of "
                                  f"{step_dir.name} and was not created by dimsum; move it away")
        log(f"removing the incomplete world-size-independent copy {target} (an interrupted conversion)")
        remove_ours(target, log)
    mark_ours(target.parent)
    mark_ours(target)
    began = time.perf_counter()
    progress("convert")
    _ds_to_universal(step_dir, target)
    progress("written")
    ema = load_own(step_dir / rank_file(0))["ema"]
    torch.save({"decay": ema["decay"], "num_updates": ema["num_updates"],
                "shadow": consolidate_ema(step_dir)}, target / EMA_FILE)
    write_file_list(target, 0, [p for p in target.rglob("*") if p.is_file() and p.name != OURS])
    info = {"step": client_state(step_dir)["step"], "world_size": 1, "source": step_dir.name,
            "source_world_size": int(marker(step_dir)["world_size"]), "time": time.time()}
    atomic_write_text(target / MARKER, json.dumps(info) + "\n")
    log(f"converted {step_dir.name} (written by {info['source_world_size']} ranks) into the "
        f"world-size-independent copy {target} in {time.perf_counter() - began:.1f} s")
    return target


def _ds_to_universal(source: Path, target: Path) -> None:
    """DeepSpeed's converter in this process, serially (a process pool would fork a process that holds a
    process group), with its progress output kept for the error message."""
    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(input_folder=str(source), output_folder=str(target), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True,
                              inject_missing_state=True)  # our models declare no universal_checkpoint_info
    output = io.StringIO()
    try:
        with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
            ds_to_universal.main(args)
    except Exception as err:
        tail = " | ".join(output.getvalue().strip().splitlines()[-3:])
        raise ReshardError(f"DeepSpeed could not convert {source} for another world size ("
                           f"{type(err).__name__}: {err}; {tail}); the checkpoint itself is "
                           "unchanged") from err
    (target.parent / "latest_universal").unlink(missing_ok=True)  # DeepSpeed's pointer; we name the tag


def load(engine: Any, copy: Path) -> dict[str, Any]:
    """Load the copy into ``engine`` (built with ``checkpoint.load_universal``), check what it now holds,
    and return the checkpoint's ``client_state``."""
    _, client = engine.load_checkpoint(str(copy.parent), tag=copy.name)
    if client is None:
        raise ReshardError(f"DeepSpeed could not load the world-size-independent copy {copy}")
    verify(engine, copy, int(engine.global_steps))
    return client


def _saved(copy: Path, name: str, state: str) -> torch.Tensor:
    """One state of one parameter in the copy, flat; mapped, so a rank reads only the pages of its slice."""
    saved = torch.load(copy / "zero" / name / f"{state}.pt", map_location="cpu", mmap=True, weights_only=True)
    return (saved["param"] if isinstance(saved, dict) else saved).flatten()  # ZeRO-1/2 wrap it, ZeRO-3 not


def verify(engine: Any, copy: Path, step: int) -> None:
    """Every fp32 master fragment and both AdamW moments of this rank equal the copy's, and every step
    count is ``step``; :class:`ReshardError` names the first tensor that does not."""
    for state in ("fp32", *MOMENTS):
        for name, (offset, fragment) in master_fragments(engine, state).items():
            expected = _saved(copy, name, state)[offset:offset + fragment.numel()]
            if not torch.equal(fragment.flatten().cpu(), expected):
                raise ReshardError(f"after loading {copy}, this rank's {state} of {name!r} differs from the "
                                   "copy: DeepSpeed's universal loader misplaced it")
    counts = {float(s["step"]) for s in engine.optimizer.optimizer.state.values() if "step" in s}
    if counts != {float(step)}:
        raise ReshardError(f"after loading {copy}, AdamW step counts are {sorted(counts)}, expected {step}")


def ema_shard(copy: Path, fragments: dict[str, tuple[int, torch.Tensor]]) -> dict[str, Any]:
    """The EMA state of this rank (its slice of every full fp32 EMA tensor), as ``EMA.load_state_dict``
    takes it."""
    full = load_own(copy / EMA_FILE)
    shadow = {name: full["shadow"][name].flatten()[offset:offset + view.numel()].view_as(view)
              for name, (offset, view) in fragments.items()}
    return {"decay": full["decay"], "num_updates": full["num_updates"], "shadow": shadow}


def remove_copies(run_dir: Path, log: Callable[[str], None]) -> None:
    """Delete every world-size-independent copy (the resized run has a checkpoint of its own now)."""
    folder = run_dir / UNIVERSAL
    if folder.is_dir() and remove_ours(folder, log):
        log(f"removed the world-size-independent copies in {folder}")

"""What a checkpoint holds beyond DeepSpeed's own shards, and how it is read back.

:class:`CheckpointStates` is the one registry of it (torchtitan's ``states={...}``); the trainer builds
it and hands it to the checkpointer. On disk:

* ``client_state["dimsum"]`` (in DeepSpeed's model-states file): the :class:`TrainState` fields (global
  step, data position, MLflow run id, attempt, ...) plus facts that are written, never loaded: world
  size, parameter shapes, EMA decay and the resolved config.
* ``dimsum-rank-NNNNN.pt``, one per rank: one entry per per-rank state, today ``ema`` (that rank's fp32
  EMA fragments of the master weights it owns), ``offsets`` (where each fragment starts in its
  parameter) and ``rng`` (python, numpy, torch, cuda). DeepSpeed saves ``client_state`` from rank 0
  only, so per-rank states cannot go there.

Restoring all of it is what makes a resumed run bit-identical (docs/architecture.md, "Determinism").
:func:`consolidate_ema` reassembles full fp32 EMA tensors from all rank files, on any machine.

Our files hold only tensors and plain Python values (numpy's RNG state is stored as a tensor), so they
are read with ``torch.load(weights_only=True)``: a planted pickle cannot run code through them. DeepSpeed's
files need full unpickling; callers verify the checkpoint's checksums first (:func:`checkpoint.damage`).
"""

from __future__ import annotations

import dataclasses
import pickle
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from launch.train.checkpoint import CheckpointError
from launch.train.deepspeed_engine import save_checkpoint, write_errors_as_oserror

CLIENT_KEY = "dimsum"


def rank_file(rank: int) -> str:
    return f"dimsum-rank-{rank:05d}.pt"


class Stateful(Protocol):
    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


@dataclasses.dataclass
class TrainState:
    """Loop counters that must survive a restart."""

    step: int = 0
    data_position: int = 0  # micro-batches consumed by this rank's loader (dropped non-finite ones too)
    nonfinite_total: int = 0
    attempt: int = 0
    mlflow_run_id: str | None = None

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for field in dataclasses.fields(self):
            setattr(self, field.name, state[field.name])


def seed_everything(seed: int, rank: int, resized_at: int | None = None) -> None:
    """Distinct streams per rank (noise, times, label dropout must differ between ranks). A job resized at
    step ``resized_at`` has no saved generator for its new rank layout and reseeds from (seed, rank, step)."""
    stream = seed * 1_000_003 + rank
    if resized_at is not None:
        stream = int(np.random.SeedSequence([seed, rank, resized_at]).generate_state(1, np.uint64)[0] >> 1)
    random.seed(stream)
    np.random.seed(stream % 2**32)
    torch.manual_seed(stream)


class RNGState:
    """Every global generator of this process (python, numpy, torch, cuda), as tensors and plain values
    so the rank file loads with ``weights_only=True``."""

    def state_dict(self) -> dict[str, Any]:
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        state = {"python": random.getstate(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos,
                                                        has_gauss, gauss), "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        random.setstate(state["python"])
        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


class ShardOffsets:
    """Where each of this rank's EMA fragments starts in its flattened parameter. Loading checks that the
    saved layout is this run's: the EMA shard is positional, so another partition would silently mix it."""

    def __init__(self, offsets: Callable[[], dict[str, int]], where: str) -> None:
        self.offsets, self.where = offsets, where

    def state_dict(self) -> dict[str, int]:
        return self.offsets()

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state != self.offsets():
            changed = sorted(k for k in state.keys() | self.offsets().keys()
                             if state.get(k) != self.offsets().get(k))
            raise CheckpointError(f"{self.where}: the EMA shard layout differs from this run's "
                                  f"(e.g. {changed[0]!r}); was it written with another DeepSpeed version?")


@dataclasses.dataclass
class CheckpointStates:
    """Everything a checkpoint holds, named once; the checkpointer saves and loads exactly this.

    ``engine`` is DeepSpeed's (module, optimizer, LR scheduler) and writes its own shard files; ``train``
    goes to rank 0's client state with ``facts`` (written for readers, never loaded); each ``per_rank``
    entry is one key of this rank's file. Entries load in order, so the RNG comes last.
    """

    engine: Any
    train: TrainState
    per_rank: dict[str, Stateful]
    facts: Callable[[], dict[str, Any]]

    def save(self, path: Path, rank: int, before_write: Callable[[str], None] = lambda _: None) -> list[Path]:
        """This rank's part of the checkpoint at ``path``; returns the files written."""
        client = {CLIENT_KEY: {**self.train.state_dict(), **self.facts()}}
        files = save_checkpoint(self.engine, path, client, before_write)
        target = path / rank_file(rank)
        before_write(str(target))
        with write_errors_as_oserror(target):
            torch.save({name: state.state_dict() for name, state in self.per_rank.items()}, target)
        return [*files, target]

    def load(self, path: Path, rank: int) -> None:
        _, client = self.engine.load_checkpoint(str(path.parent), tag=path.name)
        if client is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {path}")
        self.train.load_state_dict(client[CLIENT_KEY])
        saved = load_own(path / rank_file(rank))
        for name, state in self.per_rank.items():
            state.load_state_dict(saved[name])


def load_own(path: Path) -> dict[str, Any]:
    """One of our per-rank files, without running any pickled code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        lines = str(err).strip().splitlines()
        reason = next((line.strip() for line in lines if "global" in line.lower()), lines[0])
        raise CheckpointError(f"{path}: not a dimsum rank file, refused to unpickle it ({reason})") from None


def client_state(step_dir: Path) -> dict[str, Any]:
    """The ``dimsum`` client state of a checkpoint, read without DeepSpeed or a process group. DeepSpeed's
    file is fully unpickled: only for a checkpoint that passed :func:`checkpoint.damage`."""
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):  # ZeRO-1/2, -3
        if (step_dir / name).is_file():
            return torch.load(step_dir / name, map_location="cpu", weights_only=False)[CLIENT_KEY]
    raise FileNotFoundError(f"{step_dir}: no DeepSpeed model-states file of rank 0")


def consolidate_ema(step_dir: Path) -> dict[str, Tensor]:
    """Full fp32 EMA tensors of every trained parameter, assembled from all ranks' shards."""
    info = client_state(step_dir)
    shapes, world = info["param_shapes"], info["world_size"]
    flat: dict[str, Tensor] = {}
    covered: dict[str, Tensor] = {}
    for rank in range(world):
        path = step_dir / rank_file(rank)
        if not path.is_file():
            raise FileNotFoundError(f"{step_dir}: EMA shard {path.name} of rank {rank}/{world} is missing")
        part = load_own(path)
        for name, fragment in part["ema"]["shadow"].items():
            numel = int(np.prod(shapes[name]))
            flat.setdefault(name, torch.zeros(numel, dtype=torch.float32))
            covered.setdefault(name, torch.zeros(numel, dtype=torch.bool))
            start = part["offsets"][name]
            flat[name][start:start + fragment.numel()] = fragment.flatten()
            covered[name][start:start + fragment.numel()] = True
    holes = [name for name, mask in covered.items() if not bool(mask.all())]
    if holes:
        raise ValueError(f"{step_dir}: EMA shards do not cover all of {holes[0]!r} ({len(holes)} tensors)")
    return {name: t.view(shapes[name]) for name, t in flat.items()}

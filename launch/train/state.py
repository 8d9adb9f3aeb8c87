"""What a checkpoint holds beyond DeepSpeed's own shards, and how it is read back.

* ``client_state["dimsum"]`` (in DeepSpeed's model-states file): global step, data position and seed,
  MLflow run id, attempt counter, world size, parameter shapes and the resolved config.
* ``dimsum-rank-NNNNN.pt``, one per rank: that rank's EMA shard (fp32 fragments of the master weights
  it owns, with their offsets) and its RNG states (python, numpy, torch, cuda). These are per-rank by
  nature; DeepSpeed saves ``client_state`` from rank 0 only, so they cannot go there.

Resuming restores all of it, which makes a killed-and-resumed run bit-identical to an uninterrupted one
(the data stream is a pure function of seed, rank, world size and position). :func:`consolidate_ema`
reassembles full fp32 EMA tensors from all rank files for export and sampling, on any machine.

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
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dimsum.ema import EMA
from launch.train.checkpoint import CheckpointError
from launch.train.deepspeed_engine import parameter_shapes, save_checkpoint, write_errors_as_oserror

CLIENT_KEY = "dimsum"


def rank_file(rank: int) -> str:
    return f"dimsum-rank-{rank:05d}.pt"


@dataclasses.dataclass
class TrainState:
    """Loop counters that must survive a restart."""

    step: int = 0
    data_position: int = 0  # micro-batches consumed by this rank's loader (dropped non-finite ones too)
    nonfinite_total: int = 0
    attempt: int = 0
    mlflow_run_id: str | None = None


def seed_everything(seed: int, rank: int) -> None:
    """Distinct streams per rank (noise, times, label dropout must differ between ranks)."""
    stream = seed * 1_000_003 + rank
    random.seed(stream)
    np.random.seed(stream % 2**32)
    torch.manual_seed(stream)


def rng_state() -> dict[str, Any]:
    """Every generator's state as tensors and plain values (loadable with ``weights_only=True``)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos,
                                                    has_gauss, gauss), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(engine: Any, path: Path, *, state: TrainState, config: dict[str, Any], ema: EMA,
         offsets: dict[str, int], rank: int, world_size: int,
         before_write: Callable[[str], None] = lambda _: None) -> list[Path]:
    """This rank's part of the checkpoint at ``path`` (the CheckpointManager's ``write`` callback);
    returns the files written."""
    client = {CLIENT_KEY: {**dataclasses.asdict(state), "world_size": world_size, "config": config,
                           "param_shapes": parameter_shapes(engine), "ema_decay": ema.decay}}
    files = save_checkpoint(engine, path, client, before_write)
    target = path / rank_file(rank)
    before_write(str(target))
    with write_errors_as_oserror(target):
        torch.save({"ema": ema.state_dict(), "offsets": offsets, "rng": rng_state()}, target)
    return [*files, target]


def load_own(path: Path) -> dict[str, Any]:
    """One of our per-rank files, without running any pickled code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        lines = str(err).strip().splitlines()
        reason = next((line.strip() for line in lines if "global" in line.lower()), lines[0])
        raise CheckpointError(f"{path}: not a dimsum rank file, refused to unpickle it ({reason})") from None


def load(engine: Any, path: Path, rank: int) -> tuple[TrainState, dict[str, Any]]:
    """Load DeepSpeed's shards and return (state, this rank's file). RNG states are NOT restored here:
    the caller does that last, after everything else that might draw random numbers."""
    _, client = engine.load_checkpoint(str(path.parent), tag=path.name)
    if client is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {path}")
    info = client[CLIENT_KEY]
    state = TrainState(**{f.name: info[f.name] for f in dataclasses.fields(TrainState)})
    return state, load_own(path / rank_file(rank))


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

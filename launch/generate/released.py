"""Read a released DiMSUM checkpoint file and convert it with :mod:`dimsum.models.dimsum.released`.

The file reading lives here, not in ``dimsum/``, so the model library has no I/O.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch

from dimsum.models.dimsum.released import from_released, resize_state_dict


def _read(path: Path) -> Any:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    # Released training checkpoints pickle their argparse.Namespace next to the weights.
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True)


def load_released(path: str | Path, which: Literal["ema", "model"] = "ema",
                  grid: int | None = None) -> dict[str, torch.Tensor]:
    """Load a released checkpoint from a LOCAL path and convert it to our names.

    Accepts the training checkpoint (a dict with "model" and "ema"; ``which`` picks one), the hub's
    single-file ``pytorch_model.bin`` / ``model.safetensors``, or a directory holding one of those.
    ``grid`` resizes the position table when the model runs at another resolution.
    """
    path = Path(path)
    if path.is_dir():
        found = [path / n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).is_file()]
        if not found:
            raise FileNotFoundError(f"{path}: no model.safetensors or pytorch_model.bin in this directory")
        path = found[0]
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    try:
        data = _read(path)
    except Exception as err:  # unpickling, safetensors and zip errors have no common base
        raise ValueError(f"{path}: not a readable checkpoint ({type(err).__name__}: {err})") from None
    if isinstance(data, Mapping) and "model" in data and "ema" in data:
        data = data[which]
    if not isinstance(data, Mapping) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ValueError(f"{path}: expected a state dict or a dict with 'model' and 'ema' state dicts")
    try:
        state_dict = from_released({k.removeprefix("module."): v for k, v in data.items()})
    except (KeyError, ValueError) as err:
        raise ValueError(f"{path}: {err}") from None
    return resize_state_dict(state_dict, grid) if grid is not None else state_dict

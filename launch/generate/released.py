"""Read a released checkpoint file (DiMSUM or LaMamba-Diff) and convert it to our key names.

The file reading lives here, not in ``dimsum/``, so the model library has no I/O. Files are unpickled with
``torch.load(weights_only=True)`` only: the released training dicts hold non-tensor entries (DiMSUM and
LaMamba-Diff an ``argparse.Namespace`` under ``args``, LaMamba-Diff a yacs ``CfgNode`` under ``config``),
so exactly those classes are allowed, the CfgNode through an OrderedDict stand-in. Anything else in the pickle
(a planted ``os.system`` call, say) is refused before it runs.
"""

from __future__ import annotations

import argparse
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file

from dimsum.models.dimsum import released as dimsum_released
from dimsum.models.lamamba import released as lamamba_released


class ReleasedConfigNode:
    """Stands in for yacs ``CfgNode`` (LaMamba-Diff's ``config`` entry, a dict subclass) while unpickling.

    torch's weights-only unpickler fills only plain dict types, so the node is created as an OrderedDict:
    its keys and values as items, yacs's bookkeeping attributes in ``__dict__``. yacs is never imported.
    """

    def __new__(cls, *args: Any) -> OrderedDict:
        return OrderedDict()


SAFE_GLOBALS = [argparse.Namespace, (ReleasedConfigNode, "yacs.config.CfgNode")]
CONVERTERS: dict[str, Callable[[Mapping[str, torch.Tensor]], dict[str, torch.Tensor]]] = {
    "dimsum": dimsum_released.from_released,
    "lamamba": lamamba_released.from_released,
}
LAMAMBA_ONLY_PREFIXES = ("layers_up.", "mid_layer.")  # the decoder and bottleneck of the released U-Net


def read_checkpoint(path: Path) -> Any:
    """The file's content (tensors, dicts, the allowed argument and config objects), without running code."""
    if path.suffix == ".safetensors":

        return load_file(path)
    with torch.serialization.safe_globals(SAFE_GLOBALS):
        return torch.load(path, map_location="cpu", weights_only=True)


def released_family(state_dict: Mapping[str, torch.Tensor]) -> str:
    """"lamamba" when the released names have LaMamba-Diff's decoder or bottleneck, else "dimsum"."""
    return "lamamba" if any(k.startswith(LAMAMBA_ONLY_PREFIXES) for k in state_dict) else "dimsum"


def read_released(path: str | Path, which: Literal["ema", "model"] = "ema") -> dict[str, torch.Tensor]:
    """The released state dict (released key names) of a LOCAL checkpoint.

    Accepts the training checkpoint (a dict with "model" and "ema"; ``which`` picks one), the hub's
    single-file ``pytorch_model.bin`` / ``model.safetensors``, or a directory holding one of those.
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
        data = read_checkpoint(path)
    except Exception as err:  # unpickling, safetensors and zip errors have no common base
        raise ValueError(f"{path}: not a readable checkpoint ({type(err).__name__}: {err})") from None
    if isinstance(data, Mapping) and "model" in data and "ema" in data:
        data = data[which]
    if not isinstance(data, Mapping) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ValueError(f"{path}: expected a state dict or a dict with 'model' and 'ema' state dicts")
    return {k.removeprefix("module."): v for k, v in data.items()}


def convert_released(state_dict: Mapping[str, torch.Tensor], family: str,
                     source: str | Path = "checkpoint") -> dict[str, torch.Tensor]:
    """Released names -> ours with the converter of ``family``; errors name ``source``."""
    if family not in CONVERTERS:
        raise ValueError(f"{source}: no released format for the model family {family!r} "
                         f"(known: {', '.join(CONVERTERS)})")
    try:
        return CONVERTERS[family](state_dict)
    except (KeyError, ValueError) as err:
        raise ValueError(f"{source}: {err}") from None


def load_released(path: str | Path, which: Literal["ema", "model"] = "ema", grid: int | None = None,
                  family: str | None = None) -> dict[str, torch.Tensor]:
    """:func:`read_released` converted to our names: ``family``'s converter (None: read off the key
    names). ``grid`` resizes DiMSUM's position table when the model runs at another resolution."""
    released = read_released(path, which)
    family = family or released_family(released)
    state_dict = convert_released(released, family, path)
    if grid is None:
        return state_dict
    if family != "dimsum":
        raise ValueError(f"{path}: only DiMSUM position tables can be resized (this is {family})")
    return dimsum_released.resize_state_dict(state_dict, grid)

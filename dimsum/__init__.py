"""DiMSUM model library: registry, models, conversion of released checkpoints, FLOPs. No I/O besides loading.

Names are imported on first use (PEP 562), so ``import dimsum.config`` (the CLI) stays instant and does
not pull in torch, pytorch-wavelets or the scan backends.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ModelConfig": "dimsum.registry",
    "REGISTRY": "dimsum.registry",
    "build_model": "dimsum.registry",
    "count_parameters": "dimsum.registry",
    "create_model": "dimsum.registry",
    "model_config": "dimsum.registry",
    "DiMSUM": "dimsum.models",
    "DiT": "dimsum.dit",
    "forward_gmacs": "dimsum.flops",
    "config_from_state_dict": "dimsum.convert",
    "from_released": "dimsum.convert",
    "load_released": "dimsum.convert",
    "released_config": "dimsum.convert",
    "resize_state_dict": "dimsum.convert",
    "to_released": "dimsum.convert",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dimsum' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])

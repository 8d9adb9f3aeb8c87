"""DiMSUM model library: registry, models, conversion of released checkpoints, FLOPs. No I/O besides loading.

Names are imported on first use (PEP 562), so ``import dimsum.config`` (the CLI) stays instant and does
not pull in torch, pytorch-wavelets or the scan backends.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ModelConfig": "dimsum.models.config",
    "REGISTRY": "dimsum.models.config",
    "build_model": "dimsum.models.config",
    "count_parameters": "dimsum.models.config",
    "create_model": "dimsum.models.config",
    "model_config": "dimsum.models.config",
    "DiMSUM": "dimsum.models.dimsum.model",
    "DiT": "dimsum.models.dit.model",
    "forward_gmacs": "dimsum.models.flops",
    "config_from_state_dict": "dimsum.models.dimsum.released",
    "from_released": "dimsum.models.dimsum.released",
    "load_released": "dimsum.models.dimsum.released",
    "released_config": "dimsum.models.dimsum.released",
    "resize_state_dict": "dimsum.models.dimsum.released",
    "to_released": "dimsum.models.dimsum.released",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dimsum' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])

"""The data component's typed config: where the latent shards are and how they stream."""

from __future__ import annotations

import dataclasses
from typing import Literal

from dimsum.config import Config


@dataclasses.dataclass
class DataConfig(Config):
    """Streaming-loader settings. ``shards`` is a directory holding ``manifest.json`` and its tar shards."""

    shards: str = "checkpoints/demo/shards"
    num_workers: int = 2
    resampled: bool = True
    on_error: Literal["raise", "skip"] = "raise"
    random_flip: bool = True

    def validate(self) -> None:
        self.check(bool(self.shards), "shards", "expected a shard directory")
        self.check(self.num_workers >= 0, "num_workers", "expected >= 0")

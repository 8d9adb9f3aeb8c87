"""The data component's typed config: where the latent shards are and how they stream."""

from __future__ import annotations

import dataclasses
from typing import Literal

from dimsum.config import Config


@dataclasses.dataclass
class DataConfig(Config):
    """Streaming-loader settings.

    ``shards``: a folder holding ``manifest.json`` and its tar shards, a WebDataset shard spec (brace
    pattern of paths or http(s) URLs, ``pipe:COMMAND``), or a file listing one spec per line; ``manifest``:
    where the manifest is when it is not next to the shards (see locations.py). Remote reads that fail are
    retried ``retries`` times, waiting ``retry_backoff_s`` and doubling; then ``on_error`` applies.

    ``streams`` is the number of independent sample streams of the whole job (see loader.py): the data
    order depends on it, not on the world size or ``num_workers``. 0 means one per worker per rank (at
    least one per rank) of the job's first start; the trainer records the number and keeps it when the
    job resumes on more or fewer ranks. A multiple of every world size you may use keeps each rank's reads
    to its own share of the data.
    """

    kind: Literal["latent_shards"] = "latent_shards"  # the TrainingData implementation (training_data.py)
    shards: str = "checkpoints/demo/shards"
    manifest: str = ""
    num_workers: int = 2
    streams: int = 0
    resampled: bool = True
    on_error: Literal["raise", "skip"] = "raise"
    random_flip: bool = True
    prefetch_factor: int = 2
    retries: int = 3
    retry_backoff_s: float = 0.5

    def validate(self) -> None:
        self.check(bool(self.shards), "shards", "expected a shard folder, shard spec or list file")
        self.check(self.retries >= 0, "retries", "expected >= 0")
        self.check(0 <= self.retry_backoff_s <= 600, "retry_backoff_s", "expected 0..600 seconds")
        self.check(self.num_workers >= 0, "num_workers", "expected >= 0")
        self.check(self.streams >= 0, "streams", "expected >= 0 (0 means one stream per worker per rank)")
        self.check(self.prefetch_factor >= 1, "prefetch_factor", "expected >= 1")

    def job_streams(self, world_size: int) -> int:
        """The job's stream count for a first start on ``world_size`` ranks (resolves the 0 default)."""
        return self.streams or max(1, self.num_workers) * world_size

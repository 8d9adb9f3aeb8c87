"""What the trainer sees of its data: the :class:`TrainingData` protocol, and the one place that picks an
implementation for ``data.kind``.

The determinism contract every implementation keeps (the trainer's bit-exact resume and its elastic
resize depend on it): the samples of global batch g (``global_batch`` samples, one optimizer step of the
whole job) are a pure function of (seed, g) and the data config, whatever the world size; rank r of M
takes positions [r * global_batch / M, (r + 1) * global_batch / M) of each as consecutive micro-batches
of ``batch_size``, so its batch k is a pure function of (seed, rank, world_size, k). ``batches(start_step)``
yields exactly the batches an uninterrupted run yields from that step on, and nothing it does touches
the global torch RNG. ``skipped`` counts bad samples replaced in the batches
yielded so far (``data.on_error=skip``); counts from a resumed run add up to the uninterrupted run's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

import torch

from data_pipeline.config import DataConfig
from data_pipeline.loader import LatentLoader


class TrainingData(Protocol):
    latent_shape: tuple[int, int, int]  # (C, H, W) of one model input
    num_classes: int  # 1: unconditional
    skipped: int
    manifest: Mapping[str, Any]  # the data set's description (``space``, ``vae``, ...) for sample grids

    def describe(self) -> str:
        """One line for the run log: where the data is and what it holds."""
        ...

    def batches(self, start_step: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Endless ``(latents float32 (B, C, H, W), labels int64 (B,))`` from batch ``start_step`` on."""
        ...


Builder = Callable[..., TrainingData]
TRAINING_DATA: dict[str, Builder] = {"latent_shards": LatentLoader}


def build_training_data(cfg: DataConfig, *, batch_size: int, seed: int, rank: int, world_size: int,
                        global_batch: int = 0) -> TrainingData:
    """The ``data.kind`` implementation for one rank (``DataConfig.kind`` lists the registered kinds);
    ``global_batch`` 0 means ``batch_size * world_size`` (no gradient accumulation)."""
    return TRAINING_DATA[cfg.kind](cfg, batch_size=batch_size, seed=seed, rank=rank, world_size=world_size,
                                   global_batch=global_batch)

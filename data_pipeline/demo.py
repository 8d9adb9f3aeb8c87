"""The CPU demo data set: scikit-learn's digits (1797 images, 10 classes) as PIXEL-space shards.

Why pixels and not latents: the demo trains on two CPU cores in minutes and no real VAE can be
downloaded here. A randomly initialised VAE would produce latents that mean nothing (decoding a sample
gives noise), so nobody could judge the demo's samples by eye. The 8x8 digits are small enough to model
directly: they are upsampled bilinearly to 16x16, scaled from 0..16 to [-1, 1] and stored as 1x16x16
"latents" (the flip variant is the mirrored image) with ``space: "pixels"``, ``vae: null`` and scaling
factor 1 in the manifest. Shard format, manifest and loader are the real ones, so the demo runs the
production data path end to end. Mirrored digits are not digits: a demo config should set
``data.random_flip: false``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from data_pipeline.locations import ShardDestination
from data_pipeline.manifest import new_manifest

SIZE = 16
SOURCE_NAME = "sklearn.datasets.load_digits"  # the manifest's source name, which marks the digits data


def digits_pixels() -> tuple[np.ndarray, np.ndarray]:
    """``(images float32 (1797, 1, 16, 16) in [-1, 1], labels int64 (1797,))`` in scikit-learn's order."""
    from sklearn.datasets import load_digits

    digits = load_digits()  # ships with scikit-learn: nothing is downloaded
    small = torch.from_numpy(digits.images.astype(np.float32) / 8.0 - 1.0).unsqueeze(1)
    images = F.interpolate(small, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    return images.numpy(), digits.target.astype(np.int64)


def build_digits_shards(out_dir: str | Path, *, seed: int = 0, shard_size: int = 500,
                        block_size: int = 64) -> dict[str, Any]:
    """Write the shuffled digits as shards plus ``manifest.json`` into ``out_dir``, a folder or a brace
    pattern / ``pipe:`` spec naming each shard's location (locations.ShardDestination); return the
    manifest."""
    out = ShardDestination.parse(str(out_dir))
    if out.folder is not None:
        out.folder.mkdir(parents=True, exist_ok=True)
    images, labels = digits_pixels()
    order = np.random.default_rng(seed).permutation(len(images))
    starts = range(0, len(order), shard_size)
    out.check_count(len(starts))
    records = []
    for index, start in enumerate(starts):
        rows = order[start:start + shard_size]
        with out.writer(index, block_size) as writer:
            writer.add(images[rows], images[rows, ..., ::-1], labels[rows], [f"digits/{i:04d}" for i in rows])
            records.append(writer.close())
    manifest = new_manifest(
        shards=records, skipped=[], latent_shape=(1, SIZE, SIZE), store="sample", num_classes=10,
        label_map={str(d): d for d in range(10)}, block_size=block_size, space="pixels", vae=None,
        scaling_factor=1.0, resolution=SIZE, shard_size=shard_size, shuffle_seed=seed,
        source={"name": SOURCE_NAME, "layout": "digits"},
    )
    out.write_manifest(manifest)
    return manifest

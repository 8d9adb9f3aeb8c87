"""The loader's global data order: what the whole job consumes does not depend on its world size, micro-batch
or worker count, a resized job continues at the next global batch, and each rank reads only its share."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.config import DataConfig
from data_pipeline.loader import LatentLoader
from data_pipeline.manifest import new_manifest, write_json_atomic
from data_pipeline.shards import ShardWriter

SHARDS, PER_SHARD, STREAMS, GLOBAL = 12, 40, 6, 12  # 6 streams own 2 shards each: 80 rows, 40 global batches


@pytest.fixture(scope="module")
def numbered(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 shards x 40 samples of shape (1, 2, 2); every value of sample i is i + 1 (its flip: -(i + 1))."""
    folder = tmp_path_factory.mktemp("numbered") / "shards"
    folder.mkdir()
    records = []
    for shard in range(SHARDS):
        ids = np.arange(PER_SHARD * shard, PER_SHARD * (shard + 1))
        latent = np.broadcast_to(ids[:, None, None, None] + 1, (PER_SHARD, 1, 2, 2)).astype(np.float32)
        with ShardWriter(folder, shard, block_size=8) as writer:
            writer.add(latent, -latent, ids % 10, [f"img{i}" for i in ids])
            records.append(writer.close())
    write_json_atomic(folder / "manifest.json", new_manifest(
        shards=records, skipped=[], latent_shape=(1, 2, 2), store="sample", num_classes=10, label_map=None,
        block_size=8, space="latents", vae="test", scaling_factor=1.0))
    return folder


def loader(folder: Path, *, rank: int, world: int, micro: int, workers: int = 0) -> LatentLoader:
    cfg = DataConfig(shards=str(folder), num_workers=workers, streams=STREAMS, resampled=False)
    return LatentLoader(cfg, batch_size=micro, seed=5, rank=rank, world_size=world, global_batch=GLOBAL)


def job_keys(folder: Path, world: int, micro: int, batches: range, workers: int = 0) -> list[int]:
    """Signed sample ids the whole job consumes in global batches ``batches``, rank by rank as the global
    batch is laid out (rank r holds positions [r * GLOBAL / world, (r + 1) * GLOBAL / world))."""
    accum = GLOBAL // (micro * world)
    per_rank = []
    for rank in range(world):
        data = loader(folder, rank=rank, world=world, micro=micro, workers=workers)
        stream = data.batches(batches.start * accum)
        rows = [x[:, 0, 0, 0] for x, _ in itertools.islice(stream, len(batches) * accum)]
        stream.close()
        per_rank.append(np.concatenate(rows).reshape(len(batches), GLOBAL // world).astype(int))
    return np.concatenate(per_rank, axis=1).flatten().tolist()


def test_the_job_consumes_the_same_samples_on_1_2_and_3_ranks_and_after_a_resize(numbered: Path) -> None:
    epoch = range(40)
    one = job_keys(numbered, world=1, micro=4, batches=epoch, workers=2)  # 3 accumulated micro-batches
    assert sorted(abs(k) for k in one) == list(range(1, SHARDS * PER_SHARD + 1))  # one epoch: each once
    assert 0.35 < np.mean([k < 0 for k in one]) < 0.65  # flips drawn per sample
    assert job_keys(numbered, world=2, micro=6, batches=epoch) == one
    # 3 ranks x 2 accumulated micro-batches of 2, with 3 workers for 2 streams per rank (one idle)
    assert job_keys(numbered, world=3, micro=2, batches=epoch, workers=3) == one
    # 2 ranks up to global batch 15, then 3 ranks from the next global batch on: nothing replayed or lost
    resized = job_keys(numbered, world=2, micro=6, batches=range(15)) + job_keys(
        numbered, world=3, micro=2, batches=range(15, 40))
    assert resized == one


@pytest.mark.parametrize("world", [2, 3, 4])
def test_each_rank_reads_its_share_plus_at_most_two_shards_per_stream(numbered: Path, world: int) -> None:
    """A rank reads the streams its slice overlaps: its share of the data when the world size divides the
    stream count (2, 3), one boundary stream more otherwise (4: ranks of 3 positions over lanes of 2), plus
    the discarded start of the pass it resumes in and one pass read ahead per stream."""
    start, batches = 7, 25
    for rank in range(world):
        data = loader(numbered, rank=rank, world=world, micro=GLOBAL // world, workers=2)
        stream = data.batches(start)
        consumed = sum(len(x) for x, _ in itertools.islice(stream, batches))
        stream.close()
        layout = data.layout
        assert consumed == batches * GLOBAL // world
        assert layout.read_share() == (GLOBAL // world if STREAMS % world == 0 else 4)
        bound = batches * layout.read_share() + 2 * PER_SHARD * len(layout.owned)
        assert consumed <= data.read <= bound, (
            f"rank {rank}/{world} read {data.read} samples for {consumed}: more than its share "
            f"{batches * layout.read_share()} + 2 shards x {len(layout.owned)} streams = {bound}")

"""LatentLoader: exact resume at any step with workers, rank splitting, bad data, shape checks, moments."""

from __future__ import annotations

import io
import itertools
import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipeline.config import DataConfig
from data_pipeline.loader import LatentLoader
from data_pipeline.manifest import new_manifest, write_json_atomic
from data_pipeline.shards import ShardError, ShardWriter, iter_blocks
from data_pipeline.training_data import build_training_data
from data_pipeline.verify import verify_shard
from tests.support.shard_helpers import declare_member_size, rewrite_block, with_array

Batches = list[tuple[torch.Tensor, torch.Tensor]]


def take(folder: Path, n: int, *, batch_size: int = 64, seed: int = 0, rank: int = 0, world_size: int = 1,
         start_step: int = 0, **cfg: object) -> tuple[Batches, LatentLoader]:
    loader = LatentLoader(DataConfig(shards=str(folder), **cfg), batch_size=batch_size, seed=seed, rank=rank,
                          world_size=world_size, start_step=start_step)
    return list(itertools.islice(loader, n)), loader


def same(a: Batches, b: Batches) -> bool:
    pairs = zip(a, b, strict=True) if len(a) == len(b) else []
    return bool(pairs) and all(torch.equal(x, u) and torch.equal(y, v) for (x, y), (u, v) in pairs)


def sample_index(folder: Path) -> dict[bytes, tuple[str, bool]]:
    """fp16 bytes of every stored latent -> (source key, is the flip)."""
    index = {}
    for shard in sorted(folder.glob("*.tar")):
        for _, members in iter_blocks(shard):
            keys = json.loads(members["keys.json"])
            for name, flipped in (("latent_flip.npy", True), ("latent.npy", False)):
                rows = np.load(io.BytesIO(members[name]))
                index.update({row.tobytes(): (k, flipped) for row, k in zip(rows, keys, strict=True)})
    return index


def identify(batches: Batches, index: dict[bytes, tuple[str, bool]]) -> list[tuple[str, bool]]:
    return [index[row.numpy().astype(np.float16).tobytes()] for x, _ in batches for row in x]


def test_batches_match_the_manifest(digits_shards: Path) -> None:
    batches, loader = take(digits_shards, 3)
    assert loader.latent_shape == (1, 16, 16) and loader.num_classes == 10
    assert loader.manifest["num_samples"] == 1797
    for x, y in batches:
        assert x.shape == (64, 1, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
        assert ((y >= 0) & (y < 10)).all() and x.abs().max() <= 1.0
    assert loader.skipped == 0


def test_deterministic_and_seeded(digits_shards: Path) -> None:
    a, _ = take(digits_shards, 12, seed=1)
    b, _ = take(digits_shards, 12, seed=1)
    c, _ = take(digits_shards, 12, seed=2)
    assert same(a, b) and not same(a, c)


def test_resume_at_any_step_with_workers(digits_shards: Path) -> None:
    """Batch k of an uninterrupted run == first batch of a run started at k, mid-pass or at pass edges."""
    reference, _ = take(digits_shards, 40, num_workers=2)
    # stream position of batch k is (k // 2) * 64: k = 8 resumes mid-pass, k = 15 straddles two passes
    for k in (1, 2, 8, 15, 31):
        resumed, _ = take(digits_shards, 40 - k, num_workers=2, start_step=k)
        assert same(resumed, reference[k:]), f"start_step={k}"
    in_main_process, _ = take(digits_shards, 40, num_workers=0, streams=2)
    assert same(in_main_process, reference)  # the stream depends on streams, not on the worker count


def test_ranks_split_shards_and_cover_each_once(digits_shards: Path) -> None:
    index = sample_index(digits_shards)
    rank0, _ = take(digits_shards, 20, batch_size=50, rank=0, world_size=2, num_workers=2, resampled=False)
    rank1, _ = take(digits_shards, 10, batch_size=50, rank=1, world_size=2, num_workers=2, resampled=False)
    seen0, seen1 = identify(rank0, index), identify(rank1, index)
    # 2 workers x 2 ranks = 4 streams, one shard each; rank 0 reads streams 0 and 1 (shards 0 and 1, 500
    # samples each, 25 rows of every batch): 20 batches of 50 are exactly one pass each
    owned = [k for s in (0, 1) for _, m in iter_blocks(digits_shards / f"shard-00000{s}.tar")
             for k in json.loads(m["keys.json"])]
    assert sorted(k for k, _ in seen0) == sorted(owned)  # every sample once, none twice
    assert not {k for k, _ in seen1} & {k for k, _ in seen0}
    flipped = sum(f for _, f in seen0)
    assert 400 < flipped < 600  # about half of the samples come out mirrored


def test_no_flip_when_disabled(digits_shards: Path) -> None:
    batches, _ = take(digits_shards, 4, random_flip=False)
    unflipped = set()
    for shard in digits_shards.glob("*.tar"):
        for _, members in iter_blocks(shard):
            unflipped |= {row.tobytes() for row in np.load(io.BytesIO(members["latent.npy"]))}
    assert all(row.numpy().astype(np.float16).tobytes() in unflipped for x, _ in batches for row in x)


def test_ranks_differ_when_resampled(digits_shards: Path) -> None:
    rank0, _ = take(digits_shards, 6, rank=0, world_size=2, num_workers=2)
    rank1, _ = take(digits_shards, 6, rank=1, world_size=2, num_workers=2)
    assert not any(torch.equal(a[0], b[0]) for a, b in zip(rank0, rank1, strict=True))


def test_more_readers_than_shards(digits_shards: Path) -> None:
    # 2 workers x 3 ranks = 6 streams by default
    with pytest.raises(ShardError, match=r"6 streams \(data.streams\) but only 4 non-empty shard\(s\)"):
        take(digits_shards, 1, world_size=3, num_workers=2, resampled=False)
    with pytest.warns(UserWarning, match=r"6 streams \(data.streams\) but only 4"):
        take(digits_shards, 1, world_size=3, num_workers=2, resampled=True)


def test_global_torch_rng_untouched(digits_shards: Path) -> None:
    state = torch.get_rng_state()
    take(digits_shards, 3, num_workers=2)
    assert torch.equal(state, torch.get_rng_state())


def test_wrong_latent_shape_never_reaches_the_model(digits_shards: Path, tmp_path: Path) -> None:
    folder = Path(shutil.copytree(digits_shards, tmp_path / "shards"))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["latent_shape"] = manifest["stored_shape"] = [1, 8, 8]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match=r"key 00000\d-00000: latent.npy has shape \(64, 1, 16, 16\); "
                                         r"expected \(64, 1, 8, 8\)"):
        take(folder, 1, num_workers=2)


def write_tiny(folder: Path, *, store: str = "sample", logvar: float = 0.0, nan_rows: tuple[int, ...] = (),
               bad_label_rows: tuple[int, ...] = ()) -> None:
    """4 shards x 40 samples of shape (1, 4, 4); sample i is filled with i (its flip with -i), label i % 10.
    Shard 2 gets NaN rows and labels out of range as asked. ``moments``: channel 0 mean, channel 1 logvar."""
    folder.mkdir(parents=True)
    records = []
    for shard in range(4):
        ids = np.arange(40 * shard, 40 * (shard + 1))
        latent = np.broadcast_to(ids[:, None, None, None], (40, 1, 4, 4)).astype(np.float32)
        if store == "moments":
            latent = np.concatenate([latent, np.full_like(latent, logvar)], axis=1)
        labels = ids % 10
        if shard == 2:
            latent[list(nan_rows), 0] = np.nan
            labels[list(bad_label_rows)] = 99
        with ShardWriter(folder, shard, block_size=8) as writer:
            flip = latent.copy()
            flip[:, 0] *= -1
            writer.add(latent, flip, labels, [f"img{i}" for i in ids])
            records.append(writer.close())
    write_json_atomic(folder / "manifest.json", new_manifest(
        shards=records, skipped=[], latent_shape=(1, 4, 4), store=store, num_classes=10, label_map=None,
        block_size=8, space="latents", vae="test", scaling_factor=0.5))


def test_bad_samples_raise_with_their_name(tmp_path: Path) -> None:
    write_tiny(tmp_path / "bad", nan_rows=(17,))
    with pytest.raises(ShardError, match=r"shard-000002.tar, key 000002-00002 sample 1 \('img97'\): non-fin"):
        take(tmp_path / "bad", 20, batch_size=8, num_workers=2, resampled=False)


def test_bad_samples_skipped_and_counted_with_workers(tmp_path: Path) -> None:
    write_tiny(tmp_path / "bad", nan_rows=(5, 17), bad_label_rows=(30,))
    # 2 streams own shards {0, 2} and {1, 3}; a pass of 40 samples is 5 batches of 8: 20 batches read each
    # shard once
    kwargs = dict(batch_size=8, resampled=False, on_error="skip", streams=2)
    batches, loader = take(tmp_path / "bad", 20, num_workers=2, **kwargs)
    assert loader.skipped == 3
    assert torch.isfinite(torch.cat([x for x, _ in batches])).all()
    assert all(((y >= 0) & (y < 10)).all() for _, y in batches)
    ids = [{int(v) for v in x.flatten(1)[:, 0].abs()} for x, _ in batches]
    assert not set().union(*ids) & {80 + 5, 80 + 17, 80 + 30}  # the bad rows never come out
    assert len(set().union(*ids)) == 160 - 3  # every good sample once; 3 duplicates top up shard 2's pass
    single, reference = take(tmp_path / "bad", 20, num_workers=0, **kwargs)
    assert same(single, batches) and reference.skipped == 3
    # shard 2's skips belong to the batch where its pass starts: counted by a run resumed there, not after
    start = next(k for k, seen in enumerate(ids) if any(80 <= v < 120 for v in seen))
    assert take(tmp_path / "bad", 20 - start, num_workers=2, start_step=start, **kwargs)[1].skipped == 3
    assert take(tmp_path / "bad", 18 - start, num_workers=2, start_step=start + 2, **kwargs)[1].skipped == 0


def test_truncated_shard_raises_or_is_skipped(tmp_path: Path) -> None:
    write_tiny(tmp_path / "cut")
    path = tmp_path / "cut" / "shard-000002.tar"
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * 0.6) // 512 * 512 + 100])  # mid-member
    kwargs = dict(batch_size=8, resampled=False, streams=2)
    with pytest.raises(ShardError, match=r"shard-000002.tar, key 000002-0000\d: truncated or corrupt tar"):
        take(tmp_path / "cut", 20, num_workers=2, **kwargs)
    entry = {"name": path.name, "samples": 40, "sha256": ""}
    readable = verify_shard(str(tmp_path / "cut" / path.name), entry, (1, 4, 4), 10)
    assert 0 < readable.samples < 40
    batches, loader = take(tmp_path / "cut", 20, num_workers=2, on_error="skip", **kwargs)
    assert loader.skipped == 40 - readable.samples and all(len(x) == 8 for x, _ in batches)


def test_moments_are_sampled_then_scaled(tmp_path: Path) -> None:
    write_tiny(tmp_path / "sharp", store="moments", logvar=-40.0)  # std 2e-9: the sample is the mean
    batches, loader = take(tmp_path / "sharp", 5, batch_size=32, num_workers=2)
    assert loader.latent_shape == (1, 4, 4)
    for x, y in batches:
        assert x.shape == (32, 1, 4, 4)
        ids = (x[:, 0, 0, 0] / 0.5).abs().round()
        assert torch.equal(ids.long() % 10, y)
        assert torch.allclose(x.abs(), 0.5 * ids[:, None, None, None].expand_as(x), atol=1e-6)

    write_tiny(tmp_path / "wide", store="moments", logvar=0.0)  # std 1: x / 0.5 - mean ~ N(0, 1)
    batches, _ = take(tmp_path / "wide", 8, batch_size=32, num_workers=2)
    again, _ = take(tmp_path / "wide", 8, batch_size=32, num_workers=2)
    assert same(batches, again)
    noise = torch.cat([x[:, 0] / 0.5 - (x[:, 0] / 0.5).mean(dim=(1, 2), keepdim=True) for x, _ in batches])
    assert 0.85 < noise.std().item() * (16 / 15) ** 0.5 < 1.15


def test_workers_survive_the_sigterm_slurm_sends_to_every_process(digits_shards: Path) -> None:
    """The trainer turns SIGTERM into a collective save; the loader's workers must keep serving until then."""
    loader = LatentLoader(DataConfig(shards=str(digits_shards), num_workers=2), batch_size=16, seed=0, rank=0,
                          world_size=1)
    stream = iter(loader)
    first = [next(stream) for _ in range(2)]
    children = Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read_text().split()
    assert len(children) >= 2
    for pid in children:
        os.kill(int(pid), signal.SIGTERM)
    rest = [next(stream) for _ in range(6)]
    stream.close()
    expected, _ = take(digits_shards, 8, batch_size=16, num_workers=2)
    assert same(first + rest, expected)


def test_checksum_is_checked_when_a_pass_opens_its_shard(tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    write_tiny(tmp_path / "flip")
    # halved values still decode and are finite: only the digest can tell
    rewrite_block(tmp_path / "flip", 2, 0, with_array("latent.npy", lambda a: a * 0.5), update_manifest=False)
    kwargs = dict(batch_size=8, resampled=False, streams=2)
    with pytest.raises(ShardError) as raised:
        take(tmp_path / "flip", 20, num_workers=2, **kwargs)
    # raised in a worker, yet the message is the error's own single line (no worker traceback folded in)
    assert str(raised.value).startswith("shard-000002.tar: sha256 ") and "\n" not in str(raised.value)
    assert "does not match the manifest's" in str(raised.value)
    batches, loader = take(tmp_path / "flip", 20, num_workers=0, on_error="skip", **kwargs)
    assert len(batches) == 20 and loader.skipped == 0  # nothing decodable was dropped
    assert "skipping bad data: shard-000002.tar: sha256" in caplog.text


def test_a_member_declaring_a_terabyte_is_a_shard_error_or_a_counted_skip(tmp_path: Path) -> None:
    write_tiny(tmp_path / "huge")
    declare_member_size(tmp_path / "huge", 2, "000002-00004.latent.npy", 2**40)  # the last of 5 blocks
    kwargs = dict(batch_size=8, resampled=False, streams=2)
    with pytest.raises(ShardError, match=r"000002-00004.latent.npy' declares 1099511627776 bytes; the file"):
        take(tmp_path / "huge", 20, num_workers=2, **kwargs)
    batches, loader = take(tmp_path / "huge", 20, num_workers=2, on_error="skip", **kwargs)
    assert loader.skipped == 8 and all(len(x) == 8 for x, _ in batches)


def test_training_data_protocol_gives_the_batches_of_any_step(digits_shards: Path) -> None:
    cfg = DataConfig(shards=str(digits_shards), num_workers=0)
    data = build_training_data(cfg, batch_size=64, seed=0, rank=0, world_size=1)
    assert isinstance(data, LatentLoader) and "1797 samples in 4 shards" in data.describe()
    assert data.latent_shape == (1, 16, 16) and data.num_classes == 10
    full = list(itertools.islice(data.batches(0), 12))
    assert same(list(itertools.islice(data.batches(9), 3)), full[9:])

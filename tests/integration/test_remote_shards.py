"""Shards read over loopback HTTP (a real ``python -m http.server``), through ``pipe:cat`` and from list
files give the local folder's batches bit for bit, resume included; failing reads are retried and then
raised or skipped per ``data.on_error``, naming the URL; ``dimsum data verify`` streams each shard once."""

from __future__ import annotations

import itertools
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from data_pipeline.config import DataConfig
from data_pipeline.loader import LatentLoader
from data_pipeline.shards import ShardError
from tests.support.http_servers import serve
from tests.support.trainer_helpers import (
    ZERO2,
    assert_same_weights,
    complete_steps,
    dimsum,
    ok,
    overrides,
    torchrun,
)

SHARDS = "shard-{000000..000003}.tar"  # the digits data set: 500, 500, 500, 297 samples
BATCHES = 20  # 10 per stream: two passes of 500 and beyond
pytestmark = pytest.mark.timeout(300)


def batches(shards: str, *, start_step: int = 0, n: int = BATCHES,
            **cfg: object) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], LatentLoader]:
    settings = {"num_workers": 2, "retry_backoff_s": 0.0, **cfg}
    loader = LatentLoader(DataConfig(shards=shards, **settings), batch_size=64, seed=3, rank=0, world_size=1,
                          start_step=start_step)
    return list(itertools.islice(loader, n)), loader


def same(a: list, b: list) -> bool:
    pairs = zip(a, b, strict=True) if len(a) == len(b) else []
    return bool(pairs) and all(torch.equal(x, u) and torch.equal(y, v) for (x, y), (u, v) in pairs)


def test_http_pipe_brace_and_list_sources_give_the_local_batches(digits_shards: Path, tmp_path: Path) -> None:
    local, _ = batches(str(digits_shards))
    resumed, _ = batches(str(digits_shards), start_step=11, n=BATCHES - 11)  # mid-pass of stream 1
    assert same(resumed, local[11:])
    with serve(digits_shards) as server:
        listing = tmp_path / "shards.txt"
        listing.write_text(f"# two shards per source\n{server.url}/shard-{{000000..000001}}.tar\n\n"
                           f"pipe:cat {digits_shards}/shard-{{000002..000003}}.tar\n")
        sources = {
            "http": (f"{server.url}/{SHARDS}", {}),  # manifest from next to the shards, over HTTP
            "pipe": (f"pipe:cat {digits_shards}/{SHARDS}", {}),
            "local brace": (f"{digits_shards}/{SHARDS}", {}),
            "list": (str(listing), {"manifest": f"{server.url}/manifest.json"}),
        }
        for source, (spec, cfg) in sources.items():
            got, loader = batches(spec, **cfg)
            assert same(got, local), source
            assert loader.manifest["num_samples"] == 1797 and loader.skipped == 0
            again, _ = batches(spec, start_step=11, n=BATCHES - 11, **cfg)  # re-opens the stream and skips
            assert same(again, local[11:]), f"{source} resumed"


def test_a_dropped_connection_is_retried_from_the_start_of_the_shard(digits_shards: Path) -> None:
    local, _ = batches(str(digits_shards), num_workers=0)
    with serve(digits_shards, drops=1) as server:
        got, loader = batches(f"{server.url}/{SHARDS}", num_workers=0, retries=1)
        assert same(got, local) and loader.skipped == 0
        fetched = [n for i in range(4) if (n := server.gets(f"shard-00000{i}.tar"))]
        assert fetched and all(n >= 2 for n in fetched)  # the dropped read, then the retry


def test_a_connection_that_keeps_dropping_raises_or_is_skipped_naming_the_url(digits_shards: Path) -> None:
    with serve(digits_shards, drops=1000) as server:
        url = f"{server.url}/{SHARDS}"
        with pytest.raises(ShardError, match=rf"{server.url}/shard-00000\d.tar: unreadable after 3 attempt"):
            batches(url, retries=2)
        got, loader = batches(url, retries=1, on_error="skip")
        assert len(got) == BATCHES and loader.skipped > 0  # the half of each shard that never arrives


def test_a_404_is_retried_then_raised_or_replaced_by_the_next_shard(digits_shards: Path,
                                                                    tmp_path: Path) -> None:
    folder = tmp_path / "shards"
    shutil.copytree(digits_shards, folder)
    (folder / "shard-000001.tar").unlink()
    local, _ = batches(str(digits_shards), num_workers=0)
    with serve(folder) as server:
        url = f"{server.url}/{SHARDS}"
        with pytest.raises(ShardError, match=rf"{server.url}/shard-000001.tar: unreadable after 2 attempt"):
            batches(url, num_workers=0, n=200, retries=1)
        got, loader = batches(url, num_workers=0, n=200, retries=1, on_error="skip")
        assert loader.skipped >= 500 and len(got) == 200
        assert not same(got[:BATCHES], local)
        assert server.gets("shard-000001.tar") >= 4  # two passes with one retry each, at least


def test_verify_streams_each_remote_shard_once_and_finds_a_changed_byte(digits_shards: Path,
                                                                        tmp_path: Path) -> None:
    folder = tmp_path / "shards"
    shutil.copytree(digits_shards, folder)
    with serve(folder) as server:
        text = ok(dimsum("data", "verify", f"{server.url}/{SHARDS}"))
        assert "4 shards, 1797 samples" in text and "OK" in text
        assert [server.gets(f"shard-00000{i}.tar") for i in range(4)] == [1, 1, 1, 1]
        data = bytearray((folder / "shard-000002.tar").read_bytes())
        data[5000] ^= 0xFF  # inside a latent: the tar still parses, only the checksum can tell
        (folder / "shard-000002.tar").write_bytes(data)
        text = ok(dimsum("data", "verify", f"pipe:curl -s -f {server.url}/{SHARDS}"), code=1)
        assert "shard-000002.tar: sha256" in text and "does not match the manifest" in text


def test_prepare_to_a_pipe_then_verify_over_http(digits_shards: Path, tmp_path: Path) -> None:
    bucket = tmp_path / "bucket"
    bucket.mkdir()
    text = ok(dimsum("prepare", "--demo", "digits", "--out", f"pipe:cat > {bucket}/{SHARDS}"))
    assert f"to pipe:cat > {bucket}/{SHARDS}" in text
    written = sorted(p.name for p in bucket.iterdir())
    assert written == ["manifest.json", *(f"shard-00000{i}.tar" for i in range(4))]
    for name in written:  # the same bytes as the folder writer's
        assert (bucket / name).read_bytes() == (digits_shards / name).read_bytes(), name
    with serve(bucket) as server:
        text = ok(dimsum("data", "verify", f"{server.url}/{SHARDS}"))
        assert "4 shards, 1797 samples" in text and "OK" in text
    two = f"pipe:cat > {tmp_path}/x-{{0..1}}.tar"
    wrong = ok(dimsum("prepare", "--demo", "digits", "--out", two), code=2)
    assert "names 2 shard location(s) but the data set has 4 shards" in wrong
    assert len(wrong.strip().splitlines()) == 1 and not list(tmp_path.glob("x-*"))


@pytest.mark.multiprocess
@pytest.mark.slow
def test_training_from_http_killed_mid_shard_and_resumed_matches_the_local_run(
        digits_shards: Path, tmp_path: Path, zero2_reference_of: Callable[[str], Path]) -> None:
    local = zero2_reference_of("dimsum-flow")  # the same settings, read from the local folder
    with serve(digits_shards) as server:
        # 2 ranks x 4 images per step: the kill at step 5 and the resume from step 4 fall inside a shard
        args = [*overrides(tmp_path, f"{server.url}/{SHARDS}", "http", workers=1, max_steps=8), *ZERO2]
        killed = torchrun(args, faults="kill@5:1")
        assert killed.returncode != 0 and complete_steps(tmp_path / "http") == [2, 4]
        assert "resumed from step-0000004" in ok(torchrun(args))
        assert server.gets("manifest.json") >= 4  # each rank of each attempt read it over HTTP
    assert_same_weights(local, tmp_path / "http")

"""``dimsum data verify``: a clean data set passes; each kind of damage is caught and located."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from data_pipeline.demo import build_digits_shards
from launch import cli
from tests.support.shard_helpers import npy, rewrite_block, set_row, with_array


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("digits") / "shards"
    build_digits_shards(folder)
    return folder


@pytest.fixture
def shards(clean: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(clean, tmp_path / "shards"))


def verify(folder: Path, capsys: pytest.CaptureFixture) -> tuple[int, str]:
    code = cli.main(["data", "verify", str(folder)])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_clean_data_set_passes(shards: Path, capsys: pytest.CaptureFixture) -> None:
    code, text = verify(shards, capsys)
    assert code == 0, text
    assert "4 shards, 1797 samples" in text and "10 classes" in text and "OK" in text


@pytest.mark.parametrize(("change", "expected"), [
    (with_array("latent.npy", lambda a: a[:, :, :8]), "latent.npy has shape (64, 1, 8, 16); expected (64,"),
    (with_array("latent_flip.npy", lambda a: a.astype(np.float32)), "latent_flip.npy has dtype float32"),
    (with_array("latent.npy", set_row(np.nan)), "sample 3 ('digits/"),
    (with_array("cls.npy", set_row(10)), "label 10 outside [0, 10)"),
    (with_array("cls.npy", set_row(-1, row=5)), "sample 5"),
    (lambda m: {k: v for k, v in m.items() if k != "keys.json"}, "members ['cls.npy', 'latent.npy',"),
    (lambda m: {**m, "cls.npy": b"garbage"}, "cls.npy is not a readable .npy array"),
    (lambda m: {**m, "cls.npy": npy(np.array([object()] * 64))}, "object dtype (pickle) is not allowed"),
], ids=["shape", "dtype", "nan", "label-high", "label-negative", "missing-member", "not-npy", "pickle"])
def test_damaged_block_is_named(shards: Path, capsys: pytest.CaptureFixture, change: Callable,
                                expected: str) -> None:
    key = rewrite_block(shards, shard=2, block=1, change=change)
    code, text = verify(shards, capsys)
    assert code == 1
    assert f"shard-000002.tar, key {key}" in text and expected in text, text
    assert "sha256" not in text  # the manifest was updated: only the intended problem shows


def test_checksum_mismatch(shards: Path, capsys: pytest.CaptureFixture) -> None:
    rewrite_block(shards, shard=1, block=0, change=with_array("latent.npy", lambda a: a * 0.5),
                  update_manifest=False)
    code, text = verify(shards, capsys)
    assert code == 1 and "shard-000001.tar: sha256" in text and "does not match" in text, text


def test_truncated_tar(shards: Path, capsys: pytest.CaptureFixture) -> None:
    path = shards / "shard-000003.tar"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2 + 100])
    code, text = verify(shards, capsys)
    assert code == 1
    assert "shard-000003.tar, key 000003-0000" in text and "truncated or corrupt tar" in text, text
    assert "the manifest says 297" in text


def test_shard_not_in_manifest_and_listed_shard_missing(shards: Path, capsys: pytest.CaptureFixture) -> None:
    shutil.copy(shards / "shard-000000.tar", shards / "shard-000004.tar")
    (shards / "shard-000001.tar").unlink()
    code, text = verify(shards, capsys)
    assert code == 1
    assert "shard-000004.tar: shard file not listed in the manifest" in text
    assert "shard-000001.tar: listed in the manifest but missing" in text


def test_bad_manifest(shards: Path, capsys: pytest.CaptureFixture) -> None:
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["num_classes"] = "ten"
    (shards / "manifest.json").write_text(json.dumps(manifest))
    code, text = verify(shards, capsys)
    assert code == 1 and "field 'num_classes' is 'ten'" in text


def test_parallel_workers_report_the_same(shards: Path, capsys: pytest.CaptureFixture) -> None:
    rewrite_block(shards, shard=0, block=2, change=with_array("latent.npy", set_row(np.inf)))
    code, text = verify(shards, capsys)
    assert cli.main(["data", "verify", str(shards), "--workers", "2"]) == code == 1
    parallel = capsys.readouterr()
    assert text.splitlines()[1:] == (parallel.out + parallel.err).splitlines()[1:]  # all but the timing line


def test_shards_are_plain_webdataset(clean: Path) -> None:
    """Other tools can stream the shards with the stock WebDataset pipeline (a sample is a block)."""
    urls = [str(p) for p in sorted(clean.glob("shard-*.tar"))]
    blocks = list(wds.WebDataset(urls, shardshuffle=False).decode())
    assert sum(len(b["cls.npy"]) for b in blocks) == 1797 and len(blocks) == 8 + 8 + 8 + 5
    first = blocks[0]
    assert first["__key__"] == "000000-00000" and first["latent.npy"].shape == (64, 1, 16, 16)
    assert first["latent_flip.npy"].dtype == np.float16 and len(first["keys.json"]) == 64

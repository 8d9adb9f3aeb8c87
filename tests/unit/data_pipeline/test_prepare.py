"""``dimsum prepare``: real photographs and digits through the tiny VAE into shards that pass ``verify``."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import lmdb
import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image
from sklearn.datasets import load_digits

from data_pipeline.manifest import read_manifest
from data_pipeline.preprocess import center_crop, to_tensor
from data_pipeline.shards import decode_block, iter_blocks
from data_pipeline.vae import load_vae
from launch import cli
from tests.support.paths import REPO

PHOTOS = {  # ImageNet-style: class folder -> {file name: scikit-image sample}
    "animals": {"chelsea.jpg": "chelsea", "cat.png": "cat"},
    "objects": {"coffee.jpg": "coffee", "rocket.png": "rocket", "coins.png": "coins", "logo.png": "logo"},
    "people": {"astronaut.jpg": "astronaut", "camera.png": "camera"},
}


def _save_photos(root: Path) -> None:
    for cls, files in PHOTOS.items():
        (root / cls).mkdir(parents=True)
        for name, sample in files.items():
            Image.fromarray(getattr(skimage.data, sample)()).save(root / cls / name)  # gray/RGBA kept as is


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """In-process runs compute exactly like the OMP_NUM_THREADS=1 subprocesses (bitwise equal shards), and
    tiny convolutions run several times faster on a shared 2-core machine without thread contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    _save_photos(root)
    return root


def prepare(*args: object) -> int:
    return cli.main(["prepare", *map(str, args), "--quiet"])


def read_samples(folder: Path) -> dict[str, tuple[np.ndarray, np.ndarray, int]]:
    """source key -> (latent, latent_flip, label) over all shards."""
    manifest = read_manifest(folder)
    out = {}
    for entry in manifest["shards"]:
        for key, members in iter_blocks(folder / entry["name"]):
            block = decode_block(entry["name"], key, members, tuple(manifest["stored_shape"]))
            for i, source_key in enumerate(block.keys):
                assert source_key not in out, f"{source_key} stored twice"
                out[source_key] = (block.latent[i], block.latent_flip[i], int(block.labels[i]))
    return out


def test_center_crop_is_adm_style() -> None:
    wide = np.zeros((400, 600, 3), dtype=np.uint8)
    wide[:, :300] = 255  # left half white: the crop keeps the centre, so the result is half white too
    out = center_crop(Image.fromarray(wide), 64)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    assert (out[:, :28] > 250).all() and (out[:, 36:] < 5).all()
    gray = center_crop(Image.fromarray(np.full((50, 30), 77, dtype=np.uint8)), 64)  # upscaled, to RGB
    assert gray.shape == (64, 64, 3) and (gray == 77).all()


def test_photos_imagenet_layout(photos: Path, tiny_vae_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    assert prepare(photos, "--out", out, "--vae", tiny_vae_dir, "--resolution", 64, "--shard-size", 3,
                   "--block-size", 2, "--batch-size", 2, "--workers", 2) == 0
    manifest = read_manifest(out)
    assert manifest["label_map"] == {"animals": 0, "objects": 1, "people": 2}
    assert manifest["num_classes"] == 3 and manifest["num_samples"] == 8 and len(manifest["shards"]) == 3
    assert manifest["latent_shape"] == [4, 32, 32] == manifest["stored_shape"]
    assert manifest["scaling_factor"] == pytest.approx(0.18215) and manifest["vae"] == str(tiny_vae_dir)
    assert manifest["resolution"] == 64 and manifest["skipped"]["count"] == 0
    assert manifest["space"] == "latents"
    samples = read_samples(out)
    assert sorted(samples) == sorted(f"{c}/{f}" for c, files in PHOTOS.items() for f in files)
    for key, (latent, flip, label) in samples.items():
        assert label == manifest["label_map"][key.split("/")[0]]
        assert latent.dtype == np.float16 and np.isfinite(latent).all() and not np.array_equal(latent, flip)
    assert cli.main(["data", "verify", str(out)]) == 0

    again = tmp_path / "again"  # same seed, fresh folder: bit-identical shards
    assert prepare(photos, "--out", again, "--vae", tiny_vae_dir, "--resolution", 64, "--shard-size", 3,
                   "--block-size", 2, "--batch-size", 2, "--workers", 0) == 0
    assert [s["sha256"] for s in read_manifest(again)["shards"]] == [s["sha256"] for s in manifest["shards"]]


def test_digits_imagenet_layout(tiny_vae_dir: Path, tmp_path: Path) -> None:
    digits = load_digits()
    for i in range(30):
        folder = tmp_path / "digits" / f"digit{digits.target[i]}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((digits.images[i] * 15).astype(np.uint8)).save(folder / f"{i:03d}.png")
    out = tmp_path / "shards"
    assert prepare(tmp_path / "digits", "--out", out, "--vae", tiny_vae_dir, "--resolution", 64,
                   "--shard-size", 16, "--workers", 0) == 0
    manifest = read_manifest(out)
    assert manifest["num_samples"] == 30 and manifest["num_classes"] == 10
    for key, (_, _, label) in read_samples(out).items():
        assert label == digits.target[int(Path(key).stem)]
    assert cli.main(["data", "verify", str(out)]) == 0


def test_flat_folder_skips_corrupt_image(photos: Path, tiny_vae_dir: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture) -> None:
    flat = tmp_path / "flat"
    flat.mkdir()
    for path in list(photos.glob("*/*"))[:3]:
        shutil.copy(path, flat / path.name)
    (flat / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    args = (flat, "--vae", tiny_vae_dir, "--resolution", 64, "--workers", 0)
    assert prepare(*args, "--out", tmp_path / "strict", "--strict") == 2
    assert f"{flat / 'broken.jpg'}: unreadable image" in capsys.readouterr().err
    assert prepare(*args, "--out", tmp_path / "out") == 0
    manifest = read_manifest(tmp_path / "out")
    assert manifest["num_samples"] == 3 and manifest["num_classes"] == 1 and manifest["label_map"] is None
    assert manifest["skipped"]["count"] == 1 and manifest["skipped"]["items"][0]["key"] == "broken.jpg"
    assert {label for *_, label in read_samples(tmp_path / "out").values()} == {0}
    assert cli.main(["data", "verify", str(tmp_path / "out")]) == 0


def test_lmdb_source(photos: Path, tiny_vae_dir: Path, tmp_path: Path) -> None:
    files = sorted(photos.glob("*/*"))[:4]
    with lmdb.open(str(tmp_path / "celeba.lmdb"), map_size=1 << 26) as env, env.begin(write=True) as txn:
        for i, path in enumerate(files):  # the CelebA-HQ converter's layout: "<size>-<index>" + "length"
            txn.put(f"64-{i:05d}".encode(), path.read_bytes())
            txn.put(f"32-{i:05d}".encode(), path.read_bytes())
        txn.put(b"length", str(len(files)).encode())
    out = tmp_path / "shards"
    assert prepare(tmp_path / "celeba.lmdb", "--lmdb-prefix", "64-", "--out", out, "--vae", tiny_vae_dir,
                   "--resolution", 64, "--workers", 2) == 0
    assert read_manifest(out)["source"]["layout"] == "lmdb"
    assert sorted(read_samples(out)) == [f"64-{i:05d}" for i in range(len(files))]
    assert cli.main(["data", "verify", str(out)]) == 0


def test_flip_latent_is_the_encoding_of_the_mirrored_image(photos: Path, tiny_vae_dir: Path,
                                                          tmp_path: Path) -> None:
    out = tmp_path / "moments"
    assert prepare(photos, "--out", out, "--vae", tiny_vae_dir, "--resolution", 64, "--store", "moments",
                   "--batch-size", 3, "--workers", 0) == 0
    assert read_manifest(out)["stored_shape"] == [8, 32, 32]
    vae = load_vae(str(tiny_vae_dir))
    for key, (latent, flip, _) in read_samples(out).items():
        pixels = center_crop(Image.open(photos / key), 64)
        for stored, image in ((latent, pixels), (flip, pixels[:, ::-1])):  # mirrored in numpy, independently
            with torch.no_grad():
                posterior = vae.encode(to_tensor(image)[None]).latent_dist
            expected = torch.cat([posterior.mean, posterior.logvar], dim=1)[0].numpy()
            np.testing.assert_allclose(stored.astype(np.float32), expected, rtol=2e-3, atol=2e-3, err_msg=key)
        assert np.abs(latent[:4].astype(np.float32) - flip[:4]).max() > 0.05  # the comparison can fail


def test_vae_problems_fail_before_any_work(photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "never"
    assert prepare(photos, "--out", out, "--vae", tmp_path / "no-such-vae") == 2
    assert "no-such-vae" in capsys.readouterr().err
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert prepare(photos, "--out", out, "--vae", "stabilityai/sd-vae-ft-ema") == 2
    err = capsys.readouterr().err
    assert "stabilityai/sd-vae-ft-ema" in err and "HF_HUB_OFFLINE" in err
    assert not out.exists()


def _cli(*args: object) -> list[str]:
    return [sys.executable, "-m", "launch.cli", "prepare", *map(str, args), "--quiet", "--workers", "0"]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_and_resume_match_one_process(photos: Path, tiny_vae_dir: Path, tmp_path: Path) -> None:
    common = (photos, "--vae", tiny_vae_dir, "--resolution", 64, "--shard-size", 2, "--block-size", 2,
              "--batch-size", 2)
    assert prepare(*common, "--out", tmp_path / "one", "--workers", 0) == 0
    reference = read_manifest(tmp_path / "one")
    assert len(reference["shards"]) == 4

    ranks = [subprocess.Popen(_cli(*common, "--out", tmp_path / "two", "--rank", r, "--world-size", 2),
                              env=_env(), cwd=REPO) for r in (0, 1)]
    assert [p.wait(timeout=300) for p in ranks] == [0, 0]
    two = read_manifest(tmp_path / "two")
    assert two["shards"] == reference["shards"]  # same samples, same bytes: sha256 of every shard equal
    assert read_samples(tmp_path / "two").keys() == read_samples(tmp_path / "one").keys()

    # Interrupted run, simulated: a finished shard deleted, a half-written temp file left behind.
    (tmp_path / "two" / "manifest.json").unlink()
    (tmp_path / "two" / "shard-000002.tar").unlink()
    (tmp_path / "two" / "shard-000002.tar.tmp").write_bytes(b"half a tar")
    assert prepare(*common, "--out", tmp_path / "two", "--workers", 0) == 0
    assert read_manifest(tmp_path / "two")["shards"] == reference["shards"]
    assert not (tmp_path / "two" / "shard-000002.tar.tmp").exists()


@pytest.mark.slow
@pytest.mark.multiprocess
def test_killed_prepare_finishes_on_rerun(photos: Path, tiny_vae_dir: Path, tmp_path: Path) -> None:
    many = tmp_path / "many"
    for copy in range(3):
        for path in photos.glob("*/*"):
            (many / path.parent.name).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, many / path.parent.name / f"{copy}-{path.name}")
    common = (many, "--vae", tiny_vae_dir, "--resolution", 64, "--shard-size", 2, "--batch-size", 1)
    proc = subprocess.Popen(_cli(*common, "--out", tmp_path / "out"), env=_env(), cwd=REPO)
    first_record = tmp_path / "out" / ".parts" / "shard-000000.tar.json"
    deadline = time.monotonic() + 240
    while not first_record.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert first_record.exists() and not (tmp_path / "out" / "manifest.json").exists(), "not killed mid-way"

    assert prepare(*common, "--out", tmp_path / "out", "--workers", 0) == 0
    manifest = read_manifest(tmp_path / "out")
    assert manifest["num_samples"] == 24 and len(read_samples(tmp_path / "out")) == 24  # no duplicates
    assert prepare(*common, "--out", tmp_path / "ref", "--workers", 0) == 0
    assert manifest["shards"] == read_manifest(tmp_path / "ref")["shards"]


def test_rerun_with_other_settings_is_refused(photos: Path, tiny_vae_dir: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    args = (photos, "--out", tmp_path / "out", "--vae", tiny_vae_dir, "--workers", 0, "--shard-size", 100)
    assert prepare(*args, "--resolution", 64) == 0
    assert prepare(*args, "--resolution", 32) == 2
    assert "resolution was 64, now 32" in capsys.readouterr().err

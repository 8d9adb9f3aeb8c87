"""FID: the Fréchet distance against closed forms and scipy, and ``dimsum eval fid`` end to end.

The real Inception weights cannot be fetched here, so the pipeline runs with a tiny TorchScript feature
network that has the same calling convention (float images in [0, 255], ``return_features=True``).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import linalg
from torch import nn

from launch.cli import main
from launch.generate.fid import INCEPTION_FILE, FeatureStats, frechet_distance
from launch.generate.images import npz_batches


def spd(dim: int, rng: np.random.Generator, rank: int | None = None) -> np.ndarray:
    a = rng.standard_normal((dim, rank or dim))
    return a @ a.T / dim


def test_frechet_distance_is_zero_for_identical_statistics() -> None:
    rng = np.random.default_rng(0)
    mu, sigma = rng.standard_normal(64), spd(64, rng)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-9 * np.trace(sigma)


def test_frechet_distance_matches_closed_form_for_diagonal_gaussians() -> None:
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.0])
    var1, var2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(var1) - np.sqrt(var2)) ** 2).sum()  # 5 + 4 + 1 + 0
    assert frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(10.0)


def test_frechet_distance_matches_scipy_sqrtm_for_full_covariances() -> None:
    rng = np.random.default_rng(1)
    mu1, mu2, sigma1, sigma2 = rng.standard_normal(32), rng.standard_normal(32), spd(32, rng), spd(32, rng)
    root = linalg.sqrtm(sigma1 @ sigma2)
    reference = ((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(root).real
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(reference, rel=1e-8)


def test_frechet_distance_handles_singular_covariances() -> None:
    rng = np.random.default_rng(2)
    sigma = spd(16, rng, rank=5)  # fewer samples than features gives exactly this
    expected = (1 + 2 - 2 * np.sqrt(2)) * np.trace(sigma)  # Σ2 = 2Σ1 commutes: tr √(Σ1Σ2) = √2 tr Σ1
    assert frechet_distance(np.zeros(16), sigma, np.zeros(16), 2 * sigma) == pytest.approx(expected, rel=1e-6)


def test_streaming_feature_stats_equal_numpy_cov() -> None:
    features = np.random.default_rng(3).standard_normal((101, 7)) + 5
    stats = FeatureStats()
    for chunk in np.array_split(features, 4):
        stats.update(chunk)
    mean, cov = stats.mean_cov()
    np.testing.assert_allclose(mean, features.mean(0), rtol=1e-12)
    np.testing.assert_allclose(cov, np.cov(features, rowvar=False), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_npz_images_stream_in_batches(tmp_path, save) -> None:
    batch = np.random.default_rng(4).integers(0, 256, (10, 8, 8, 3), dtype=np.uint8)
    save(tmp_path / "b.npz", arr_0=batch, arr_1=np.arange(10))
    parts = list(npz_batches(tmp_path / "b.npz", 4))
    assert [len(p) for p in parts] == [4, 4, 2] and np.array_equal(np.concatenate(parts), batch)


class TinyFeatures(nn.Module):
    """Stand-in for the Inception TorchScript: same inputs, 16 features (a 4x4 grey thumbnail)."""

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return F.adaptive_avg_pool2d(img.mean(dim=1, keepdim=True) / 255, 4).flatten(1)


@pytest.fixture(scope="module")
def feature_net(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("inception") / INCEPTION_FILE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(TinyFeatures()).save(str(path))
    return path


def images(seed: int, n: int = 40, brightness: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.uniform(0, 200, (n, 4, 4, 1)).repeat(4, axis=1).repeat(4, axis=2)
    return (base * brightness + rng.uniform(0, 50, (n, 16, 16, 3))).clip(0, 255).astype(np.uint8)


def features_of(batch: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(batch).permute(0, 3, 1, 2).float()
    return TinyFeatures()(x, return_features=True).double().numpy()


def run_fid(capsys, samples: Path, ref: Path, net: Path, cache: Path, *extra: str) -> dict:
    code = main(["eval", "fid", str(samples), "--ref", str(ref), "--inception", str(net),
                 "--cache-dir", str(cache), "--batch-size", "16", *extra])
    out = capsys.readouterr()
    assert code == 0, out.err
    return json.loads(out.out.strip().splitlines()[-1])


def test_eval_fid_end_to_end_with_cached_reference(feature_net, tmp_path, capsys) -> None:
    generated = images(0)
    np.savez(tmp_path / "samples.npz", arr_0=generated)
    folder = tmp_path / "ref"
    folder.mkdir()
    for i, image in enumerate(generated):
        Image.fromarray(image).save(folder / f"{i:03d}.png")
    cache = tmp_path / "cache"

    same = run_fid(capsys, tmp_path / "samples.npz", folder, feature_net, cache)
    assert abs(same["fid"]) < 1e-9 and same["num_samples"] == 40
    assert same["reference"].startswith("computed from 40 images") and len(list(cache.glob("*.npz"))) == 1
    again = run_fid(capsys, tmp_path / "samples.npz", folder, feature_net, cache)
    assert again["reference"].startswith("cache") and again["fid"] == same["fid"]

    other = images(1, brightness=0.5)
    Image.fromarray(other[0]).save(folder / "extra.png")  # a changed folder must not hit the old cache
    changed = run_fid(capsys, tmp_path / "samples.npz", folder, feature_net, cache)
    assert changed["reference"].startswith("computed from 41 images") and changed["fid"] > 0

    np.savez(tmp_path / "other.npz", arr_0=other)
    result = run_fid(capsys, tmp_path / "other.npz", tmp_path / "samples.npz", feature_net, cache)
    a, b = features_of(other), features_of(generated)
    expected = frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert expected > 0.1 and result["fid"] == pytest.approx(expected, rel=1e-6)

    np.savez(tmp_path / "stats.npz", mu=b.mean(0), sigma=np.cov(b, rowvar=False))
    precomputed = run_fid(capsys, tmp_path / "other.npz", tmp_path / "stats.npz", feature_net, cache)
    assert precomputed["reference"].startswith("precomputed")
    assert precomputed["fid"] == pytest.approx(expected)


def test_missing_or_broken_inception_weights_fail_cleanly(tmp_path, capsys) -> None:
    np.savez(tmp_path / "samples.npz", arr_0=images(0))
    args = ["eval", "fid", str(tmp_path / "samples.npz"), "--ref", str(tmp_path / "samples.npz")]
    assert main([*args, "--inception", str(tmp_path / "missing.pt")]) == 1
    err = capsys.readouterr().err
    assert INCEPTION_FILE in err and "missing.pt" in err and "DIMSUM_INCEPTION" in err
    (tmp_path / "broken.pt").write_bytes(b"not a torchscript archive")
    assert main([*args, "--inception", str(tmp_path / "broken.pt")]) == 1
    assert "broken.pt: not a TorchScript archive" in capsys.readouterr().err


def test_bad_fid_inputs_are_named(feature_net, tmp_path, capsys) -> None:
    (tmp_path / "folder").mkdir()
    assert main(["eval", "fid", str(tmp_path / "folder"), "--ref", str(tmp_path / "folder"),
                 "--inception", str(feature_net)]) == 1
    assert "--resolution" in capsys.readouterr().err
    np.savez(tmp_path / "floats.npz", arr_0=np.zeros((2, 8, 8, 3), np.float32))
    assert main(["eval", "fid", str(tmp_path / "floats.npz"), "--ref", str(tmp_path / "floats.npz"),
                 "--inception", str(feature_net), "--cache-dir", str(tmp_path / "c")]) == 1
    assert "arr_0 must be uint8" in capsys.readouterr().err

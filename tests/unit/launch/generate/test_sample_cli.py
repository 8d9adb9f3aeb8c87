"""``dimsum sample`` end to end on CPU: a tiny model exported in the export format, the tiny VAE.

The command runs DiMSUM-debug; the tests of sampling mechanics that need many network calls (batch
independence, torchrun) use an equally tiny DiT from the same registry, which is ~50x cheaper on CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from dimsum.models import model_config
from dimsum.models.dimsum.released import released_config, to_released
from launch.cli import main
from launch.generate.sample import generate
from launch.generate.weights import CONFIG_METADATA_KEY, WeightsError, instantiate, load_exported
from tests.support.paths import REPO
from tests.support.weights import export, randomised


def tiny_model(**overrides) -> torch.nn.Module:
    return randomised(model_config("DiMSUM-debug", **{"input_size": 32, "num_classes": 10, **overrides}))


@pytest.fixture(scope="module")
def latent_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export(tiny_model(), tmp_path_factory.mktemp("weights") / "tiny.safetensors")


@pytest.fixture(scope="module")
def small_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4x8x8 latents (the fewest tokens the two Haar levels allow), for tests that never decode."""
    return export(tiny_model(input_size=8), tmp_path_factory.mktemp("weights") / "small.safetensors")


@pytest.fixture(scope="module")
def dit_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = model_config("DiT-S/2", depth=2, hidden_size=64, attn_heads=4, input_size=8, num_classes=10)
    return export(randomised(cfg), tmp_path_factory.mktemp("weights") / "dit.safetensors")


@pytest.fixture(scope="module")
def pixel_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = tiny_model(input_size=16, in_channels=1, num_classes=1, label_dropout=0.0)
    return export(model, tmp_path_factory.mktemp("weights") / "pixels.safetensors")


def test_sample_writes_grid_and_adm_npz_through_the_vae(latent_weights, tiny_vae_dir, tmp_path) -> None:
    out = tmp_path / "samples"
    code = main(["sample", "--weights", str(latent_weights), "--vae", str(tiny_vae_dir), "--out", str(out),
                 "--count", "3", "--labels", "even", "--cfg-scale", "2.0", "sampler.method=euler",
                 "sampler.steps=1", "--batch-size", "3", "--npz-min", "0", "--grid", "4"])
    assert code == 0
    with np.load(out / "samples_3x64x64x3.npz") as data:
        images, labels = data["arr_0"], data["arr_1"]
    assert images.dtype == np.uint8 and images.shape == (3, 64, 64, 3)
    assert labels.dtype == np.int64 and labels.tolist() == [0, 1, 2]
    assert images.std() > 0
    grid = Image.open(out / "grid.png")
    assert grid.size == (2 * 66 + 2, 2 * 66 + 2) and grid.mode == "RGB"
    info = json.loads((out / "info.json").read_text())
    assert info["count"] == 3 and info["nfe_per_batch"] == [1] and info["files"][0] == "grid.png"


def test_generate_is_deterministic_per_sample_and_leaves_global_rng_alone(dit_weights) -> None:
    model = instantiate(*load_exported(dit_weights), str(dit_weights))
    labels = torch.tensor([3, 1, 4, 1])
    rng = torch.get_rng_state()
    whole = generate(model, labels, cfg_scale=1.5, sampler="sde", steps=3, seed=7, batch_size=4)
    assert torch.equal(torch.get_rng_state(), rng)
    split = generate(model, labels, cfg_scale=1.5, sampler="sde", steps=3, seed=7, batch_size=3)
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-5)  # batch size does not change a sample
    tail = generate(model, labels[2:], cfg_scale=1.5, sampler="sde", steps=3, seed=7)
    assert not torch.allclose(tail, whole[2:])  # sample i's noise is tied to its index, not its label
    other = generate(model, labels, cfg_scale=1.5, sampler="sde", steps=3, seed=8, batch_size=4)
    assert whole.shape == (4, 4, 8, 8) and not torch.allclose(other, whole)


def test_latents_only_and_pixel_space(small_weights, pixel_weights, tmp_path) -> None:
    out = tmp_path / "latents"
    assert main(["sample", "--weights", str(small_weights), "--vae", str(tmp_path / "no-vae-here"),
                 "--latents-only", "--out", str(out), "--labels", "7,2", "--count", "3",
                 "sampler.method=euler", "sampler.steps=1"]) == 0
    with np.load(out / "latents.npz") as data:
        assert data["latents"].dtype == np.float32 and data["latents"].shape == (3, 4, 8, 8)
        assert data["labels"].tolist() == [7, 2, 7]
    assert not (out / "grid.png").exists()
    out = tmp_path / "pixels"
    assert main(["sample", "--weights", str(pixel_weights), "--vae", "pixels", "--out", str(out),
                 "--count", "4", "sampler.method=sde", "sampler.steps=2", "--npz-min", "4"]) == 0
    with np.load(out / "samples_4x16x16x3.npz") as data:
        assert data["arr_0"].dtype == np.uint8 and data["arr_0"].shape == (4, 16, 16, 3)
        assert "arr_1" not in data  # unconditional: no labels
        assert np.array_equal(data["arr_0"][..., 0], data["arr_0"][..., 2])  # grey repeated to RGB


def test_bad_inputs_fail_with_clear_messages(latent_weights, tmp_path, capsys) -> None:
    bare = tmp_path / "bare.safetensors"
    save_file({"w": torch.zeros(2)}, bare)
    with pytest.raises(WeightsError, match=f"no {CONFIG_METADATA_KEY!r} entry"):
        load_exported(bare)
    common = ["sample", "--weights", str(latent_weights), "--out", str(tmp_path / "o"), "--count", "1"]
    assert main([*common, "--vae", "stabilityai/sd-vae-ft-ema"]) == 1
    assert "HF_HUB_OFFLINE" in capsys.readouterr().err
    assert main([*common, "--labels", "3,99", "--latents-only"]) == 1
    assert "classes 0..9" in capsys.readouterr().err
    assert main(["sample", "--weights", str(bare), "--out", str(tmp_path / "o"), "--latents-only"]) == 1
    assert "bare.safetensors" in capsys.readouterr().err
    assert main(["sample", "--run", str(tmp_path / "no-run"), "--out", str(tmp_path), "--latents-only"]) == 1
    assert "no-run: no complete checkpoint" in capsys.readouterr().err


def test_released_checkpoint_samples_like_its_export(tmp_path) -> None:
    model = randomised(released_config("DiMSUM-debug", input_size=8, num_classes=10))
    raw = randomised(model.cfg, seed=1)
    torch.save({"model": to_released(raw.state_dict()), "ema": to_released(model.state_dict())},
               tmp_path / "released.pt")
    export(model, tmp_path / "same.safetensors")
    common = ["--latents-only", "--count", "2", "--labels", "1,2", "sampler.method=euler", "sampler.steps=1"]
    outs = {}
    for name, source in {"released": ["--released", str(tmp_path / "released.pt")],
                         "raw": ["--released", str(tmp_path / "released.pt"), "--which", "raw"],
                         "export": ["--weights", str(tmp_path / "same.safetensors")]}.items():
        assert main(["sample", *source, "--out", str(tmp_path / name), *common]) == 0
        with np.load(tmp_path / name / "latents.npz") as data:
            outs[name] = data["latents"]
    np.testing.assert_array_equal(outs["released"], outs["export"])  # shapes -> config, keys converted
    assert not np.allclose(outs["raw"], outs["export"])


def test_unconditional_model_rejects_class_labels(pixel_weights, tmp_path, capsys) -> None:
    assert main(["sample", "--weights", str(pixel_weights), "--vae", "pixels", "--out", str(tmp_path),
                 "--labels", "1,2"]) == 1
    assert "is unconditional" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.multiprocess
def test_torchrun_two_ranks_match_one_process(dit_weights, tmp_path) -> None:
    args = ["--weights", str(dit_weights), "--latents-only", "--count", "5", "--labels", "random",
            "sampler.method=heun", "sampler.steps=1", "--batch-size", "2", "--cfg-scale", "3"]
    assert main(["sample", *args, "--out", str(tmp_path / "one")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "launch.cli", "sample", *args, "--out", str(tmp_path / "two")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    with np.load(tmp_path / "one" / "latents.npz") as one, np.load(tmp_path / "two" / "latents.npz") as two:
        np.testing.assert_array_equal(one["labels"], two["labels"])
        np.testing.assert_allclose(two["latents"], one["latents"], rtol=1e-5, atol=1e-5)
    info = json.loads((tmp_path / "two" / "info.json").read_text())
    assert info["world_size"] == 2 and info["nfe_per_batch"] == [2, 2, 2]  # rank 0: 2 + 1 samples, rank 1: 2
    assert not (tmp_path / "two" / "parts").exists()

"""The digits judge and its metrics: held-out accuracy, the cache and its damage, scores of real and of
broken samples, and ``dimsum eval digits`` on exported weights.

The judge is trained once per session (seconds) into a temporary cache (conftest.py ``judge_cache``); the
CI quality gate (tests/integration/test_quality_gate.py) trains a model and scores it with the same judge.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from data_pipeline.demo import digits_pixels
from dimsum.models import build_model, model_config
from launch.cli import main
from launch.generate.judge import MIN_ACCURACY, Judge, _read_cache, held_out_split, load_judge
from launch.generate.quality import digits_metrics
from launch.generate.weights import CONFIG_METADATA_KEY


@pytest.fixture(scope="module")
def judge(judge_cache: Path) -> Judge:
    return load_judge(judge_cache)


def held_out() -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = digits_pixels()
    _, rows = held_out_split(labels)
    return torch.from_numpy(images[rows]), torch.from_numpy(labels[rows])


def test_judge_is_accurate_on_held_out_digits_and_is_read_back_from_its_cache(judge_cache: Path,
                                                                             judge: Judge) -> None:
    assert judge.held_out_accuracy >= MIN_ACCURACY
    (cached,) = judge_cache.glob("judge-*.pt")
    assert judge.origin == f"cache {cached}" and cached.name == f"judge-{judge.fingerprint}.pt"
    images, labels = held_out()
    predicted, features = judge.score(images)
    assert (predicted == labels.numpy()).mean() == judge.held_out_accuracy  # the stored figure is real
    assert features.shape == (len(images), 64) and judge.real_features.shape == (1797, 64)


def test_a_damaged_or_planted_cache_file_is_never_used(judge_cache: Path, judge: Judge,
                                                       tmp_path: Path) -> None:
    (cached,) = judge_cache.glob("judge-*.pt")
    damaged = tmp_path / cached.name
    key = judge.fingerprint

    damaged.write_bytes(cached.read_bytes()[:-100])  # truncated: a crash while copying
    assert _read_cache(damaged, key).startswith("unreadable")

    payload = torch.load(cached, weights_only=True)
    payload["state_dict"]["classify.bias"] += 1.0  # altered weights, the file itself well-formed
    torch.save(payload, damaged)
    assert _read_cache(damaged, key) == "its contents do not match their digest"

    marker = tmp_path / "executed"

    class Planted:
        def __reduce__(self) -> tuple:
            return (Path.touch, (marker,))

    damaged.write_bytes(pickle.dumps({"digest": Planted()}, protocol=2))
    assert _read_cache(damaged, key).startswith("unreadable") and not marker.exists()  # weights_only

    shutil.copy(cached, damaged)
    assert _read_cache(damaged, "0123456789abcdef") == "it was made for other data or code"

    # a damaged file is replaced by a retrained judge, identical to the first (fixed seed, deterministic),
    # here trained by a caller with two threads (the session's judge by one)
    damaged.write_bytes(cached.read_bytes()[:-100])
    lines: list[str] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        fresh = load_judge(tmp_path, log=lines.append)
    finally:
        torch.set_num_threads(threads)
    assert fresh.origin == "trained" and len(lines) == 1
    assert f"ignoring the cache file {damaged}: unreadable" in lines[0] and lines[0].endswith("retraining")
    for name, tensor in judge.network.state_dict().items():
        assert torch.equal(tensor, fresh.network.state_dict()[name]), name
    assert isinstance(_read_cache(damaged, key), dict)


def fill(disk: Path) -> None:
    """Write zeros into ``disk`` until the filesystem refuses: a really full disk."""
    with open(disk / "filler", "wb") as out:
        try:
            while True:
                out.write(bytes(1 << 20))
                out.flush()
        except OSError:
            pass


def test_on_a_full_disk_the_judge_is_used_uncached_and_no_partial_file_is_left(small_disk: Path,
                                                                                judge: Judge) -> None:
    fill(small_disk)
    messages: list[str] = []
    uncached = load_judge(small_disk / "judge", log=messages.append)
    assert uncached.origin == "trained" and uncached.held_out_accuracy == judge.held_out_accuracy
    assert all(torch.equal(a, b) for a, b in zip(uncached.network.state_dict().values(),
                                                 judge.network.state_dict().values(), strict=True))
    (line,) = messages
    assert line.startswith(f"digits judge: cannot cache it as {small_disk / 'judge'}") and "uncached" in line
    assert not [p for p in small_disk.rglob("*") if p.is_file() and p.name != "filler"]

    (small_disk / "filler").unlink()  # space again: the next load caches it
    assert load_judge(small_disk / "judge", log=messages.append).origin == "trained"
    assert load_judge(small_disk / "judge", log=messages.append).origin.startswith("cache ")


def test_real_digits_score_well_and_broken_samples_do_not(judge: Judge) -> None:
    images, labels = held_out()
    real = digits_metrics(images, labels, judge)
    assert real["accuracy"] == judge.held_out_accuracy and real["fd"] < 5
    assert real["precision"] > 0.9 and real["recall"] > 0.5  # 359 samples cover less than 1797 do

    seeded = torch.Generator().manual_seed(0)
    shuffled = digits_metrics(images, labels[torch.randperm(len(labels), generator=seeded)], judge)
    assert shuffled["accuracy"] < 0.2 and shuffled["fd"] == real["fd"]  # FD ignores the labels
    noise = digits_metrics(torch.rand(images.shape, generator=seeded) * 2 - 1, None, judge)
    assert "accuracy" not in noise and noise["fd"] > 100 * real["fd"] and noise["recall"] < 0.05
    ones = images[labels == 1]  # a model that collapsed onto one class
    collapsed = digits_metrics(ones, None, judge)
    assert collapsed["recall"] < 0.2 and collapsed["fd"] > 10 * real["fd"]
    print(f"held-out real digits {real}; shuffled labels {shuffled}; noise {noise}; only ones {collapsed}")


def export_digits_model(path: Path, **overrides: object) -> Path:
    """A randomly initialised (and perturbed, so that it is not all zeros) tiny DiT in the export format."""
    cfg = model_config("DiT-S/2", depth=1, hidden_size=32, attn_heads=2, patch_size=4,
                       **{"input_size": 16, "in_channels": 1, "num_classes": 10, **overrides})
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, path, metadata={CONFIG_METADATA_KEY: json.dumps(cfg.to_dict())})
    return path


def test_eval_digits_scores_exported_weights_and_refuses_other_models(judge_cache: Path, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    weights = export_digits_model(tmp_path / "digits.safetensors")
    args = ["eval", "digits", str(weights), "sampler.steps=2", "--count", "20",
            "--cache-dir", str(judge_cache)]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["count"] == 20 and result["nfe"] == 2 and result["cfg_scale"] == 1.5
    assert result["sampler"]["method"] == "euler" and result["judge"].startswith("cache ")
    assert 0 <= result["accuracy"] <= 1 and np.isfinite(result["fd"]) and result["fd"] > 0
    assert main([*args, "--seed", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["fd"] != result["fd"]

    latents = export_digits_model(tmp_path / "latents.safetensors", in_channels=4)
    cases = [([str(latents)], "the digits judge scores 1x16x16 pixel digits (10 classes or unconditional); "
                              "DiT-S/2 makes 4x16x16 samples of 10 classes"),
             ([str(tmp_path / "absent")], f"{tmp_path / 'absent'}: no such run directory or weights file"),
             ([str(weights), "--count", "3"], "--count: got 3; expected more than 3 samples"),
             ([str(weights), "sampler.steps=0"], "sampler.steps: got 0; expected a positive integer"),
             ([str(weights), "--step", "4"], "--step: "),
             ([str(weights), "grid.count=3"], "grid: expected sampler.KEY=VALUE or objective.KEY=VALUE")]
    for extra, message in cases:
        assert main(["eval", "digits", *extra, "--cache-dir", str(judge_cache)]) == 1
        err = capsys.readouterr().err
        assert err.startswith("dimsum eval digits: ") and message in err and len(err.splitlines()) == 1, err

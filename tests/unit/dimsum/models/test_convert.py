"""Released checkpoint format: exact key names/shapes, lossless round trips, loading from local files."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dimsum.models import build_model
from dimsum.models.dimsum.released import (
    config_from_state_dict,
    from_released,
    released_config,
    released_haar_filters,
    to_released,
)
from launch.generate.released import load_released

SPEC = Path("/work/shared/spec")
RELEASED = {
    "official_keys_dim_l2_imagenet256.json": released_config("DiMSUM-L/2"),
    "official_keys_dim_l2_uncond256.json": released_config("DiMSUM-L/2", num_classes=1, label_dropout=0.0),
    "official_keys_dim_xl2_imagenet256.json": released_config("DiMSUM-XL/2"),
}
TINY = {"depth": 4, "hidden_size": 64, "fusion_heads": 4, "attn_heads": 4, "input_size": 16,
        "num_classes": 10, "label_dropout": 0.1}


def _official(name: str) -> list[tuple[str, tuple[int, ...]]]:
    path = SPEC / name
    if not path.is_file():
        pytest.skip(f"{path} is not available")
    return [(key, tuple(shape)) for key, shape in json.loads(path.read_text())]


def _tiny(**overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(released_config("DiMSUM-debug", **{**TINY, **overrides})).eval()


@pytest.mark.parametrize("name", list(RELEASED))
def test_to_released_gives_exactly_the_official_names_and_shapes(name: str) -> None:
    with torch.device("meta"):
        model = build_model(RELEASED[name])
    ours = to_released(model.state_dict())
    official = _official(name)
    assert [(k, tuple(v.shape)) for k, v in ours.items()] == official  # same names, shapes and order


@pytest.mark.parametrize("name", list(RELEASED))
def test_from_released_gives_exactly_our_names_and_shapes(name: str) -> None:
    haar = released_haar_filters()
    released = {k: haar[k.split("freq_mamba.")[1]] if ".dwt." in k or ".idwt." in k
                else torch.empty(shape, device="meta") for k, shape in _official(name)}
    with torch.device("meta"):
        model = build_model(RELEASED[name])
    ours = from_released(released)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in ours.items()} == expected


def test_round_trips_are_lossless_on_a_real_model() -> None:
    model = _tiny()
    state = model.state_dict()
    released = to_released(state)
    back = from_released(released)
    assert list(back) == list(state)
    assert all(torch.equal(back[k], state[k]) for k in state)
    again = to_released(back)
    assert list(again) == list(released) and all(torch.equal(again[k], released[k]) for k in released)
    model.load_state_dict(back, strict=True)


def test_haar_buffers_are_the_released_float32_values_accepted_but_not_demanded() -> None:
    haar = released_haar_filters()
    assert haar["dwt.w_ll"].flatten().tolist() == [0.4999999701976776] * 4
    assert haar["idwt.filters"].shape == (4, 1, 2, 2)
    released = to_released(_tiny().state_dict())
    without = {k: v for k, v in released.items() if ".dwt." not in k and ".idwt." not in k}
    assert len(released) - len(without) == 5 * 4
    assert from_released(without).keys() == from_released(released).keys()
    released["blocks.2.freq_mamba.dwt.w_hl"] = torch.full((1, 1, 2, 2), 0.5)
    with pytest.raises(ValueError, match=r"blocks\.2\.freq_mamba\.dwt\.w_hl: expected the Haar filter"):
        from_released(released)


def test_unknown_keys_fail_with_their_name() -> None:
    with pytest.raises(KeyError, match=r"blocks\.0\.spatial\.mixer_reverse\."):
        to_released(_tiny(scan_order="bi").state_dict())
    with pytest.raises(KeyError, match=r"blocks\.0\.fourier\.weight"):
        from_released({"blocks.0.fourier.weight": torch.zeros(1)})


def _save_formats(tmp_path: Path, released: dict, ema: dict) -> dict[str, Path]:
    paths = {"train": tmp_path / "ckpt.pt", "bin": tmp_path / "hub" / "pytorch_model.bin",
             "safetensors": tmp_path / "st" / "model.safetensors"}
    torch.save({"model": released, "ema": ema, "opt": {}, "args": argparse.Namespace(model="DiM-L/2")},
               paths["train"])
    for key in ("bin", "safetensors"):
        paths[key].parent.mkdir()
    torch.save(ema, paths["bin"])
    save_file({k: v.contiguous() for k, v in ema.items()}, paths["safetensors"])
    return paths


def test_load_released_reads_training_and_hub_checkpoints(tmp_path: Path) -> None:
    model = _tiny()
    released = to_released(model.state_dict())
    ema = to_released({k: v + 1 for k, v in model.state_dict().items()})
    paths = _save_formats(tmp_path, released, ema)
    expected_ema = from_released(ema)
    for path in (paths["train"], paths["bin"], paths["safetensors"], paths["bin"].parent,
                 paths["safetensors"].parent):
        loaded = load_released(path)
        assert loaded.keys() == expected_ema.keys()
        assert all(torch.equal(loaded[k], expected_ema[k]) for k in loaded), path
    raw = load_released(paths["train"], which="model")
    assert all(torch.equal(raw[k], v) for k, v in model.state_dict().items())
    with pytest.raises(FileNotFoundError, match=r"no model\.safetensors or pytorch_model\.bin"):
        load_released(tmp_path)
    (tmp_path / "junk.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"junk\.bin: not a readable checkpoint"):
        load_released(tmp_path / "junk.bin")
    torch.save({"model": {"pos_embed": 1}, "ema": {}}, tmp_path / "odd.pt")
    with pytest.raises(ValueError, match=r"odd\.pt: expected a state dict"):
        load_released(tmp_path / "odd.pt", which="model")


def test_loading_at_another_resolution_interpolates_the_positions(tmp_path: Path) -> None:
    model = _tiny()
    path = tmp_path / "pytorch_model.bin"
    torch.save(to_released(model.state_dict()), path)
    state = load_released(path, grid=16)  # trained at 16 px latents (8x8 tokens), run at 32 px (16x16)
    assert state["pos_embed"].shape == (1, 256, 64)
    cfg = config_from_state_dict(state)
    assert (cfg.input_size, cfg.depth, cfg.hidden_size, cfg.num_classes) == (32, 4, 64, 10)
    big = build_model(released_config("DiMSUM-debug", **{**TINY, "input_size": 32}))
    big.load_state_dict(state, strict=True)
    out = big.eval()(torch.randn(1, 4, 32, 32), torch.rand(1), torch.tensor([3]))
    assert out.shape == (1, 4, 32, 32) and torch.isfinite(out).all()
    # bicubic resampling of a smooth table: the corners are kept and the values stay in range
    small = model.pos_embed.reshape(8, 8, 64)
    large = state["pos_embed"].reshape(16, 16, 64)
    torch.testing.assert_close(large[0, 0], small[0, 0], atol=0.2, rtol=0)
    assert large.abs().max() <= small.abs().max() * 1.1


def test_config_from_state_dict_recognises_the_released_tables() -> None:
    uncond = from_released({k: torch.empty(s, device="meta") for k, s in
                            _official("official_keys_dim_l2_uncond256.json") if "dwt" not in k})
    cfg = config_from_state_dict(uncond)
    assert (cfg.name, cfg.num_classes, cfg.label_dropout, cfg.cond_mamba, cfg.wavelet_layout) == \
        ("DiMSUM-L/2", 1, 0.0, "released", "released")
    with pytest.raises(ValueError, match="not a DiMSUM state dict"):
        config_from_state_dict({"pos_embed": torch.zeros(1, 4, 8)})

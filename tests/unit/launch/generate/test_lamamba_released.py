"""Released LaMamba-Diff checkpoints (spec lamamba.md §13): the authors' training dict loads safely, samples.

The authors' train.py saves ``{"model", "ema", "opt", "args", "config"}`` with ``args`` an argparse.Namespace
and ``config`` a yacs CfgNode. yacs is not installed here, so the tests pickle a stand-in class that
pickles exactly like a CfgNode (a dict subclass named ``yacs.config.CfgNode`` with yacs's bookkeeping
attributes), from a fake ``yacs.config`` module that is gone again before the file is read.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import types
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from dimsum.models import build_model, model_config
from dimsum.models.lamamba.released import to_released
from launch.cli import main
from launch.generate.released import read_checkpoint
from launch.generate.weights import WeightsError, instantiate, load_released_checkpoint
from tests.support.weights import export, randomised


class CfgNode(dict):
    """Pickles as yacs 0.1.8's CfgNode does: dict items plus four attributes in ``__dict__``."""

    def __init__(self, init: dict | None = None) -> None:
        super().__init__({k: CfgNode(v) if isinstance(v, dict) else v for k, v in (init or {}).items()})
        self.__dict__.update({"__immutable__": True, "__deprecated_keys__": set(), "__renamed_keys__": {},
                              "__new_allowed__": False})


CfgNode.__module__, CfgNode.__qualname__ = "yacs.config", "CfgNode"
RELEASED_YAML = {"MODEL": {"TYPE": "vssm", "VSSM": {"EMBED_DIM": 16, "DEPTHS": [2, 2, 2, 2],
                                                    "SSM_D_STATE": 1, "DOWNSAMPLE": "v1"}},
                 "DATA": {"IMG_SIZE": 128}, "TRAIN": {"WEIGHT_DECAY": 0.05}}


def save_released(path: Path, model: torch.nn.Module, ema: torch.nn.Module, payload: object = None) -> Path:
    """The released training checkpoint of ``model``/``ema`` under the released key names."""
    yacs = types.ModuleType("yacs")
    yacs.config = types.ModuleType("yacs.config")
    yacs.config.CfgNode = CfgNode
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(torch.randn(1, 4, 16, 16), torch.tensor([5.0]), torch.tensor([1])).square().mean().backward()
    opt.step()
    checkpoint = {"model": to_released(model.state_dict()), "ema": to_released(ema.state_dict()),
                  "opt": opt.state_dict(),
                  "args": argparse.Namespace(model="LaMamba-Diff-XL", image_size=128, num_classes=10,
                                             global_seed=0, payload=payload),
                  "config": CfgNode(RELEASED_YAML)}  # train.py's order
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "yacs", yacs)
        patch.setitem(sys.modules, "yacs.config", yacs.config)
        torch.save(checkpoint, path)
    return path


@pytest.fixture(scope="module")
def released(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module, torch.nn.Module]:
    cfg = model_config("LaMamba-debug", num_classes=10)
    model, ema = randomised(cfg, seed=1), randomised(cfg, seed=2)
    return save_released(tmp_path_factory.mktemp("released") / "0050000.pt", model, ema), model, ema


def test_the_released_dict_loads_without_yacs_and_keeps_its_config(released) -> None:
    path, _, _ = released
    assert "yacs" not in sys.modules
    data = read_checkpoint(path)
    assert sorted(data) == ["args", "config", "ema", "model", "opt"]
    assert type(data["config"]) is OrderedDict and type(data["config"]["MODEL"]["VSSM"]) is OrderedDict
    assert data["config"] == RELEASED_YAML and data["config"].__dict__["__immutable__"] is True
    assert data["args"].image_size == 128 and data["opt"]["param_groups"][0]["lr"] == 1e-4


def test_released_ema_and_raw_weights_rebuild_the_models_exactly(released) -> None:
    path, model, ema = released
    x, t, y = torch.randn(2, 4, 16, 16), torch.tensor([3.0, 999.0]), torch.tensor([1, 10])
    for which, source in (("ema", ema), ("raw", model)):
        cfg, state = load_released_checkpoint(path, which, "LaMamba-debug")
        assert cfg == source.cfg
        loaded = instantiate(cfg, state, str(path))
        assert list(loaded.state_dict()) == list(source.state_dict())
        with torch.no_grad():
            assert torch.equal(loaded(x, t, y), source.eval()(x, t, y))


def test_without_model_the_names_pick_lamamba_and_its_released_size(released) -> None:
    path, _, _ = released
    with pytest.raises(WeightsError, match="LaMamba-Diff-XL has width 320 and 16 heads; the state dict has "
                                           "width 16 and 2 heads"):
        load_released_checkpoint(path)
    with pytest.raises(WeightsError, match="not a key of the released DiMSUM"):
        load_released_checkpoint(path, name="DiMSUM-debug")


def test_a_planted_pickle_in_a_released_file_never_runs(tmp_path: Path, capsys) -> None:
    cfg = model_config("LaMamba-debug", num_classes=10)
    marker = tmp_path / "pwned"

    class Planted:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    path = save_released(tmp_path / "planted.pt", build_model(cfg), build_model(cfg), payload=Planted())
    code = main(["sample", "--released", str(path), "--model", "LaMamba-debug", "--out",
                 str(tmp_path / "out"), "--latents-only", "--count", "1"])
    err = capsys.readouterr().err
    assert code == 1 and not marker.exists()
    assert err.startswith(f"dimsum sample: {path}: not a readable checkpoint") and "system" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_dimsum_sample_released_lamamba_with_the_ddpm_sampler(released, tmp_path: Path) -> None:
    path, _, ema = released
    export(ema, tmp_path / "ema.safetensors")
    # the helper's export predates objective metadata (it loads as flow), so the objective is named here;
    # released LaMamba-Diff weights pick ddpm by themselves
    common = ["--latents-only", "--count", "2", "--labels", "1,7", "--cfg-scale", "4.0",
              "sampler.method=ddpm", "sampler.steps=3", "objective.kind=ddpm"]
    outs = {}
    for name, source in {"released": ["--released", str(path), "--model", "LaMamba-debug"],
                         "export": ["--weights", str(tmp_path / "ema.safetensors")]}.items():
        assert main(["sample", *source, "--out", str(tmp_path / name), *common]) == 0
        with np.load(tmp_path / name / "latents.npz") as data:
            outs[name] = data["latents"]
        info = json.loads((tmp_path / name / "info.json").read_text())
        assert info["sampler"]["method"] == "ddpm" and info["mean_nfe"] == 3
    assert outs["released"].shape == (2, 4, 16, 16) and np.isfinite(outs["released"]).all()
    np.testing.assert_array_equal(outs["released"], outs["export"])

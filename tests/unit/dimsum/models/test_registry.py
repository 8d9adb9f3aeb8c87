"""Registry sizes: exact parameter counts (meta device) against the released checkpoints and DiT's code."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from dimsum.config import ConfigError
from dimsum.models import REGISTRY, ModelConfig, build_model, count_parameters, forward_gmacs, model_config
from launch.cli import main as cli_main


def _meta_model(name: str, **overrides):
    with torch.device("meta"):
        return build_model(model_config(name, **overrides))


@pytest.mark.parametrize(("name", "overrides", "expected"), [
    ("DiMSUM-L/2", {"num_classes": 1000, "label_dropout": 0.15}, 459_916_304),  # ImageNet-256, 1001 rows
    ("DiMSUM-L/2", {"num_classes": 1, "label_dropout": 0.0}, 458_892_304),  # unconditional, 1 row
    ("DiMSUM-XL/2", {"num_classes": 1000, "label_dropout": 0.15}, 854_831_248),
])
def test_dimsum_counts_match_the_released_checkpoints(name: str, overrides: dict, expected: int) -> None:
    assert count_parameters(model_config(name, input_size=32, **overrides)) == expected


def test_cond_proj_is_counted_and_only_the_none_mode_drops_it() -> None:
    model = _meta_model("DiMSUM-L/2")
    cond = sum(p.numel() for n, p in model.named_parameters() if ".cond_proj." in n)
    assert cond == 33_587_200  # 32 Mambas x (1024 x 1024 + 1024)
    full = count_parameters(model_config("DiMSUM-L/2"))
    assert count_parameters(model_config("DiMSUM-L/2", cond_mamba="released")) == full
    assert count_parameters(model_config("DiMSUM-L/2", cond_mamba="none")) == full - cond


def test_bi_order_adds_one_spatial_mamba_per_block() -> None:
    base, bi = (count_parameters(model_config("DiMSUM-debug", scan_order=o)) for o in ("sweep-4", "bi"))
    model = _meta_model("DiMSUM-debug")
    mamba = sum(p.numel() for p in model.blocks[0].spatial.mixer.parameters())
    assert bi - base == model.cfg.depth * mamba


def _dit_count(depth: int, D: int, patch: int = 2, out_channels: int = 4, tokens: int = 256) -> int:
    """DiT's models.py, counted by hand: embeddings, adaLN-Zero blocks (attn + 4x MLP + 6D adaLN), head."""
    embed = 4 * patch * patch * D + D + (256 * D + D + D * D + D) + 1001 * D + tokens * D
    block = (3 * D * D + 3 * D) + (D * D + D) + (4 * D * D + 4 * D) + (4 * D * D + D) + (6 * D * D + 6 * D)
    head = 2 * D * D + 2 * D + D * patch * patch * out_channels + patch * patch * out_channels
    return embed + depth * block + head


def test_dit_counts_match_dits_code_with_a_velocity_head() -> None:
    # DiT's code reports 675,129,632 for DiT-XL/2 with learn_sigma=True (8 output channels: eps and sigma).
    assert _dit_count(28, 1152, out_channels=8) == 675_129_632
    assert round(_dit_count(24, 1024, out_channels=8) / 1e6) == 458  # DiT-L/2, "458M" in the DiT paper
    # We predict the velocity (4 channels, like SiT): the final Linear loses D*4 + 4 parameters.
    assert count_parameters(model_config("DiT-XL/2")) == 675_129_632 - (1152 * 4 + 4) * 4 == 675_111_184
    assert count_parameters(model_config("DiT-L/2")) == _dit_count(24, 1024) == 458_086_416
    assert count_parameters(model_config("DiT-B/2")) == _dit_count(12, 768)
    assert count_parameters(model_config("DiT-S/2")) == _dit_count(12, 384)


def test_every_registry_entry_builds_on_meta_and_keeps_its_config() -> None:
    for name, cfg in REGISTRY.items():
        model = _meta_model(name)
        assert model.cfg == cfg
        assert all(p.device.type == "meta" for p in model.parameters())


def test_models_command_prints_the_registry_counts(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["models", "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert list(rows) == list(REGISTRY)
    for name, row in rows.items():
        assert row["params"] == count_parameters(model_config(name, input_size=32, num_classes=1000))
    assert rows["DiMSUM-L/2"]["params"] == 459_916_304
    assert abs(rows["DiT-XL/2"]["gmacs_256px"] - 118.6) < 0.6
    assert cli_main(["models"]) == 0
    table = capsys.readouterr().out
    assert "459,916,304" in table and "DiMSUM-XL/2" in table
    assert len({len(line) for line in table.splitlines()}) == 1  # columns aligned under the longest name


def test_flops_reproduce_dits_published_numbers() -> None:
    # DiT's numbers have 8 output channels; ours 4, which is 256 tokens x D x 16 fewer MACs.
    assert forward_gmacs(model_config("DiT-XL/2")) == pytest.approx(118.6 - 256 * 1152 * 16 / 1e9, rel=1e-3)
    assert forward_gmacs(model_config("DiT-L/2")) == pytest.approx(80.7 - 256 * 1024 * 16 / 1e9, rel=1e-3)
    assert 95 < forward_gmacs(model_config("DiMSUM-L/2")) < 98  # the system spec's estimate: about 96


def test_dit_flops_match_torchs_flop_counter_plus_attention() -> None:
    torch.manual_seed(0)
    cfg = model_config("DiT-S/2", depth=2, hidden_size=64, attn_heads=4, input_size=16)
    model = build_model(cfg).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(1, 4, 16, 16), torch.rand(1), torch.tensor([1]))
    tokens = cfg.grid_size**2
    attention = cfg.depth * 2 * tokens * tokens * cfg.hidden_size  # SDPA is not seen by the counter on CPU
    assert forward_gmacs(cfg) * 1e9 == pytest.approx(counter.get_total_flops() / 2 + attention, abs=0.5)


@pytest.mark.parametrize("overrides", [{}, {"cond_mamba": "released"}, {"scan_order": "bi"},
                                       {"patch_size": 4}])
def test_dimsum_flops_agree_with_the_built_modules(overrides: dict) -> None:
    """Re-derive the count from the module tree: every Linear/conv weight once per token it is applied to."""
    cfg = model_config("DiMSUM-L/2", **overrides)
    model = _meta_model("DiMSUM-L/2", **overrides)
    T, D, uses = cfg.grid_size**2, cfg.hidden_size, cfg.depth // cfg.attn_every
    macs = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            per_image = "adaLN" in name or "t_embedder" in name or "cond_proj" in name
            if "cond_proj" in name and cfg.cond_mamba != "initial_state":
                continue
            macs += module.weight.numel() * (1 if per_image else T) * (uses if "shared_attn" in name else 1)
        elif isinstance(module, torch.nn.Conv1d | torch.nn.Conv2d):
            macs += module.weight.numel() * T
    mambas = [m for m in model.modules() if type(m).__name__ == "Mamba"]
    macs += sum(T * (4 * m.d_inner * m.d_state + 2 * m.d_inner) for m in mambas)  # scan, D skip, gate
    macs += cfg.depth * (16 * T * D // 2 + 2 * 2 * T * T * D // 2) + uses * 2 * T * T * D  # Haar, attention
    assert forward_gmacs(cfg) * 1e9 == macs


def test_config_framework_imports_without_torch() -> None:
    # the CLI imports dimsum.config first; that must not pull in torch or pytorch-wavelets
    code = "import sys, dimsum.config; print('torch' in sys.modules, 'pytorch_wavelets' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_dit_learned_sigma_head_matches_dits_count() -> None:
    # an objective that asks for 8 output channels (eps and sigma) gets DiT's own learn_sigma=True model
    assert count_parameters(model_config("DiT-XL/2"), out_channels=8) == 675_129_632
    with torch.device("meta"):
        model = build_model(model_config("DiT-S/2", input_size=8), out_channels=8)
    assert model.final_layer.linear.out_features == 2 * 2 * 8


def test_an_unknown_family_is_a_config_error_not_a_default() -> None:
    expected = r"model\.family: got 'unet'; expected a registered family: dimsum, dit"
    with pytest.raises(ConfigError, match=expected):
        ModelConfig.from_dict({"name": "DiMSUM-debug", "family": "unet"}, "model")
    stray = dataclasses.replace(model_config("DiT-S/2"), family="unet")
    with pytest.raises(ConfigError, match="family: got 'unet'"):
        forward_gmacs(stray)
    with pytest.raises(ConfigError, match="family: got 'unet'"):
        build_model(stray)


def test_dit_config_has_no_dimsum_fields_but_reads_old_configs_that_list_them() -> None:
    dit = model_config("DiT-S/2")
    assert not hasattr(dit, "scan_order") and "scan_order" not in dit.to_dict()
    assert hasattr(model_config("DiMSUM-debug"), "scan_order")
    # a pre-split DiT config.yaml / export metadata lists every field, DiMSUM's at their defaults
    old = {**dit.to_dict(), "attn_every": 4, "fusion_heads": 8, "drop_path": 0.0, "scan_order": "sweep-4",
           "cond_mamba": "initial_state", "wavelet_layout": "subband", "backend": "auto"}
    assert ModelConfig.from_dict(old) == dit
    with pytest.raises(ConfigError, match=r"model\.scan_order: got 'bi'; unknown key"):
        ModelConfig.from_dict({"name": "DiT-S/2", "scan_order": "bi"}, "model")

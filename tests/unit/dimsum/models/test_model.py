"""DiMSUM and DiT on tiny shapes: wiring, conditioning modes, init, labels, determinism, bf16."""

from __future__ import annotations

import math

import pytest
import torch

from dimsum.models import create_model, model_config
from dimsum.models.dimsum.blocks import CrossAttentionFusion, FrequencyBranch, SpatialBranch
from dimsum.models.dimsum.model import DiMSUM, drop_path_rates
from dimsum.nn.layers import modulate
from dimsum.ssm.scan_orders import frequency_path, spatial_path

TINY = {"depth": 2, "hidden_size": 64, "attn_heads": 4, "input_size": 16, "num_classes": 10,
        "label_dropout": 0.1}
TINY_DIMSUM = {"attn_every": 2, "fusion_heads": 4}  # fields only the DiMSUM config has


def _tiny(name: str = "DiMSUM-debug", seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    family_fields = TINY_DIMSUM if name.startswith("DiMSUM") else {}
    return create_model(name, **{**TINY, **family_fields, **overrides})


def _inputs(batch: int = 2, size: int = 16, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, size, size, generator=g), torch.rand(batch, generator=g), torch.arange(batch)


def _wake(model: torch.nn.Module, seed: int = 2) -> None:
    """Replace the zero-initialised layers with noise, so outputs and gradients depend on everything."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and not p.any():
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


VARIANTS = [{"scan_order": o} for o in ("sweep-4", "sweep-8", "zigzag-8", "jpeg-8", "window", "bi")] + [
    {"wavelet_layout": "released"}, {"cond_mamba": "released"}, {"cond_mamba": "none"},
    {"drop_path": 0.3, "depth": 3},
    {"patch_size": 4, "input_size": 32}, {"num_classes": 1, "label_dropout": 0.0},
]


@pytest.mark.parametrize("overrides", VARIANTS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_forward_backward_reaches_every_trainable_parameter(overrides: dict) -> None:
    model = _tiny(**overrides).train()
    _wake(model)
    size = model.cfg.input_size
    x, t, y = _inputs(size=size)
    out = model(x, t, y if model.cfg.num_classes > 1 else None)
    assert out.shape == x.shape
    out.square().mean().backward()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert ".cond_proj." in name, name  # frozen only in the released conditioning mode
            continue
        if name.startswith("y_embedder"):
            continue  # only the looked-up rows get gradients
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_dit_forward_backward_and_frozen_positions() -> None:
    model = _tiny("DiT-S/2", depth=2, hidden_size=64, attn_heads=4).train()
    _wake(model)
    x, t, y = _inputs()
    model(x, t, y).square().mean().backward()
    assert not model.pos_embed.requires_grad and model.pos_embed.grad is None
    trained = [p for n, p in model.named_parameters() if p.requires_grad and "y_embedder" not in n]
    assert all(p.grad is not None for p in trained)


@pytest.mark.parametrize("name", ["DiMSUM-debug", "DiT-S/2"])
def test_initial_output_is_zero_and_null_label_is_exposed(name: str) -> None:
    model = _tiny(name, **({"hidden_size": 64, "attn_heads": 4, "depth": 2} if "DiT" in name else {})).eval()
    x, t, y = _inputs()
    assert torch.equal(model(x, t, y), torch.zeros_like(x))
    assert model.null_label == 10
    assert _tiny(name, num_classes=1, label_dropout=0.0, **({"hidden_size": 64, "attn_heads": 4}
                                                            if "DiT" in name else {})).null_label is None


def test_partial_zero_init_and_mamba_out_proj_scaling() -> None:
    model = _tiny(depth=4)
    for block in model.blocks:
        assert not block.ffn_adaLN[1].weight.any() and not block.ffn_adaLN[1].bias.any()
        for branch in (block.spatial, block.freq):
            assert branch.adaLN_modulation[1].weight.any() and not branch.adaLN_modulation[1].bias.any()
            assert branch.mixer.dt_proj.bias.any()
            w = branch.mixer.out_proj.weight
            bound = 1 / math.sqrt(w.shape[1]) / math.sqrt(4)  # kaiming-uniform(a=sqrt 5) / sqrt(depth)
            assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    assert model.shared_attn.adaLN_modulation[1].weight.any()
    assert not model.shared_attn.adaLN_modulation[1].bias.any()
    assert not model.final_layer.linear.weight.any()
    assert not model.final_layer.adaLN_modulation[1].weight.any()
    assert model.pos_embed.requires_grad


def test_drop_path_rates_are_shifted_one_block_later() -> None:
    assert drop_path_rates(0.1, 4) == pytest.approx([0.0, 0.0, 0.1 / 3, 0.2 / 3])
    model = _tiny(drop_path=0.1, depth=4)
    assert [b.drop_path.p for b in model.blocks] == pytest.approx([0.0, 0.0, 0.1 / 3, 0.2 / 3])


def test_shared_block_is_one_module_applied_every_attn_every_blocks() -> None:
    model = _tiny(depth=6, attn_every=2).eval()
    calls = []
    model.shared_attn.register_forward_hook(lambda *_: calls.append(1))
    model(*_inputs())
    assert len(calls) == 3
    assert sum(1 for m in model.modules() if type(m).__name__ == "TransformerBlock") == 1


@pytest.mark.parametrize("block", [0, 1, 2, 3])
def test_spatial_branch_runs_the_mamba_in_its_scan_order(block: int) -> None:
    cfg = model_config("DiMSUM-debug", **TINY, **TINY_DIMSUM)
    torch.manual_seed(0)
    branch = SpatialBranch(cfg, block)
    h, c = torch.randn(2, 64, 32), torch.randn(2, 64)
    shift, scale, gate = branch.adaLN_modulation(c).chunk(3, dim=-1)
    path = torch.from_numpy(spatial_path("sweep-4", block, 8))
    seq = modulate(h, shift, scale)[:, path]
    expected = torch.empty_like(h)
    expected[:, path] = branch.mixer(seq, c)
    torch.testing.assert_close(branch(h, c), h + gate.unsqueeze(1) * expected)


def test_frequency_branch_mixes_window_scanned_wavelet_tokens() -> None:
    cfg = model_config("DiMSUM-debug", **TINY, **TINY_DIMSUM)
    torch.manual_seed(0)
    branch = FrequencyBranch(cfg, block=1)
    h, c = torch.randn(2, 64, 32), torch.randn(2, 64)
    shift, scale, gate = branch.adaLN_modulation(c).chunk(3, dim=-1)
    tokens = branch.wavelet(h)
    path = torch.from_numpy(frequency_path(1, 8))
    mixed = torch.empty_like(tokens)
    mixed[:, path] = branch.mixer(modulate(tokens, shift, scale)[:, path], c)
    torch.testing.assert_close(branch(h, c), branch.wavelet.inverse(tokens + gate.unsqueeze(1) * mixed))


def test_fusion_queries_are_swapped() -> None:
    torch.manual_seed(0)
    fusion = CrossAttentionFusion(16, heads=2)
    with torch.no_grad():
        fusion.out.weight.copy_(torch.eye(16))
        fusion.out.bias.zero_()
    varied, same = torch.randn(1, 5, 8), torch.randn(1, 1, 8).expand(1, 5, 8)  # one token repeated 5 times
    # A query that reads identical tokens gets their value whatever it asks: spatial queries read the
    # frequency values (first half of the output) and frequency queries the spatial values (second half).
    out = fusion(varied, same)
    torch.testing.assert_close(out[..., :8], fusion.qkv_freq(same)[..., 16:])
    out = fusion(same, varied)
    torch.testing.assert_close(out[..., 8:], fusion.qkv_spatial(same)[..., 16:])
    assert not torch.allclose(out[..., :8], fusion.qkv_freq(varied)[..., 16:], atol=1e-3)


def test_released_cond_proj_is_inert_and_initial_state_cond_proj_is_live() -> None:
    x, t, y = _inputs()
    for mode, inert in (("released", True), ("initial_state", False)):
        model = _tiny(cond_mamba=mode).eval()
        _wake(model)
        before = model(x, t, y)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".cond_proj." in name:
                    p.add_(torch.randn_like(p))
        after = model(x, t, y)
        assert torch.equal(before, after) == inert, mode
        cond = [p for n, p in model.named_parameters() if ".cond_proj." in n]
        assert all(p.requires_grad != inert for p in cond)
        if not inert:
            after.square().mean().backward()
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in cond)


def test_label_dropout_uses_the_default_generator_and_the_null_row() -> None:
    model = _tiny(label_dropout=0.5).train()
    _wake(model)
    x, t, y = _inputs(batch=8)
    torch.manual_seed(123)
    trained = model(x, t, y)
    torch.manual_seed(123)
    dropped = torch.where(torch.rand(8) < 0.5, model.null_label, y)
    assert 0 < (dropped == model.null_label).sum() < 8
    torch.testing.assert_close(trained, model.eval()(x, t, dropped))


def test_y_none_selects_the_unconditional_or_null_row() -> None:
    x, t, _ = _inputs()
    uncond = _tiny(num_classes=1, label_dropout=0.0).eval()
    _wake(uncond)
    torch.testing.assert_close(uncond(x, t, None), uncond(x, t, torch.zeros(2, dtype=torch.long)))
    cond = _tiny().eval()
    _wake(cond)
    torch.testing.assert_close(cond(x, t, None), cond(x, t, torch.full((2,), cond.null_label)))
    with pytest.raises(ValueError, match="needs a null label row"):
        _tiny(label_dropout=0.0)(x, t, None)


def test_same_seed_same_model_and_output() -> None:
    a, b = _tiny(seed=7), _tiny(seed=7)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    _wake(a), _wake(b)
    x, t, y = _inputs()
    assert torch.equal(a.eval()(x, t, y), b.eval()(x, t, y))
    assert not torch.equal(_tiny(seed=8).blocks[0].fusion.out.weight, a.blocks[0].fusion.out.weight)


@pytest.mark.parametrize("name", ["DiMSUM-debug", "DiT-S/2"])
def test_bf16_autocast_forward_runs(name: str) -> None:
    model = _tiny(name, **({"hidden_size": 64, "attn_heads": 4, "depth": 2} if "DiT" in name else {})).eval()
    _wake(model)
    x, t, y = _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, y)
    assert out.shape == x.shape and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), model(x, t, y), rtol=0.1, atol=0.1)


def test_wrong_input_shape_fails_with_the_expected_shape() -> None:
    with pytest.raises(ValueError, match=r"expected x of shape \(B, 4, 16, 16\), got \(2, 4, 32, 32\)"):
        _tiny()(torch.randn(2, 4, 32, 32), torch.rand(2), torch.arange(2))


def test_build_rejects_the_wrong_family() -> None:
    with pytest.raises(ValueError, match="needs family='dimsum'"):
        DiMSUM(model_config("DiT-S/2"), out_channels=4)

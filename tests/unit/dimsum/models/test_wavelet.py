"""Two-level Haar packet: exact inverse, orthonormality, the released filters, and both token layouts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dimsum.models.dimsum.released import released_haar_filters
from dimsum.models.dimsum.wavelet import (
    LAYOUTS,
    HaarPacketTokens,
    bands_to_tokens,
    haar_packet,
    tokens_to_bands,
)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("n", [4, 8, 16])
def test_forward_then_inverse_is_identity(layout: str, n: int) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, n * n, 32)
    packet = HaarPacketTokens(layout)
    coeffs = packet(x)
    assert coeffs.shape == x.shape
    torch.testing.assert_close(packet.inverse(coeffs), x, rtol=0, atol=2e-6)
    # orthonormal up to the released 1/4: the energy is exactly 1/16 of the input's
    torch.testing.assert_close(coeffs.pow(2).sum() * 16, x.pow(2).sum(), rtol=1e-5, atol=0)


def test_constant_map_has_only_the_lowest_subband() -> None:
    bands = haar_packet(torch.full((1, 3, 8, 8), 2.5))
    torch.testing.assert_close(bands[:, 0], torch.full((1, 3, 2, 2), 2.5))
    assert bands[:, 1:].abs().max() < 1e-6


def _released_level(x: torch.Tensor) -> torch.Tensor:
    """The released DWT_2D: grouped stride-2 convolutions, output channels [LL, LH, HL, HH] (band slowest)."""
    f = released_haar_filters()
    C = x.shape[1]
    return torch.cat([F.conv2d(x, f[f"dwt.w_{b}"].expand(C, 1, 2, 2), stride=2, groups=C)
                      for b in ("ll", "lh", "hl", "hh")], dim=1)


def test_packet_equals_the_released_filters_band_order_and_signs() -> None:
    torch.manual_seed(1)
    x = torch.randn(2, 5, 16, 16)
    level2 = _released_level(_released_level(x))  # channel = (level2 * 4 + level1) * C + c
    B, _, h, w = level2.shape
    expected = level2.reshape(B, 4, 4, 5, h, w).transpose(1, 2).reshape(B, 16, 5, h, w) / 4
    torch.testing.assert_close(haar_packet(x), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts_are_permutations_with_inverses(layout: str) -> None:
    bands = torch.arange(2 * 16 * 32 * 4 * 4, dtype=torch.float64).reshape(2, 16, 32, 4, 4)
    tokens = bands_to_tokens(bands, layout)
    assert tokens.shape == (2, 256, 32)
    assert torch.equal(tokens.flatten().sort().values, bands.flatten())
    assert torch.equal(tokens_to_bands(tokens, layout, 4), bands)


def test_subband_layout_puts_one_subband_in_each_window() -> None:
    C, h = 3, 2
    bands = torch.randn(1, 16, C, h, h)
    grid = bands_to_tokens(bands, "subband").reshape(4 * h, 4 * h, C)
    for s in range(16):
        r, c = divmod(s, 4)
        window = grid[r * h:(r + 1) * h, c * h:(c + 1) * h]  # (i, j, C)
        assert torch.equal(window.permute(2, 0, 1), bands[0, s])


def test_released_layout_gives_each_token_all_subbands_of_channels_congruent_mod_16() -> None:
    C, h = 32, 2
    value = torch.arange(16 * C, dtype=torch.float64).reshape(16, C)  # encodes (subband, channel)
    bands = value[None, :, :, None, None].expand(1, 16, C, h, h)
    grid = bands_to_tokens(bands, "released").reshape(4 * h, 4 * h, C)
    for p1 in range(4):
        for p2 in range(4):
            token = grid[4 + p1, 4 + p2]  # low-resolution location (1, 1), position (p1, p2) in its 4x4 block
            subband, channel = token.long() // C, token.long() % C
            assert set(channel.tolist()) == {c for c in range(C) if c % 16 == 4 * p1 + p2}
            assert subband.tolist() == sorted(subband.tolist())  # subband-major features
            assert set(subband.tolist()) == set(range(16))


def test_bf16_autocast_runs_the_transform_in_fp32() -> None:
    x = torch.randn(1, 64, 8, dtype=torch.bfloat16)
    packet = HaarPacketTokens("subband")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = packet.inverse(packet(x))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, x, rtol=1e-2, atol=1e-2)


def test_bad_inputs_fail_clearly() -> None:
    with pytest.raises(ValueError, match="expected one of subband, released"):
        HaarPacketTokens("channels")
    with pytest.raises(ValueError, match="36 tokens do not form a square grid"):
        HaarPacketTokens()(torch.randn(1, 36, 4))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_inverse_is_exact_to_fp32_on_gpu_with_tf32_allowed_around_it() -> None:
    """cuDNN may use TF32 for fp32 convolutions (PyTorch's default); the transform must not."""
    torch.backends.cudnn.conv.fp32_precision = "tf32"
    x = torch.randn(4, 32 * 32, 64, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    packet = HaarPacketTokens("subband")
    coeffs = packet(x)
    torch.testing.assert_close(packet.inverse(coeffs), x, rtol=0, atol=2e-6)
    reference = HaarPacketTokens("subband")(x.double().cpu())
    torch.testing.assert_close(coeffs.double().cpu(), reference, rtol=0, atol=1e-6)
    assert torch.backends.cudnn.conv.fp32_precision == "tf32"  # restored after the transform

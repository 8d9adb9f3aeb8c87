"""The fp32 EMA against sequential references; sharding it (as under ZeRO) changes nothing."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import Tensor

from dimsum.ema import EMA


def trajectory(steps: int, shapes: dict[str, tuple[int, ...]], seed: int = 0) -> list[dict[str, Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [{n: torch.randn(s, generator=gen) for n, s in shapes.items()} for _ in range(steps)]


SHAPES = {"w": (5, 7), "b": (7,), "scalar": ()}


def test_matches_the_float64_recurrence() -> None:
    weights = trajectory(50, SHAPES)
    ema = EMA(weights[0], decay=0.9)
    ref = {n: t.double() for n, t in weights[0].items()}
    for w in weights[1:]:
        ema.update(w)
        ref = {n: 0.9 * ref[n] + 0.1 * w[n].double() for n in ref}
    assert ema.num_updates == 49
    for n in ref:
        assert ema.shadow[n].dtype == torch.float32
        torch.testing.assert_close(ema.shadow[n].double(), ref[n], rtol=0, atol=1e-6)


def test_is_kept_in_fp32_from_bf16_sources_and_copies_on_init() -> None:
    w = {"w": torch.randn(4, 4)}
    ema = EMA({"w": w["w"].bfloat16()}, decay=0.5)
    assert ema.shadow["w"].dtype == torch.float32
    w["w"].zero_()
    assert ema.shadow["w"].abs().sum() > 0  # a copy, not a view of the model


def test_decay_zero_tracks_the_source_exactly() -> None:
    weights = trajectory(3, SHAPES)
    ema = EMA(weights[0], decay=0.0)
    ema.update(weights[2])
    assert all(torch.equal(ema.shadow[n], weights[2][n]) for n in SHAPES)


def test_sharded_ema_equals_the_full_one_bit_for_bit() -> None:
    """ZeRO hands the EMA uneven 1-D fragments of each flattened weight; the result must not depend on it."""
    weights = trajectory(20, {"w": (6, 11)})
    cuts = [0, 13, 14, 40, 66]
    def frag(w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {f"w[{a}:{b}]": w["w"].flatten()[a:b] for a, b in itertools.pairwise(cuts)}

    full, sharded = EMA(weights[0], 0.99), EMA(frag(weights[0]), 0.99)
    for w in weights[1:]:
        full.update(w)
        sharded.update(frag(w))
    assembled = torch.cat([sharded.shadow[k] for k in frag(weights[0])]).view(6, 11)
    assert torch.equal(assembled, full.shadow["w"])


def test_follows_views_that_an_optimizer_updates_in_place() -> None:
    flat = torch.zeros(10)
    views = {"a": flat[:4], "b": flat[4:]}
    ema = EMA(views, decay=0.5)
    flat.add_(2.0)  # the optimizer step writes into the flat buffer
    ema.update(views)
    assert torch.equal(ema.shadow["a"], torch.ones(4)) and torch.equal(ema.shadow["b"], torch.ones(6))


def test_state_dict_round_trip_and_mismatches_are_named() -> None:
    weights = trajectory(4, SHAPES)
    ema = EMA(weights[0], 0.9)
    for w in weights[1:]:
        ema.update(w)
    restored = EMA(trajectory(1, SHAPES, seed=1)[0], 0.9)
    restored.load_state_dict(ema.state_dict())
    assert restored.num_updates == 3 and all(torch.equal(restored.shadow[n], ema.shadow[n]) for n in SHAPES)

    with pytest.raises(KeyError, match="'scalar' is missing from the checkpoint"):
        partial = {"w": ema.shadow["w"], "b": ema.shadow["b"]}
        EMA(weights[0]).load_state_dict({**ema.state_dict(), "shadow": partial})
    bad = {**ema.state_dict(), "shadow": {**ema.shadow, "b": torch.zeros(8)}}
    with pytest.raises(ValueError, match=r"'b' has shape \(8,\), expected \(7,\)"):
        EMA(weights[0]).load_state_dict(bad)
    with pytest.raises(KeyError, match="names differ"):
        ema.update({"w": weights[0]["w"]})
    with pytest.raises(ValueError, match="decay"):
        EMA(weights[0], decay=1.0)

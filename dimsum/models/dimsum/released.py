"""Released DiMSUM checkpoints <-> our state dicts (spec §6); ``launch.generate.released`` reads the files.

Our module names say what the released ones abbreviate (``fusion.qkv_spatial`` for ``proj.qkv1``, ...);
everything else is named as released. Every key must match a known prefix, so a state dict of another
architecture (e.g. the "bi" scan order's second Mamba) fails loudly instead of converting silently.

The released state dicts also carry five constant Haar filters per block (``freq_mamba.dwt.w_*``,
``freq_mamba.idwt.filters``). :func:`from_released` checks and drops them (they may be absent);
:func:`to_released` writes them back with the released float32 values.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import torch

from dimsum.models.config import REGISTRY, ModelConfig, model_config
from dimsum.nn.embeddings import resize_pos_embed

# (ours, released) prefixes. Top-level keys, then keys inside ``blocks.<k>.``.
_TOP = (
    ("pos_embed", "pos_embed"),
    ("x_embedder.proj.", "x_embedder.proj."),
    ("t_embedder.mlp.0.", "t_embedder.mlp.0."),
    ("t_embedder.mlp.2.", "t_embedder.mlp.2."),
    ("y_embedder.embedding_table.", "y_embedder.embedding_table."),
    ("shared_attn.attn.", "attn_block.attn."),
    ("shared_attn.mlp.", "attn_block.mlp."),
    ("shared_attn.adaLN_modulation.1.", "attn_block.adaLN_modulation.1."),
    ("final_layer.linear.", "final_layer.linear."),
    ("final_layer.adaLN_modulation.1.", "final_layer.adaLN_modulation.1."),
)
_BLOCK = (
    ("norm.", "norm."),
    ("spatial.mixer.", "spatial_mamba.mixer."),
    ("spatial.adaLN_modulation.1.", "spatial_mamba.adaLN_modulation.1."),
    ("freq.mixer.", "freq_mamba.mixer."),
    ("freq.adaLN_modulation.1.", "freq_mamba.adaLN_modulation.1."),
    ("fusion.qkv_spatial.", "proj.qkv1."),
    ("fusion.qkv_freq.", "proj.qkv2."),
    ("fusion.out.", "proj.proj."),
    ("ffn_norm.", "norm_2."),
    ("ffn_adaLN.1.", "adaLN_modulation.1."),
    ("mlp.", "mlp."),
)
_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.(.*)")
_WAVELET_BUFFER = re.compile(r"blocks\.(\d+)\.freq_mamba\.(dwt\.w_(?:ll|lh|hl|hh)|idwt\.filters)")


def _rename(key: str, to_released: bool) -> str:
    src, dst = (0, 1) if to_released else (1, 0)
    match = _BLOCK_KEY.fullmatch(key)
    prefix, rest, table = (f"blocks.{match[1]}.", match[2], _BLOCK) if match else ("", key, _TOP)
    for pair in table:
        if rest.startswith(pair[src]):
            return prefix + pair[dst] + rest[len(pair[src]):]
    side = "our" if to_released else "released"
    raise KeyError(f"{key!r} is not a key of the {side} DiMSUM format (no released equivalent)")


def released_haar_filters() -> dict[str, torch.Tensor]:
    """The released Haar buffers: products of float32(1/sqrt 2), i.e. 0.4999999701976776, not 0.5."""
    a = torch.tensor(1 / math.sqrt(2), dtype=torch.float32)
    lo, hi = torch.stack([a, a]), torch.stack([a, -a])
    ll, lh, hl, hh = (torch.outer(r, c) for r, c in ((lo, lo), (hi, lo), (lo, hi), (hi, hi)))
    dwt = {f"dwt.w_{n}": w.reshape(1, 1, 2, 2)
           for n, w in zip(("ll", "lh", "hl", "hh"), (ll, lh, hl, hh), strict=True)}
    return {**dwt, "idwt.filters": torch.stack([ll, lh, hl, hh]).unsqueeze(1)}


def from_released(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Released key names -> ours. The Haar filter buffers are checked and dropped."""
    haar = released_haar_filters()
    out = {}
    for key, value in state_dict.items():
        buffer = _WAVELET_BUFFER.fullmatch(key)
        if buffer:
            expected = haar[buffer[2]]
            if value.shape != expected.shape or not torch.allclose(value.float().cpu(), expected, atol=1e-6):
                raise ValueError(f"{key}: expected the Haar filter {expected.flatten().tolist()}, "
                                 f"got shape {tuple(value.shape)}")
            continue
        out[_rename(key, to_released=False)] = value
    return out


def to_released(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our key names -> released, with the Haar filter buffers of every block written back."""
    haar = released_haar_filters()
    out = {}
    for key, value in state_dict.items():
        name = _rename(key, to_released=True)
        match = _BLOCK_KEY.fullmatch(name)
        if match and match[2].startswith("freq_mamba.adaLN_modulation.1.weight"):  # released position
            out.update({f"blocks.{match[1]}.freq_mamba.{k}": v.clone() for k, v in haar.items()})
        out[name] = value
    return out


def released_config(name: str = "DiMSUM-L/2", **overrides: Any) -> ModelConfig:
    """A registry entry with the released behaviour: unused cond_proj and the released wavelet layout."""
    return model_config(name, **{"cond_mamba": "released", "wavelet_layout": "released", **overrides})


def config_from_state_dict(state_dict: Mapping[str, torch.Tensor], **overrides: Any) -> ModelConfig:
    """The released-behaviour config whose shapes match a (converted) DiMSUM state dict."""
    try:
        depth = 1 + max(int(m[1]) for k in state_dict if (m := _BLOCK_KEY.fullmatch(k)))
        hidden, _, patch, _ = state_dict["x_embedder.proj.weight"].shape
        grid = math.isqrt(state_dict["pos_embed"].shape[1])
        rows = state_dict["y_embedder.embedding_table.weight"].shape[0]
    except (KeyError, ValueError) as err:
        raise ValueError(f"not a DiMSUM state dict in our format (missing or empty: {err})") from None
    names = [n for n, c in REGISTRY.items()
             if (c.family, c.depth, c.hidden_size, c.patch_size) == ("dimsum", depth, hidden, patch)]
    if not names:
        raise ValueError(f"no registered DiMSUM size has depth={depth}, hidden_size={hidden}, "
                         f"patch_size={patch}")
    labels = {"num_classes": 1, "label_dropout": 0.0} if rows == 1 else {"num_classes": rows - 1}
    return released_config(names[0], input_size=grid * patch, **{**labels, **overrides})


def resize_state_dict(state_dict: dict[str, torch.Tensor], grid: int) -> dict[str, torch.Tensor]:
    """Bicubically resize ``pos_embed`` to a ``grid`` x ``grid`` token map (other resolutions)."""
    return {**state_dict, "pos_embed": resize_pos_embed(state_dict["pos_embed"], grid)}

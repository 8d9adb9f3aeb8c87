"""Released LaMamba-Diff state dicts <-> ours (spec §4, §13), both directions, buffers included.

The released names abbreviate or mislead (``op`` is the SS2D branch, ``norm`` its LayerNorm, ``layers_up``
the decoder); ours say what they are. Modules are registered in the released order, so renaming keeps
the entry order. Every key must match a known name, so a state dict of another architecture fails loudly
instead of converting silently. The released checkpoint dict (``model``, ``ema``, ``opt``, ``args``,
``config``) is read by the launch side; this module converts its ``model``/``ema`` entries.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from dimsum.models.config import REGISTRY, ModelConfig, model_config

Table = tuple[tuple[str, str], ...]  # (ours, released): whole names, or prefixes ending in "."

_STAGES: Table = (("encoder.", "layers."), ("decoder.", "layers_up."), ("middle.", "mid_layer."))
_TOP: Table = (
    ("pos_embed", "pos_embed"),
    ("t_embedder.mlp.", "t_embedder.mlp."),
    ("y_embedder.embedding_table.", "y_embedder.embedding_table."),
    ("patch_embed.proj.", "patch_embed.proj."),
    ("patch_embed.norm.", "patch_embed.norm."),
    ("final_expand.", "final_up."),
    ("final_cond_proj.", "final_condition_projection."),
    ("final_adaLN.1.", "final_adaLN_modulation.1."),
    ("final_linear.", "final_linear."),
)
_RESAMPLERS: Table = (
    ("downsample.reduction.", "downsample.reduction."),
    ("downsample.norm.", "downsample.norm."),
    ("upsample.expand.", "upsample.expand."),
    ("upsample.norm.", "upsample.norm."),
)
_BLOCK: Table = (
    ("shift_mask", "attn_mask"),
    ("cond_proj.", "condition_projection."),
    ("attn_norm.", "norm_swin."),
    ("window_attn.rel_pos_bias", "attn.relative_position_bias_table"),
    ("window_attn.rel_pos_index", "attn.relative_position_index"),
    ("window_attn.qkv.", "attn.qkv."),
    ("window_attn.proj.", "attn.proj."),
    ("ssm_norm.", "norm."),
    ("ss2d.x_proj_weight", "op.x_proj_weight"),
    ("ss2d.dt_proj_weight", "op.dt_projs_weight"),
    ("ss2d.dt_bias", "op.dt_projs_bias"),
    ("ss2d.A_log", "op.A_logs"),
    ("ss2d.D", "op.Ds"),
    ("ss2d.out_norm.", "op.out_norm."),
    ("ss2d.in_proj.", "op.in_proj."),
    ("ss2d.conv.", "op.conv2d."),
    ("ss2d.out_proj.", "op.out_proj."),
    ("mlp_norm.", "norm2."),
    ("mlp.fc1.", "mlp.fc1."),
    ("mlp.fc2.", "mlp.fc2."),
    ("adaLN_modulation.1.", "adaLN_modulation.1."),
)
_IN_STAGE = re.compile(r"(\d+\.)?(blocks\.\d+\.)?(.*)")


def _lookup(name: str, table: Table, src: int, dst: int) -> str | None:
    for pair in table:
        known = pair[src]
        if name == known or (known.endswith(".") and name.startswith(known)):
            return pair[dst] + name[len(known):]
    return None


def _rename(key: str, to_released: bool) -> str:
    src, dst = (0, 1) if to_released else (1, 0)
    renamed = _lookup(key, _TOP, src, dst)
    for stage in _STAGES:
        if renamed is None and key.startswith(stage[src]):
            index, block, rest = _IN_STAGE.fullmatch(key[len(stage[src]):]).groups()
            inner = _lookup(rest, _BLOCK if block else _RESAMPLERS, src, dst)
            if inner is not None and (index is None) == (stage[0] == "middle."):
                renamed = stage[dst] + (index or "") + (block or "") + inner
    if renamed is None:
        side = "our" if to_released else "the released"
        raise KeyError(f"{key!r} is not a key of {side} LaMamba-Diff format (no counterpart)")
    return renamed


def from_released(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Released key names -> ours, in the same order."""
    return {_rename(key, to_released=False): value for key, value in state_dict.items()}


def to_released(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our key names -> released, in the same order."""
    return {_rename(key, to_released=True): value for key, value in state_dict.items()}


def config_from_state_dict(state_dict: Mapping[str, torch.Tensor], name: str = "LaMamba-Diff-XL",
                           **overrides: Any) -> ModelConfig:
    """The size ``name`` at the resolution and label count of a (converted) state dict.

    The released yaml's widths, depths and window are not recoverable from every shape, so the size is
    named; a width or head count that disagrees with it is an error.
    """
    if name not in REGISTRY or REGISTRY[name].family != "lamamba":
        raise ValueError(f"{name!r} is not a registered LaMamba size")
    try:
        _, side, _, width = state_dict["pos_embed"].shape
        rows = state_dict["y_embedder.embedding_table.weight"].shape[0]
        heads = state_dict["encoder.0.blocks.0.window_attn.rel_pos_bias"].shape[1]
    except (KeyError, ValueError) as err:
        raise ValueError(f"not a LaMamba-Diff state dict in our format (missing: {err})") from None
    size = REGISTRY[name]
    if (width, heads) != (size.hidden_size, size.attn_heads):
        raise ValueError(f"{name} has width {size.hidden_size} and {size.attn_heads} heads; the state dict "
                         f"has width {width} and {heads} heads")
    labels = {"num_classes": 1, "label_dropout": 0.0} if rows == 1 else {"num_classes": rows - 1}
    return model_config(name, input_size=side, **{**labels, **overrides})


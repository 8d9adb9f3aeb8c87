"""DiT's MACs: ``depth`` standard transformer blocks between the shared embeddings and head."""

from __future__ import annotations

from dimsum.models.config import ModelConfig
from dimsum.models.flops import patch_net_macs, transformer_block_macs


def forward_gmacs(cfg: ModelConfig, out_channels: int) -> float:
    T, D = cfg.grid_size**2, cfg.hidden_size
    trunk = cfg.depth * transformer_block_macs(T, D, 4 * D, gated=False)
    return (patch_net_macs(cfg, out_channels) + trunk) / 1e9

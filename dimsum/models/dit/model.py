"""DiT baseline (Peebles & Xie, 2023) in the DiMSUM framework: same embeddings, head, signature and objective.

Standard DiT: adaLN-Zero transformer blocks, a frozen sin-cos position table, xavier-uniform Linear
weights. Under flow matching it predicts the velocity (in_channels outputs, as SiT), not DiT's
learned-sigma epsilon, so its final Linear is half as wide as DiT's (DiT-XL/2: 675,129,632 - 18,448 =
675,111,184 parameters).
"""

from __future__ import annotations

import torch
from torch import nn

from dimsum.models.config import ModelConfig
from dimsum.models.patch_net import PatchNet
from dimsum.nn.layers import FinalLayer, TransformerBlock


class DiT(PatchNet):
    def __init__(self, cfg: ModelConfig, out_channels: int) -> None:
        if cfg.family != "dit":
            raise ValueError(f"{cfg.name}: DiT needs family='dit', got {cfg.family!r}")
        super().__init__(cfg, out_channels, learnable_pos_embed=False)
        D = cfg.hidden_size
        self.blocks = nn.ModuleList(TransformerBlock(D, cfg.attn_heads) for _ in range(cfg.depth))
        self.final_layer = FinalLayer(D, cfg.patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's init: xavier-uniform Linears with zero bias, then adaLN-Zero in every block and the head."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        self.init_embeddings()
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        self.zero_init_head()

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Prediction (B, out_channels, H, W) for latents ``x`` (B, C, H, W), times ``t`` (B,) in [0, 1],
        labels ``y`` (B,) or None."""
        hidden, c = self.embed(x, t, y)
        for block in self.blocks:
            hidden = block(hidden, c)
        return self.head(hidden, c)

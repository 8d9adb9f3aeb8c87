"""What DiMSUM and the DiT baseline share: the embeddings in front, the adaLN head behind.

Both networks map (x, t, y) to ``out_channels`` maps of x's size (the objective's prediction: a velocity
for flow matching), where t in [0, 1] (t=1 is data) and y is a class index (or None for the
unconditional row / the null row). Subclasses build their trunk and then ``self.final_layer`` (after the
trunk, so state dicts list modules in the released order).
"""

from __future__ import annotations

import torch
from torch import nn

from dimsum.models.config import ModelConfig
from dimsum.nn.embeddings import (
    LabelEmbedder,
    PatchEmbed,
    TimestepEmbedder,
    init_embedders,
    sincos_pos_embed_2d,
)
from dimsum.nn.layers import FinalLayer


class PatchNet(nn.Module):
    final_layer: FinalLayer

    def __init__(self, cfg: ModelConfig, out_channels: int, learnable_pos_embed: bool) -> None:
        super().__init__()
        self.cfg, self.out_channels = cfg, out_channels
        D = cfg.hidden_size
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.grid_size**2, D), requires_grad=learnable_pos_embed)
        self.x_embedder = PatchEmbed(cfg.in_channels, D, cfg.patch_size)
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = LabelEmbedder(cfg.num_classes, D, cfg.label_dropout)

    @property
    def null_label(self) -> int | None:
        """Label index of the "null" row for classifier-free guidance, None when the table has none."""
        return self.y_embedder.null_label

    def init_embeddings(self) -> None:
        """DiT's embedding init: sin-cos positions, patch conv as a Linear (xavier), N(0, 0.02) tables."""
        pos = sincos_pos_embed_2d(self.cfg.hidden_size, self.cfg.grid_size)
        with torch.no_grad():
            self.pos_embed.copy_(torch.from_numpy(pos).float().unsqueeze(0))
        init_embedders(self.x_embedder.proj, self.t_embedder, self.y_embedder)

    def zero_init_head(self) -> None:
        """The output starts at zero: adaLN of the final layer and its Linear are zero."""
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def embed(self, x: torch.Tensor, t: torch.Tensor,
              y: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens (B, T, D) with positions added, and the conditioning vector c = t_emb + y_emb (B, D)."""
        self.cfg.check_input(x)
        tokens = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y, x.shape[0], x.device)
        return tokens, c

    def head(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Final adaLN layer, then unpatchify (B, T, p*p*C) -> (B, C, H, W), C = ``out_channels``."""
        x = self.final_layer(x, c)
        B, p, C, n = x.shape[0], self.cfg.patch_size, self.out_channels, self.cfg.grid_size
        x = x.reshape(B, n, n, p, p, C).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(B, C, n * p, n * p)

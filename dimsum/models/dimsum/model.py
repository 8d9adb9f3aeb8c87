"""DiMSUM: spatial-frequency Mamba blocks with one shared transformer block (NeurIPS 2024; spec §2-§3).

Block loop (Mamba's add -> norm -> mixer): block k gets (x_{k-1}, r_{k-1}), r_k = r_{k-1} + DropPath(x_{k-1})
in fp32, x_k = DiMBlock(RMSNorm(r_k), c). After every ``attn_every``-th block the one shared transformer
block (a single set of weights) updates x_k; r is left alone. The final layer reads x_depth, not r.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dimsum.models.dimsum.blocks import DiMBlock
from dimsum.models.dimsum.config import DiMSUMConfig
from dimsum.models.patch_net import PatchNet
from dimsum.nn.layers import FinalLayer, TransformerBlock
from dimsum.ssm.mamba import Mamba


def drop_path_rates(rate: float, depth: int) -> list[float]:
    """linspace(0, rate, depth) shifted one block later: block k drops block k-1's output at rate[k-1]."""
    linspace = [rate * i / (depth - 1) if depth > 1 else 0.0 for i in range(depth)]
    return [0.0, *linspace[:-1]]


class DiMSUM(PatchNet):
    def __init__(self, cfg: DiMSUMConfig, out_channels: int) -> None:
        if cfg.family != "dimsum":
            raise ValueError(f"{cfg.name}: DiMSUM needs family='dimsum', got {cfg.family!r}")
        super().__init__(cfg, out_channels, learnable_pos_embed=True)
        D = cfg.hidden_size
        rates = drop_path_rates(cfg.drop_path, cfg.depth)
        self.blocks = nn.ModuleList(DiMBlock(cfg, k, rate) for k, rate in enumerate(rates))
        self.shared_attn = TransformerBlock(D, cfg.attn_heads, mlp="geglu")
        self.final_layer = FinalLayer(D, cfg.patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The released init: default Linear weights with zero biases (dt_proj keeps its dt init), DiT's
        embedding init, zero FFN adaLN / final adaLN / final Linear, and every Mamba out_proj
        kaiming-uniform / sqrt(depth) (GPT-2's residual rescaling)."""
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear) and module.bias is not None and not name.endswith("dt_proj"):
                nn.init.zeros_(module.bias)
            if isinstance(module, Mamba):
                nn.init.kaiming_uniform_(module.out_proj.weight, a=math.sqrt(5))
                with torch.no_grad():
                    module.out_proj.weight.div_(math.sqrt(self.cfg.depth))
        self.init_embeddings()
        for block in self.blocks:
            nn.init.zeros_(block.ffn_adaLN[-1].weight)
            nn.init.zeros_(block.ffn_adaLN[-1].bias)
        self.zero_init_head()

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Prediction (B, out_channels, H, W) for latents ``x`` (B, C, H, W), times ``t`` (B,) in [0, 1],
        labels ``y`` (B,) or None."""
        hidden, c = self.embed(x, t, y)
        residual = None
        for k, block in enumerate(self.blocks, start=1):
            hidden, residual = block(hidden, residual, c)
            if k % self.cfg.attn_every == 0:
                hidden = self.shared_attn(hidden, c)
        return self.head(hidden, c)

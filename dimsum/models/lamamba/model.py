"""LaMamba-Diff (Fu, Chen, Yu, arXiv 2408.02615): a 4-stage U-Net of LaMamba blocks on latent pixels (§8).

Encoder stages at R, R/2, R/4, R/4 (widths d, 2d, 4d, 4d; 2x patch merging after the first two), a middle
stage, and decoder stages mirroring them with one block more each; skips are added. The conditioning
vector c = t_emb + y_emb has the widest stage's width and every block projects it itself. The
released quirks are kept (spec §14): the middle output is added to its input again (m = s3 + Mid(s3)),
``pos_embed`` is trained, ``final_linear`` is not zeroed, there is no drop path.

forward(x, t, y): x (B, C, R, R) latents, t (B,) the integer DDPM index 0..999 as a float, y (B,) labels
or None; returns (B, out_channels, R, R) (8 = eps and the variance interpolation for DDPM's learned sigma).
"""

from __future__ import annotations

import torch
from torch import nn

from dimsum.models.lamamba.blocks import LaMambaBlock, PatchExpanding, PatchMerging, Stage, modulate
from dimsum.models.lamamba.config import LaMambaConfig
from dimsum.nn.embeddings import LabelEmbedder, TimestepEmbedder, init_embedders, sincos_pos_embed_2d
from dimsum.nn.layers import ada_modulation
from dimsum.nn.window_attention import WindowAttention


class PixelEmbed(nn.Module):
    """1x1 conv to the embedding width, channels-last, LayerNorm (the released PATCHEMBED is ignored)."""

    def __init__(self, in_channels: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=1)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class LaMambaDiff(nn.Module):
    def __init__(self, cfg: LaMambaConfig, out_channels: int) -> None:
        if cfg.family != "lamamba":
            raise ValueError(f"{cfg.name}: LaMambaDiff needs family='lamamba', got {cfg.family!r}")
        super().__init__()
        self.cfg, self.out_channels = cfg, out_channels
        d, Dc, R = cfg.hidden_size, cfg.cond_dim, cfg.input_size
        widths, sides = cfg.stage_widths, cfg.stage_sides
        self.pos_embed = nn.Parameter(torch.zeros(1, R, R, d))
        self.t_embedder = TimestepEmbedder(Dc)
        self.y_embedder = LabelEmbedder(cfg.num_classes, Dc, cfg.label_dropout)
        self.patch_embed = PixelEmbed(cfg.in_channels, d)

        def blocks(width: int, side: int, count: int, encoder: bool) -> list[LaMambaBlock]:
            project = not encoder or width != Dc
            return [LaMambaBlock(cfg, width, side, i, project) for i in range(count)]

        halves = [sides[i + 1] != sides[i] for i in range(len(sides) - 1)] + [False]  # stage i -> i + 1
        self.encoder = nn.ModuleList(
            Stage(blocks(widths[i], sides[i], cfg.depth, encoder=True),
                  downsample=PatchMerging(widths[i]) if halves[i] else None)
            for i in range(len(widths)))
        self.middle = Stage(blocks(widths[-1], sides[-1], cfg.bottleneck_depth, encoder=True))
        self.decoder = nn.ModuleList(  # decoder stage j mirrors encoder stage i = 3 - j
            Stage(blocks(widths[i], sides[i], cfg.decoder_depth, encoder=False),
                  upsample=PatchExpanding(widths[i + 1], scale=2) if halves[i] else None)
            for i in reversed(range(len(widths))))
        self.final_expand = PatchExpanding(d, scale=1)
        self.final_cond_proj = nn.Linear(Dc, d)
        self.final_adaLN = ada_modulation(d, 2 * d)
        self.final_norm = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.final_linear = nn.Linear(d, out_channels)
        self.initialize_weights()

    @property
    def null_label(self) -> int | None:
        """Label index of the "null" row for classifier-free guidance, None when the table has none."""
        return self.y_embedder.null_label

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """Spec §10: xavier Linears with zero bias, DiT's embedding init, truncated-normal position-bias
        tables, zero adaLN heads (every block and the final layer), final_linear left xavier (§14.3).
        SS2D keeps its own init (:meth:`SS2D.reset_ssm_parameters`), the depthwise conv PyTorch's."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, WindowAttention):
                nn.init.trunc_normal_(module.rel_pos_bias, std=0.02)
        pos = sincos_pos_embed_2d(self.cfg.hidden_size, self.cfg.input_size)
        self.pos_embed.copy_(torch.from_numpy(pos).float().view_as(self.pos_embed))
        init_embedders(self.patch_embed.proj, self.t_embedder, self.y_embedder)
        heads = [b.adaLN_modulation[-1] for m in self.modules() if isinstance(m, Stage) for b in m.blocks]
        for linear in [*heads, self.final_adaLN[-1]]:
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        self.cfg.check_input(x)
        h = self.patch_embed(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y, x.shape[0], x.device)
        skips = []
        for stage in self.encoder:
            h = stage(h, c)
            skips.append(h)
            if stage.downsample is not None:
                h = stage.downsample(h)
        h = h + self.middle(h, c)  # §14.1: the middle blocks are residual already
        for stage, skip in zip(self.decoder, reversed(skips), strict=True):
            if stage.upsample is not None:
                h = stage.upsample(h)
            h = stage(h + skip, c)
        cf = self.final_cond_proj(c)
        shift, scale = self.final_adaLN(cf).chunk(2, dim=-1)
        h = modulate(self.final_norm(self.final_expand(h)), shift, scale)
        return self.final_linear(h).permute(0, 3, 1, 2)

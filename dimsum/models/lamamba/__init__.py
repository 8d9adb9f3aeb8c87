"""The LaMamba-Diff family (arXiv 2408.02615): its config, network, FLOPs count and named sizes.

Only the released XL configuration exists (the repository ships one yaml; no other scale has citable
numbers). ``LaMamba-debug`` is a CPU-test size on the same code path: a 16x16 latent with window 4, so
the first two stages have shifted windows and masks and the last ones global attention, as XL at 512 px.
An unconditional model is ``num_classes=1, label_dropout=0`` (one label row, as released).
"""

from __future__ import annotations

from dimsum.models.config import FamilySpec
from dimsum.models.lamamba.config import LaMambaConfig
from dimsum.models.lamamba.flops import forward_gmacs
from dimsum.models.lamamba.model import LaMambaDiff


def learned_sigma_channels(in_channels: int) -> int:
    """The released models predict eps and the variance interpolation v (DDPM with learned sigma)."""
    return 2 * in_channels


FAMILY = FamilySpec(
    name="lamamba",
    config=LaMambaConfig,
    build=LaMambaDiff,
    forward_gmacs=forward_gmacs,
    sizes=(
        LaMambaConfig(name="LaMamba-Diff-XL", depth=2, hidden_size=320, patch_size=1, input_size=32,
                      label_dropout=0.1, attn_heads=16, window_size=8),
        LaMambaConfig(name="LaMamba-debug", depth=2, hidden_size=16, patch_size=1, input_size=16,
                      label_dropout=0.1, attn_heads=2, window_size=4),
    ),
    default_out_channels=learned_sigma_channels,
)

"""One training step (forward, backward, AdamW) of DiMSUM-S/2 vs DiT-S/2 on the same batch, interleaved.

    python benchmarks/step.py            # B=8, 4x32x32 latents (256 px), 2 warm-up + 5 timed steps each
    python benchmarks/step.py --profile  # + where DiMSUM's time goes (torch.profiler, forward per module)
    python benchmarks/step.py --quick    # tiny models, a smoke run in a few seconds
    python benchmarks/step.py --lamamba  # LaMamba-debug vs DiMSUM and DiT at about its parameter count

Both models see the same GVP-path batch (x_t, t, y, target velocity) and the same loss; the steps are
timed alternately so that machine noise hits both alike. Goal: DiMSUM-S/2 <= 1.25x DiT-S/2.

``--lamamba`` times LaMamba-debug (patch 1, 16x16 latent: 256 tokens) against DiMSUM-debug widened to 112
and a 4-block DiT of width 144 (patch 2: 64 tokens), all within 3% of 1.80 M parameters and all predicting
4 channels on the same flow-matching batch (the step cost of the trunks, not of an objective).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections import defaultdict

import torch

from dimsum.models import build_model, forward_gmacs, model_config

QUICK = {"depth": 2, "hidden_size": 64, "attn_heads": 4}
# label -> (registry name, overrides): about LaMamba-debug's 1.80 M parameters each
EQUAL_PARAMETERS = {
    "LaMamba-debug": ("LaMamba-debug", {}),
    "DiMSUM 4x112": ("DiMSUM-debug", {"hidden_size": 112, "fusion_heads": 4, "attn_heads": 4}),
    "DiT 4x144": ("DiT-S/2", {"depth": 4, "hidden_size": 144, "attn_heads": 4}),
}


def make_batch(batch: int, size: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x1, x0 = torch.randn(batch, 4, size, size, generator=g), torch.randn(batch, 4, size, size, generator=g)
    t = torch.rand(batch, generator=g)
    y = torch.randint(0, 1000, (batch,), generator=g)
    s, c = torch.sin(math.pi / 2 * t)[:, None, None, None], torch.cos(math.pi / 2 * t)[:, None, None, None]
    return s * x1 + c * x0, t, y, math.pi / 2 * (c * x1 - s * x0)


class Trainer:
    """A model with its AdamW, stepping on one fixed batch."""

    def __init__(self, name: str, overrides: dict) -> None:
        torch.manual_seed(0)
        self.cfg = model_config(name, **overrides)
        self.model = build_model(self.cfg, out_channels=self.cfg.in_channels).train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=0.0)

    def step(self, batch: tuple[torch.Tensor, ...]) -> float:
        xt, t, y, target = batch
        start = time.perf_counter()
        loss = (self.model(xt, t, y) - target).square().mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return time.perf_counter() - start


def forward_time_by_module(trainer: Trainer, batch: tuple[torch.Tensor, ...]) -> dict[str, float]:
    """Wall time of each component's forward (exclusive of nothing: nested parts are listed separately)."""
    totals: dict[str, float] = defaultdict(float)
    starts: dict[int, float] = {}
    kinds = {"SpatialBranch", "FrequencyBranch", "Mamba", "HaarPacketTokens", "CrossAttentionFusion", "GEGLU",
             "TransformerBlock", "Attention", "Mlp", "FinalLayer"}
    handles = []
    for module in trainer.model.modules():
        kind = type(module).__name__
        if kind in kinds:
            handles.append(module.register_forward_pre_hook(
                lambda m, _: starts.__setitem__(id(m), time.perf_counter())))
            handles.append(module.register_forward_hook(
                lambda m, *_, k=kind: totals.__setitem__(k, totals[k] + time.perf_counter() - starts[id(m)])))
    with torch.no_grad():
        start = time.perf_counter()
        trainer.model(*batch[:3])
        totals["(whole forward)"] = time.perf_counter() - start
    for h in handles:
        h.remove()
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def profile(trainer: Trainer, batch: tuple[torch.Tensor, ...], rows: int) -> None:
    print(f"\n{trainer.cfg.name}: forward wall time by component (one no-grad forward, nested):")
    for kind, seconds in forward_time_by_module(trainer, batch).items():
        print(f"  {kind:<22}{1e3 * seconds:9.1f} ms")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        trainer.step(batch)
    print(f"\n{trainer.cfg.name}: one training step, top ops by self CPU time:")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def make_trainers(args: argparse.Namespace) -> dict[str, Trainer]:
    if args.lamamba:
        args.size = 16
        return {label: Trainer(name, {**kw, "input_size": args.size})
                for label, (name, kw) in EQUAL_PARAMETERS.items()}
    overrides = {"input_size": args.size, **(QUICK if args.quick else {})}
    return {name: Trainer(name, overrides) for name in ("DiT-S/2", "DiMSUM-S/2")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=32, help="latent side (32 = 256 px images)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--rows", type=int, default=25, help="profiler table rows")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--quick", action="store_true", help="tiny models, one timed step: a smoke run")
    parser.add_argument("--lamamba", action="store_true",
                        help="LaMamba-debug vs DiMSUM and DiT at equal parameters (16x16 latents)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.batch, args.warmup, args.repeats = 2, 1, 1
    trainers = make_trainers(args)
    batch = make_batch(args.batch, args.size)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"batch {args.batch} x 4 x {args.size} x {args.size}")
    for name, tr in trainers.items():
        params = sum(p.numel() for p in tr.model.parameters())
        gmacs = forward_gmacs(tr.cfg, tr.cfg.in_channels)
        print(f"  {name:<11} depth {tr.cfg.depth:>2}, width {tr.cfg.hidden_size}, "
              f"{params / 1e6:6.2f} M params, {gmacs:6.2f} GMACs/image forward")
    times: dict[str, list[float]] = {name: [] for name in trainers}
    for i in range(args.warmup + args.repeats):
        for name, tr in trainers.items():
            elapsed = tr.step(batch)
            if i >= args.warmup:
                times[name].append(elapsed)
    median = {name: statistics.median(ts) for name, ts in times.items()}
    for name, ts in times.items():
        every = ", ".join(f"{1e3 * x:.0f}" for x in ts)
        print(f"  {name:<11} step median {1e3 * median[name]:8.1f} ms  (all: {every})")
    if args.lamamba:
        for label in list(trainers)[1:]:
            print(f"ratio LaMamba-debug / {label} = {median['LaMamba-debug'] / median[label]:.2f}x")
        return
    ratio = median["DiMSUM-S/2"] / median["DiT-S/2"]
    verdict = "met" if ratio <= 1.25 else "NOT met"
    print(f"ratio DiMSUM-S/2 / DiT-S/2 = {ratio:.2f}x  (goal <= 1.25x: {verdict})")
    if args.profile:
        profile(trainers["DiMSUM-S/2"], batch, args.rows)


if __name__ == "__main__":
    main()

"""DiMSUM vs DiT vs LaMamba-Diff on the digits at equal compute: sample quality against training time.

    python benchmarks/convergence.py                       # 5 arms x 2 seeds, 150 s of training each
    python benchmarks/convergence.py --budget 20 --count 40 --evals 1   # a smoke run in ~3 minutes

Every arm trains on the CPU demo's data (scikit-learn digits as 1x16x16 pixels, data_pipeline.demo) for the
same wall-clock budget; its two seeds run at the same time as two processes of one thread each, so an arm
has the machine's 2 cores. The models are small and of comparable size (0.46-0.63 M parameters); what a
model does with the budget (images per second x what it learns per image) is the comparison. The arms:

- DiMSUM-debug and a DiT of 7 blocks of width 64, both patch 4, with flow matching on the GVP path (the
  objective of both papers);
- LaMamba-Diff (width 12, one block per stage, patch 1) with its DDPM objective (learned sigma, 1000 steps),
  and the same network with flow matching, so that architecture and objective are not confounded;
- DiMSUM-debug with ``cond_mamba: released``: the class reaches the network through adaLN only, the
  conditional Mamba's initial state is not used (what the released kernels compute; spec model.md §6).

Training is the service's objective, model and fp32 EMA in a plain loop (AdamW, lr 1e-2, clip 1, batch 32,
EMA 0.95: the CI quality gate's settings, which were tuned on DiMSUM, an advantage to keep in mind) rather
than the DeepSpeed trainer, whose start-up would eat the budget. The clock stops while the EMA weights are
scored: at ``--evals`` evenly spaced times, ``--count`` samples with CFG 1.5 (the ``quality:`` default) and
``--steps`` network evaluations (Euler for flow, DDIM for DDPM), scored by the digits judge
(launch.generate.quality): class accuracy and Fréchet distance of the judge's features (lower is better).
Final loss is the mean of the last 20 steps; DDPM's hybrid loss is on another scale than flow's.

Writes ``OUT/convergence.json`` and ``OUT/convergence.png`` (quality against training seconds).
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing
import os
import time
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure

from data_pipeline.demo import digits_pixels
from dimsum.ema import EMA
from dimsum.models import build_model, count_parameters, model_config
from launch.components import ObjectiveConfig
from launch.generate.judge import load_judge
from launch.generate.quality import sample_quality
from launch.generate.sample import sampler_config

LAMAMBA = {"hidden_size": 12, "depth": 1, "attn_heads": 2}
ARMS: dict[str, dict[str, Any]] = {
    "DiMSUM (flow)": {"name": "DiMSUM-debug", "model": {"patch_size": 4}, "objective": "flow"},
    "DiT (flow)": {"name": "DiT-S/2", "model": {"patch_size": 4, "depth": 7, "hidden_size": 64,
                                                "attn_heads": 4}, "objective": "flow"},
    "LaMamba (DDPM)": {"name": "LaMamba-debug", "model": LAMAMBA, "objective": "ddpm"},
    "LaMamba (flow)": {"name": "LaMamba-debug", "model": LAMAMBA, "objective": "flow"},
    "DiMSUM released cond (flow)": {"name": "DiMSUM-debug", "objective": "flow",
                                    "model": {"patch_size": 4, "cond_mamba": "released"}},
}
BASELINE = "DiMSUM (flow)"  # the img/s ratios are against this arm, measured in the same run
DIGITS = {"input_size": 16, "in_channels": 1, "num_classes": 10, "label_dropout": 0.1}
BATCH, LR, CLIP, EMA_DECAY, CFG_SCALE = 32, 1e-2, 1.0, 0.95, 1.5


def train_arm(arm: str, seed: int, settings: dict[str, Any]) -> dict[str, Any]:
    """One seed of one arm, in a worker process with one thread (``settings``: the command's options)."""
    torch.set_num_threads(1)
    spec = ARMS[arm]
    cfg = model_config(spec["name"], **DIGITS, **spec["model"])
    objective = ObjectiveConfig(kind=spec["objective"]).build()
    sampler = sampler_config("ddim" if spec["objective"] == "ddpm" else "euler", steps=settings["steps"])
    judge = load_judge(settings["cache_dir"], log=lambda _: None)
    images, labels = (torch.from_numpy(a) for a in digits_pixels())
    torch.manual_seed(seed)
    width = objective.out_channels(cfg.in_channels)
    model = build_model(cfg, width).train()
    trained = dict(model.named_parameters())
    ema = EMA({n: p for n, p in trained.items() if p.requires_grad}, EMA_DECAY)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    batches = torch.Generator().manual_seed(seed)
    evals = settings["evals"]
    marks = [settings["budget"] * (i + 1) / evals for i in range(evals)]
    clock, seen, losses, curve = 0.0, 0, [], []
    while marks:
        began = time.perf_counter()
        rows = torch.randint(len(images), (BATCH,), generator=batches)
        loss = objective.loss(model, images[rows], {"y": labels[rows]}).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        ema.update({n: trained[n] for n in ema.shadow})
        clock += time.perf_counter() - began
        seen, losses = seen + BATCH, [*losses[-19:], loss.item()]
        if clock >= marks[0]:
            marks.pop(0)
            scored = copy.deepcopy(model).eval()
            scored.load_state_dict(ema.shadow, strict=False)  # frozen parameters are not averaged
            with torch.random.fork_rng(devices=[]):
                metrics = sample_quality(scored, objective, judge, count=settings["count"], sampler=sampler,
                                         cfg_scale=CFG_SCALE, seed=0)
            curve.append({"seconds": clock, "images": seen, **metrics})
    return {"arm": arm, "seed": seed, "params": count_parameters(cfg, width), "images_per_s": seen / clock,
            "final_loss": sum(losses) / len(losses), "curve": curve}


def run_arm(arm: str, seeds: list[int], args: argparse.Namespace) -> list[dict[str, Any]]:
    """The seeds of one arm side by side, one process each."""
    context = multiprocessing.get_context("spawn")
    with context.Pool(len(seeds)) as pool:
        jobs = [pool.apply_async(train_arm, (arm, seed, vars(args))) for seed in seeds]
        results = [job.get() for job in jobs]
        pool.close()
        pool.join()
    return results


def spread(values: list[float], digits: int) -> str:
    """Mean ± half the range over the seeds."""
    mean = sum(values) / len(values)
    half = (max(values) - min(values)) / 2
    return f"{mean:.{digits}f} ± {half:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def table(results: list[dict[str, Any]]) -> str:
    rows = ["| arm | params | img/s (per core) | img/s vs DiMSUM | final loss | accuracy | FD | NFE |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    speed = {arm: [r["images_per_s"] for r in results if r["arm"] == arm] for arm in ARMS}
    baseline = sum(speed[BASELINE]) / len(speed[BASELINE]) if speed[BASELINE] else None
    for arm in ARMS:
        runs = [r for r in results if r["arm"] == arm]
        if not runs:
            continue
        last = [r["curve"][-1] for r in runs]
        ratio = f"{sum(speed[arm]) / len(speed[arm]) / baseline:.2f}x" if baseline else "-"
        rows.append(f"| {arm} | {runs[0]['params']:,} | {spread(speed[arm], 1)} | {ratio} | "
                    f"{spread([r['final_loss'] for r in runs], 3)} | "
                    f"{spread([100 * c['accuracy'] for c in last], 1)} % | "
                    f"{spread([c['fd'] for c in last], 1)} | "
                    f"{last[0]['nfe']:.0f} x 2 (CFG) |")
    return "\n".join(rows)


def plot(results: list[dict[str, Any]], path: Path) -> None:
    fig = Figure(figsize=(11, 4.2))
    acc, fd = fig.subplots(1, 2)
    for index, arm in enumerate(a for a in ARMS if any(r["arm"] == a for r in results)):
        colour = f"C{index}"
        for k, run in enumerate(r for r in results if r["arm"] == arm):
            seconds = [c["seconds"] for c in run["curve"]]
            acc.plot(seconds, [100 * c["accuracy"] for c in run["curve"]], "o-", color=colour,
                     alpha=0.9 if k == 0 else 0.45, label=arm if k == 0 else None)
            fd.plot(seconds, [c["fd"] for c in run["curve"]], "o-", color=colour,
                    alpha=0.9 if k == 0 else 0.45)
    acc.set(xlabel="training seconds (1 core per seed)", ylabel="class accuracy of samples (%)",
            title="digits judge: accuracy (higher is better)")
    fd.set(xlabel="training seconds (1 core per seed)", ylabel="Fréchet distance of judge features",
           title="digits judge: FD (lower is better)", yscale="log")
    acc.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def load_average() -> str:
    """The machine's load (as ``uptime`` prints it): other jobs on the 2 cores slow every arm."""
    return "load average: " + ", ".join(f"{v:.2f}" for v in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=150.0, help="training seconds per arm and seed")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--evals", type=int, default=3, help="quality measurements per run (evenly spaced)")
    parser.add_argument("--count", type=int, default=100, help="samples per measurement")
    parser.add_argument("--steps", type=int, default=10, help="sampler steps (network evaluations)")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS), metavar="ARM")
    parser.add_argument("--cache-dir", default=None,
                        help="the digits judge's cache (default: ~/.cache/dimsum/judge)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    judge = load_judge(args.cache_dir)  # trained once here, read from the cache by the workers
    load = load_average()
    print(f"judge held-out accuracy {100 * judge.held_out_accuracy:.1f}%; before: {load}", flush=True)
    began, results = time.perf_counter(), []
    for arm in args.arms:
        for run in run_arm(arm, args.seeds, args):
            results.append(run)
            last = run["curve"][-1]
            print(f"{arm} seed {run['seed']}: {run['images_per_s']:.1f} img/s, loss {run['final_loss']:.3f}, "
                  f"accuracy {100 * last['accuracy']:.1f}%, FD {last['fd']:.1f}", flush=True)
    after = load_average()
    print(f"\n{table(results)}\n\n{len(results)} runs in {time.perf_counter() - began:.0f} s; after: {after}")
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"budget_s": args.budget, "seeds": args.seeds, "count": args.count, "steps": args.steps,
              "load_before": load, "load_after": after, "results": results}
    (args.out / "convergence.json").write_text(json.dumps(record, indent=1) + "\n")
    plot(results, args.out / "convergence.png")
    print(f"wrote {args.out / 'convergence.json'} and {args.out / 'convergence.png'}")


if __name__ == "__main__":
    main()

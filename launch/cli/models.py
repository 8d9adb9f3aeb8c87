"""``dimsum models [--json]``: every registry entry with its parameter count and analytic GMACs.

Counts are exact (the model is built on the meta device) and taken at 256 px with 1000 classes, the
setting in which published numbers are quoted.
"""

from __future__ import annotations

import argparse
import json

from dimsum.models import REGISTRY, count_parameters, forward_gmacs, model_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def model_rows() -> list[dict]:
    rows = []
    for name in REGISTRY:
        cfg = model_config(name, input_size=32, num_classes=1000)
        rows.append({"name": name, "family": cfg.family, "depth": cfg.depth, "hidden_size": cfg.hidden_size,
                     "patch_size": cfg.patch_size, "params": count_parameters(cfg),
                     "gmacs_256px": round(forward_gmacs(cfg), 2)})
    return rows


def run(args: argparse.Namespace) -> int:
    rows = model_rows()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    name_width = max(len(r["name"]) for r in rows) + 2
    print(f"{'model':<{name_width}}{'depth':>6}{'width':>7}{'patch':>6}{'params':>15}{'GMACs@256':>11}")
    for r in rows:
        print(f"{r['name']:<{name_width}}{r['depth']:>6}{r['hidden_size']:>7}{r['patch_size']:>6}"
              f"{r['params']:>15,}{r['gmacs_256px']:>11.2f}")
    return 0

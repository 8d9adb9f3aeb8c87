"""``dimsum``: the one console script. Subcommands are registered in :data:`COMMANDS` only.

Each command module exposes ``add_arguments(parser)`` and ``run(args) -> int``. Modules are imported
only when their command runs, so ``dimsum --help`` starts instantly and a broken optional dependency
only affects the command that needs it.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from dimsum.config import ConfigError
from dimsum.errors import UserError

COMMANDS: dict[str, tuple[str, str]] = {
    "models": ("launch.commands.models", "list the model registry with parameter counts and GFLOPs"),
    "config": ("launch.commands.config", "show or save a resolved experiment config"),
    "prepare": ("data_pipeline.prepare", "images to SD-VAE latent shards (--demo digits: pixel shards)"),
    "data": ("data_pipeline.verify", "'data verify SHARDS_DIR': check every shard against its manifest"),
    "sample": ("launch.sample", "images or latents from a model (exported, released or a run), with CFG"),
    "eval": ("launch.evaluate", "'eval fid SAMPLES --ref REF': FID against cached reference statistics"),
    "train": ("launch.trainer", "train or auto-resume an experiment (DeepSpeed ZeRO, a process per device)"),
    "export": ("launch.export", "a run's EMA (or --raw) weights as one safetensors file + config YAML"),
    "submit": ("launch.submit", "submit a training run to SLURM via submitit (validated first)"),
    "demo": ("launch.demo", "the CPU demo: digits shards, 2-rank DeepSpeed training, EMA grid, MLflow"),
}


def _top_level_help() -> str:
    width = max(len(name) for name in COMMANDS)
    rows = "\n".join(f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items())
    return (f"usage: dimsum <command> [options]\n\nDiMSUM training service.\n\ncommands:\n{rows}\n\n"
            "Run 'dimsum <command> --help' for a command's options.")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_top_level_help())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"dimsum: unknown command {name!r}; choose from: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module_path, text = COMMANDS[name]
    module = importlib.import_module(module_path)
    parser = argparse.ArgumentParser(prog=f"dimsum {name}", description=text)
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    try:
        return int(module.run(args) or 0)
    except ConfigError as err:
        print(f"dimsum {name}: config error: {err}", file=sys.stderr)
        return 2
    except UserError as err:
        print(f"dimsum {name}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""``dimsum``: the one console script. Subcommands are registered in :data:`COMMANDS` only.

Each command module exposes ``add_arguments(parser)`` and ``run(args) -> int``. Modules are imported
only when their command runs, so ``dimsum --help`` starts instantly and a broken optional dependency
only affects the command that needs it.

The error funnel: a user mistake (:class:`~dimsum.errors.UserError`: config, data, paths, weights) or an
OS error naming a file (permission denied, no space, not a directory) prints ONE line,
``dimsum <command>: <what is wrong, and where>``, and exits with :data:`USER_ERROR_EXIT` (2). Under a
multi-process launcher a config error is printed by rank 0 only (every rank reads the same config) and
other errors carry their rank. Anything else is our bug and keeps its traceback. A command module may
name its own ``INPUT_ERRORS`` with ``INPUT_ERROR_EXIT`` (``sample`` and ``eval``: exit code 1; ``data
verify`` reports its findings itself, also with 1). This is the only place that turns an error into a line.

Each module in this package is argparse and printing only; the work is done in ``launch.train``,
``launch.generate``, ``launch.cluster`` and ``data_pipeline``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from types import ModuleType

from dimsum.config import ConfigError
from dimsum.errors import UserError

USER_ERROR_EXIT = 2

COMMANDS: dict[str, tuple[str, str]] = {
    "models": ("launch.cli.models", "list the model registry with parameter counts and GFLOPs"),
    "config": ("launch.cli.config", "show or save a resolved experiment config"),
    "prepare": ("data_pipeline.prepare", "images to SD-VAE latent shards (--demo digits: pixel shards)"),
    "data": ("data_pipeline.verify", "'data verify SHARDS_DIR': check every shard against its manifest"),
    "sample": ("launch.cli.sample", "images or latents from a model (exported, released or a run), with CFG"),
    "eval": ("launch.cli.eval", "'eval fid SAMPLES --ref REF': FID; 'eval digits RUN_OR_WEIGHTS': digits "
             "accuracy and FD"),
    "train": ("launch.cli.train",
              "train or auto-resume an experiment (DeepSpeed ZeRO, a process per device)"),
    "export": ("launch.cli.export", "a run's EMA (or --raw) weights as one safetensors file + config YAML"),
    "submit": ("launch.cli.submit", "submit a training run to SLURM via submitit (validated first)"),
    "demo": ("launch.cli.demo", "the CPU demo: digits shards, 2-rank DeepSpeed training, EMA grid, MLflow"),
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
    if "TORCHELASTIC_RUN_ID" in os.environ:  # a torchrun rank; imported only then: it loads torch
        from launch.train.distributed import die_with_launcher

        die_with_launcher()
    module_path, text = COMMANDS[name]
    module = importlib.import_module(module_path)
    parser = argparse.ArgumentParser(prog=f"dimsum {name}", description=text)
    module.add_arguments(parser)
    return _run(module, parser.parse_args(rest), name)


def _run(module: ModuleType, args: argparse.Namespace, name: str) -> int:
    """The error funnel (module docstring)."""
    label = module.label(args) if hasattr(module, "label") else name
    try:
        return int(module.run(args) or 0)
    except getattr(module, "INPUT_ERRORS", ()) as err:
        _one_line(label, str(err))
        return module.INPUT_ERROR_EXIT
    except ConfigError as err:
        if os.environ.get("RANK", "0") == "0":
            _one_line(label, f"config error: {err}", name_rank=False)
        return USER_ERROR_EXIT
    except UserError as err:
        _one_line(label, str(err))
        return USER_ERROR_EXIT
    except OSError as err:
        if err.filename is None:
            raise
        _one_line(label, f"{err.strerror or err}: {err.filename}")
        return USER_ERROR_EXIT


def _one_line(command: str, message: str, *, name_rank: bool = True) -> None:
    multi = name_rank and int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank = f"rank {os.environ.get('RANK', '?')}: " if multi else ""
    print(f"dimsum {command}: {rank}{' '.join(message.split())}", file=sys.stderr, flush=True)


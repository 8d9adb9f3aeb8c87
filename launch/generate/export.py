"""``dimsum export RUN [--step N] [--raw] [--out FILE]``: one safetensors file from a run's checkpoint.

The file holds our state-dict keys, fp32, with the model config and the objective (JSON) in its metadata, and
the run's resolved config YAML is written beside it: exactly what ``dimsum sample`` reads. The EMA is the
default (the weights to sample with); ``--raw`` exports the trained fp32 master weights instead.
The run's checkpoint is read by :mod:`launch.generate.weights` (only verified checkpoints; without
``--step`` the newest intact one).
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from dimsum.errors import UserError
from launch.config import dump_config, saved_config
from launch.generate.weights import CONFIG_METADATA_KEY, OBJECTIVE_METADATA_KEY, checkpoint_dir, step_weights
from launch.train.state import client_state


class ExportError(UserError, ValueError):
    """The run directory or step cannot be exported; the message says which and why."""


def export(run_dir: str | Path, out: str | Path | None = None, step: int | None = None,
           which: str = "ema") -> Path:
    """Write ``out`` (default ``RUN/export/step-NNNNNNN-<which>.safetensors``) and its config YAML."""
    if out is not None and Path(out).is_dir():
        raise ExportError(f"--out: {out} is a directory; expected a .safetensors file path")
    step_dir = checkpoint_dir(run_dir, step)
    model_cfg, state = step_weights(step_dir, which)
    out = Path(out) if out else Path(run_dir) / "export" / f"{step_dir.name}-{which}.safetensors"
    out.parent.mkdir(parents=True, exist_ok=True)
    config = saved_config(client_state(step_dir)["config"])
    metadata = {CONFIG_METADATA_KEY: json.dumps(model_cfg.to_dict()),
                OBJECTIVE_METADATA_KEY: json.dumps(config.objective.to_dict()), "weights": which,
                "step": step_dir.name}
    save_file({k: v.contiguous() for k, v in state.items()}, str(out), metadata=metadata)
    out.with_suffix(".yaml").write_text(dump_config(config))
    return out

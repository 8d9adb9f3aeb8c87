"""The experiment config: components composed from YAML, dotted CLI overrides, one validation pass.

A YAML file may start with ``defaults:``, a list of other files merged first, in order:
``- base`` merges ``base.yaml`` (beside the file) at the root, and ``- model: dimsum_l2`` merges
``model/dimsum_l2.yaml`` under the ``model`` key. The file's own keys come next, then the overrides
(``train.global_batch=704``), whose values are parsed as YAML scalars.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml

from data_pipeline.config import DataConfig
from dimsum.config import Config, ConfigError
from dimsum.models import ModelConfig
from dimsum.models.dimsum.config import DiMSUMConfig


@dataclasses.dataclass
class TrainConfig(Config):
    """Optimisation, objective, schedule of logs/checkpoints/sample grids, and the run's health limits."""

    global_batch: int = 32
    micro_batch: int = 0  # per rank and step; 0 means global_batch / world_size (no accumulation)
    lr: float = 1e-4
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    max_steps: int = 1000
    path: Literal["GVP", "Linear"] = "GVP"
    time_sampling: Literal["uniform", "logit_normal"] = "uniform"
    ema_decay: float = 0.9999
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    log_every: int = 10
    ckpt_every: int = 500
    keep_last: int = 2
    milestone_every: int = 0
    resume: bool = True  # continue from the newest complete checkpoint of the run directory
    sample_every: int = 0  # EMA sample grid from every checkpoint whose step is a multiple (0: never)
    sample_count: int = 64
    sample_steps: int = 50  # Euler steps of the grid's ODE sampler
    sample_cfg_scale: float = 4.0
    max_nonfinite: int = 5

    def validate(self) -> None:
        for field in ("global_batch", "max_steps", "log_every", "ckpt_every", "max_nonfinite", "sample_count",
                      "sample_steps"):
            self.check(getattr(self, field) > 0, field, "expected a positive integer")
        for field in ("micro_batch", "warmup_steps", "milestone_every", "sample_every"):
            self.check(getattr(self, field) >= 0, field, "expected >= 0")
        self.check(self.lr > 0, "lr", "expected > 0")
        self.check(self.weight_decay >= 0, "weight_decay", "expected >= 0")
        self.check(self.grad_clip >= 0, "grad_clip", "expected >= 0 (0 disables clipping)")
        self.check(0.0 <= self.ema_decay < 1.0, "ema_decay", "expected 0 <= decay < 1")
        self.check(self.keep_last >= 2, "keep_last", "expected >= 2 (a newer checkpoint may be half-written)")
        self.check(self.sample_every % self.ckpt_every == 0, "sample_every",
                   f"expected a multiple of ckpt_every={self.ckpt_every} (grids are made from checkpoints)")
        self.check(self.sample_cfg_scale >= 1.0, "sample_cfg_scale", "expected >= 1 (1 disables guidance)")


@dataclasses.dataclass
class DeepSpeedConfig(Config):
    """ZeRO stage plus pass-through DeepSpeed settings (merged into the generated ds_config)."""

    zero_stage: Literal[1, 2, 3] = 2
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class TrackingConfig(Config):
    """MLflow. ``uri: null`` means an embedded sqlite store inside the run directory (or the
    ``MLFLOW_TRACKING_URI`` environment variable when set)."""

    enabled: bool = True
    uri: str | None = None
    experiment: str = "dimsum"
    flush_timeout: float = 30.0  # seconds to deliver the backlog at the end before giving up

    def validate(self) -> None:
        self.check(bool(self.experiment), "experiment", "expected a non-empty MLflow experiment name")
        self.check(self.flush_timeout >= 0, "flush_timeout", "expected >= 0 seconds")


@dataclasses.dataclass
class LaunchConfig(Config):
    """Cluster shape for ``dimsum submit`` and the sbatch recipes."""

    cluster: Literal["slurm", "local", "debug"] = "slurm"
    nodes: int = 1
    gpus_per_node: int = 8
    cpus_per_task: int = 10
    partition: str | None = None
    time: str = "72:00:00"
    max_requeues: int = 20

    def validate(self) -> None:
        for field in ("nodes", "cpus_per_task"):
            self.check(getattr(self, field) > 0, field, "expected a positive integer")
        self.check(self.gpus_per_node >= 0, "gpus_per_node", "expected >= 0")
        self.check(self.max_requeues >= 0, "max_requeues", "expected >= 0")


@dataclasses.dataclass
class ExperimentConfig(Config):
    """Everything one training run needs. ``output_root/name`` is the run directory."""

    name: str = "demo"
    seed: int = 0
    output_root: str = "checkpoints"
    model: ModelConfig = dataclasses.field(default_factory=DiMSUMConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = dataclasses.field(default_factory=DeepSpeedConfig)
    tracking: TrackingConfig = dataclasses.field(default_factory=TrackingConfig)
    launch: LaunchConfig = dataclasses.field(default_factory=LaunchConfig)

    def validate(self) -> None:
        self.check(bool(self.name) and "/" not in self.name, "name", "expected a non-empty name without '/'")

    @property
    def run_dir(self) -> Path:
        return Path(self.output_root) / self.name


class _YAML12Loader(yaml.SafeLoader):
    """PyYAML reads YAML 1.1: ``72:00:00`` becomes the integer 259200 and ``1e-4`` a string.
    Configs are YAML 1.2 in spirit: a SLURM time stays text and an exponent is a float."""


_INT, _FLOAT = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
_YAML12Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (_INT, _FLOAT)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_YAML12Loader.add_implicit_resolver(_INT, re.compile(r"^[-+]?(0|[1-9][0-9_]*)$"), list("-+0123456789"))
_YAML12Loader.add_implicit_resolver(
    _FLOAT,
    re.compile(r"^[-+]?([0-9][0-9_]*\.[0-9_]*|\.[0-9][0-9_]*)([eE][-+]?[0-9]+)?$"
               r"|^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$|^[-+]?\.(inf|Inf|INF)$|^\.(nan|NaN|NAN)$"),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    """YAML with 1.2 number rules (see :class:`_YAML12Loader`)."""
    return yaml.load(text, Loader=_YAML12Loader)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = parse_yaml(path.read_text())
    except FileNotFoundError:
        raise ConfigError("config", str(path), "expected an existing YAML file") from None
    except yaml.YAMLError as err:
        raise ConfigError("config", str(path), f"expected valid YAML ({err})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("config", str(path), "expected a YAML mapping at the top level")
    return data


def deep_merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``; mappings merge key by key, everything else is replaced."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def compose_yaml(path: str | Path) -> dict[str, Any]:
    """Load ``path`` with its ``defaults`` list resolved (recursively, relative to the file)."""
    path = Path(path)
    data = _read_yaml(path)
    defaults = data.pop("defaults", []) or []
    merged: dict[str, Any] = {}
    for entry in defaults:
        if isinstance(entry, str):
            merged = deep_merge(merged, compose_yaml(path.parent / f"{entry}.yaml"))
        elif isinstance(entry, Mapping) and len(entry) == 1:
            (group, name), = entry.items()
            merged = deep_merge(merged, {group: compose_yaml(path.parent / group / f"{name}.yaml")})
        else:
            raise ConfigError(f"{path}:defaults", entry, "expected 'file' or '{group: file}' entries")
    return deep_merge(merged, data)


def apply_overrides(data: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` strings; values are YAML scalars (``704`` is an int, ``abc`` a string)."""
    out = dict(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError("override", item, "expected key.path=value")
        value = parse_yaml(raw) if raw else ""
        patch: Any = value
        for part in reversed(key.split(".")):
            patch = {part: patch}
        out = deep_merge(out, patch)
    return out


def load_config(path: str | Path | None, overrides: Iterable[str] = ()) -> ExperimentConfig:
    """The validated experiment: YAML (with defaults) + dotted overrides. Raises :class:`ConfigError`."""
    data = compose_yaml(path) if path is not None else {}
    return ExperimentConfig.from_dict(apply_overrides(data, overrides))


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML, loadable again by :func:`load_config`."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)

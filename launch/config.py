"""The experiment config: components composed from YAML, dotted CLI overrides, one validation pass.

A YAML file may start with ``defaults:``, a list of other files merged first, in order:
``- base`` merges ``base.yaml`` (beside the file) at the root, and ``- model: dimsum_l2`` merges
``model/dimsum_l2.yaml`` under the ``model`` key. The file's own keys come next, then the overrides
(``train.global_batch=704``), whose values are parsed as YAML scalars.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml

from data_pipeline.config import DataConfig
from dimsum.config import Config, ConfigError
from dimsum.models import ModelConfig
from dimsum.models.dimsum.config import DiMSUMConfig
from launch.components import GridConfig, ObjectiveConfig, QualityConfig, migrate_deprecated


@dataclasses.dataclass
class TrainConfig(Config):
    """Optimisation, schedule of logs and checkpoints, and the run's health limits."""

    global_batch: int = 32
    micro_batch: int = 0  # per rank and step; 0 means global_batch / world_size (no accumulation)
    lr: float = 1e-4
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    max_steps: int = 1000
    ema_decay: float = 0.9999
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    log_every: int = 10
    ckpt_every: int = 500
    keep_last: int = 2
    milestone_every: int = 0
    resume: bool = True  # continue from the newest intact checkpoint of the run directory
    overwrite: bool = False  # with resume=false: delete the run directory's checkpoints and start over
    max_nonfinite: int = 5

    def validate(self) -> None:
        for field in ("global_batch", "max_steps", "log_every", "ckpt_every", "max_nonfinite"):
            self.check(getattr(self, field) > 0, field, "expected a positive integer")
        for field in ("micro_batch", "warmup_steps", "milestone_every"):
            self.check(getattr(self, field) >= 0, field, "expected >= 0")
        for field in ("lr", "weight_decay", "grad_clip", "ema_decay"):
            self.check(math.isfinite(getattr(self, field)), field, "expected a finite number")
        self.check(self.lr > 0, "lr", "expected > 0")
        self.check(self.weight_decay >= 0, "weight_decay", "expected >= 0")
        self.check(self.grad_clip >= 0, "grad_clip", "expected >= 0 (0 disables clipping)")
        self.check(0.0 <= self.ema_decay < 1.0, "ema_decay", "expected 0 <= decay < 1")
        self.check(self.keep_last >= 2, "keep_last", "expected >= 2 (a newer checkpoint may be half-written)")


@dataclasses.dataclass
class DeepSpeedConfig(Config):
    """ZeRO stage plus pass-through DeepSpeed settings (merged into the generated ds_config)."""

    zero_stage: Literal[1, 2, 3] = 2
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def validate(self) -> None:
        """DeepSpeed ignores top-level keys it does not know, so a typo there would go unnoticed."""
        unknown = sorted(str(k) for k in self.extra if k not in DEEPSPEED_TOP_LEVEL_KEYS)
        if unknown:
            warnings.warn(f"deepspeed.extra: DeepSpeed does not know the key(s) {', '.join(unknown)}; "
                          "they will be ignored", stacklevel=2)


# The ds_config top level documented by DeepSpeed 0.19 (deepspeed.ai/docs/config-json).
DEEPSPEED_TOP_LEVEL_KEYS = frozenset({
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "optimizer",
    "scheduler", "fp16", "bf16", "amp", "torch_autocast", "gradient_clipping", "prescale_gradients",
    "gradient_predivide_factor", "gradient_allreduce_op", "sparse_gradients", "zero_optimization",
    "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer", "steps_per_print", "wall_clock_breakdown",
    "dump_state", "memory_breakdown", "flops_profiler", "activation_checkpointing", "aio", "tensorboard",
    "wandb", "csv_monitor", "comet", "comms_logger", "autotuning", "elasticity", "data_efficiency",
    "curriculum_learning", "compression_training", "checkpoint", "data_types", "communication_data_type",
    "seq_parallel_communication_data_type", "disable_allgather", "dataloader_drop_last", "disable_python_gc",
    "log_level", "managed_gradient_accumulation", "use_data_before_expert_parallelism", "eigenvalue",
    "progressive_layer_drop", "pipeline", "sparse_attention", "compile", "nebula", "weight_quantization",
    "hybrid_engine", "graph_harvesting", "timers", "expert_parallel", "vocabulary_size",
})


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
    objective: ObjectiveConfig = dataclasses.field(default_factory=ObjectiveConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    grid: GridConfig = dataclasses.field(default_factory=GridConfig)
    quality: QualityConfig = dataclasses.field(default_factory=QualityConfig)
    deepspeed: DeepSpeedConfig = dataclasses.field(default_factory=DeepSpeedConfig)
    tracking: TrackingConfig = dataclasses.field(default_factory=TrackingConfig)
    launch: LaunchConfig = dataclasses.field(default_factory=LaunchConfig)

    def validate(self) -> None:
        # the run directory is output_root/name, and --fresh deletes it: a name must stay one level down
        unsafe = self.name in ("", ".", "..") or bool(set(self.name) & {"/", "\\", "\0"})
        self.check(not unsafe, "name", "expected a folder name (not '.', '..', and without '/' or '\\')")
        self.check(bool(self.output_root) and "\0" not in self.output_root, "output_root",
                   "expected a non-empty path")
        self.check(0 <= self.seed < 2**63, "seed", "expected an integer in [0, 2**63)")
        root = Path(self.output_root)
        self.check(not (root.exists() and not root.is_dir()), "output_root",
                   "expected a directory (or a path to create); this is an existing file")
        if self.data.streams > self.train.global_batch:
            raise ConfigError("data.streams", self.data.streams, f"expected at most train.global_batch="
                              f"{self.train.global_batch} (every stream feeds each global batch)")
        if self.grid.every % self.train.ckpt_every:
            raise ConfigError("grid.every", self.grid.every, f"expected a multiple of train.ckpt_every="
                              f"{self.train.ckpt_every} (grids are made from checkpoints)")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], path: str = "",
                  renamed: Mapping[str, str] | None = None) -> ExperimentConfig:
        """Old keys (``train.path``, ``train.sample_*``, see :data:`DEPRECATED_KEYS`) are read with a
        warning; an error in a moved value still names the key as it was written (``renamed``: the
        new keys already moved by the caller, and their old names)."""
        data, moved = migrate_deprecated(data)
        renamed = {**(renamed or {}), **moved}
        try:
            return super().from_dict(data, path)
        except ConfigError as err:
            if err.path in renamed:
                raise ConfigError(renamed[err.path], err.value, err.allowed) from None
            raise

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


def _refuse_duplicate_keys(loader: _YAML12Loader, node: yaml.MappingNode, deep: bool = False) -> dict:
    """PyYAML keeps the last of two equal keys: a second ``train:`` section would silently drop the first."""
    seen: set[Any] = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_YAML12Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _refuse_duplicate_keys)
MAX_YAML_NODES = 100_000  # a config has hundreds; anchors can make a few lines expand to billions


def _expanded_size(node: yaml.Node, sizes: dict[int, int]) -> int:
    """How many nodes the document has once every alias is expanded (each anchored node counted once)."""
    if id(node) not in sizes:
        sizes[id(node)] = 1  # a node that contains itself counts once
        children = [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else \
            node.value if isinstance(node, yaml.SequenceNode) else []
        sizes[id(node)] = 1 + sum(_expanded_size(child, sizes) for child in children)
    return sizes[id(node)]


def parse_yaml(text: str) -> Any:
    """YAML with 1.2 number rules (see :class:`_YAML12Loader`), refusing duplicate keys and alias bombs."""
    loader = _YAML12Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if (size := _expanded_size(node, {})) > MAX_YAML_NODES:
            raise yaml.YAMLError(f"expands to {size:,} nodes through anchors and aliases "
                                 f"(more than {MAX_YAML_NODES:,}); is it an alias bomb?")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML error in one line: what is wrong and at which line and column."""
    if isinstance(err, yaml.MarkedYAMLError) and err.problem:
        mark = err.problem_mark or err.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        return f"{err.problem}{where}"
    return " ".join(str(err).split())


def _read_yaml(path: Path) -> dict[str, Any]:
    if path.is_dir():
        raise ConfigError("config", str(path), "expected a YAML file, got a directory")
    try:
        data = parse_yaml(path.read_text())
    except FileNotFoundError:
        raise ConfigError("config", str(path), "expected an existing YAML file") from None
    except UnicodeDecodeError:
        raise ConfigError("config", str(path), "expected a UTF-8 YAML text file, got binary data") from None
    except OSError as err:
        raise ConfigError("config", str(path), f"expected a readable YAML file ({err.strerror})") from None
    except yaml.YAMLError as err:
        raise ConfigError("config", str(path), f"expected valid YAML ({_yaml_problem(err)})") from None
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


def compose_yaml(path: str | Path, _including: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Load ``path`` with its ``defaults`` list resolved (recursively, relative to the file)."""
    path = Path(path)
    if path.resolve() in _including:
        chain = " -> ".join(str(p) for p in (*_including, path.resolve()))
        raise ConfigError(f"{_including[-1]}:defaults", str(path), f"a defaults cycle ({chain})")
    data = _read_yaml(path)
    including = (*_including, path.resolve())
    defaults = data.pop("defaults", []) or []
    if not isinstance(defaults, list):
        raise ConfigError(f"{path}:defaults", defaults, "expected a list of 'file' or '{group: file}'")
    merged: dict[str, Any] = {}
    for entry in defaults:
        if isinstance(entry, str):
            merged = deep_merge(merged, compose_yaml(path.parent / f"{entry}.yaml", including))
        elif isinstance(entry, Mapping) and len(entry) == 1:
            (group, name), = entry.items()
            group_file = path.parent / group / f"{name}.yaml"
            merged = deep_merge(merged, {group: compose_yaml(group_file, including)})
        else:
            raise ConfigError(f"{path}:defaults", entry, "expected 'file' or '{group: file}' entries")
    return deep_merge(merged, migrate_deprecated(data)[0])  # an old key in a file loses to a newer file's


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
    top, renamed = migrate_deprecated(apply_overrides({}, overrides))  # an old key given here still wins
    return ExperimentConfig.from_dict(deep_merge(data, top), renamed=renamed)


def saved_config(data: Mapping[str, Any]) -> ExperimentConfig:
    """A run's saved config (``config.yaml``, a checkpoint's copy); old keys are read without a warning."""
    return ExperimentConfig.from_dict(migrate_deprecated(data, warn=False)[0])


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML, loadable again by :func:`load_config`."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def config_changes(saved: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    """``field: old -> new`` for every leaf that differs between two config dicts (dotted paths)."""
    changes = []
    for key in sorted({*saved, *new}, key=str):
        path = f"{prefix}{key}"
        old, now = saved.get(key, _ABSENT), new.get(key, _ABSENT)
        if isinstance(old, Mapping) and isinstance(now, Mapping):
            changes += config_changes(old, now, f"{path}.")
        elif old != now:
            changes.append(f"{path}: {_show(old)} -> {_show(now)}")
    return changes


_ABSENT = object()


def _show(value: Any) -> str:
    return "(absent)" if value is _ABSENT else repr(value)


def check_resume_config(run_dir: Path, cfg: ExperimentConfig) -> list[str]:
    """Compare the run's saved ``config.yaml`` with the new config before resuming from a checkpoint.

    A changed ``model.*`` field makes the checkpoint unloadable (or, for a scan order, silently wrong), so it
    is refused, naming every such field; other changes (more steps, a new LR) are returned for the log.
    """
    path = run_dir / "config.yaml"
    if not path.is_file():
        return []
    saved = parse_yaml(path.read_text())
    saved = migrate_deprecated(saved, warn=False)[0] if isinstance(saved, Mapping) else {}
    changes = config_changes(saved, cfg.to_dict())
    model = [c for c in changes if c.startswith("model.")]
    if model:
        raise ConfigError("model", cfg.model.name, f"the run {run_dir} was trained with another model; "
                          f"changed since its config.yaml: {'; '.join(model)}. Restore them, or start a new "
                          "experiment name")
    return changes

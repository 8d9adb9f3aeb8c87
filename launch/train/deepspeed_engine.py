"""The DeepSpeed side of training: device/precision choice, the generated ds_config, ``initialize``, and
access to the fp32 master-weight fragments this rank owns.

Precision: the model and DeepSpeed stay fp32 (so the ZeRO partitions ARE fp32 master weights, never bf16
ones) and the trainer runs forward/backward under ``torch.autocast(bfloat16)`` on GPU. The optimizer is
torch's AdamW (``torch_adam``), so nothing is JIT-compiled on CPU.
"""

from __future__ import annotations

import contextlib
import errno
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch.distributed as dist
from torch import Tensor, nn

from dimsum.config import ConfigError
from launch.config import ExperimentConfig, TrainConfig, deep_merge

RESERVED_DS_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                    "optimizer", "gradient_clipping", "bf16", "fp16")


def select_precision(requested: str, device: str) -> str:
    """bf16 autocast on GPU, fp32 on CPU unless asked (CPU bf16 autocast works but is rarely faster)."""
    if requested == "auto":
        return "bf16" if device == "cuda" else "fp32"
    return requested


def batch_layout(train: TrainConfig, world_size: int, keep_micro: int = 0) -> tuple[int, int]:
    """(micro batch per rank, gradient-accumulation steps) for ``train.global_batch`` over ``world_size``.

    ``train.micro_batch`` 0 means ``global_batch / world_size``, except when resuming a run whose
    micro-batch was ``keep_micro``: then the largest micro-batch up to it that fits, so a run resized to
    fewer ranks accumulates instead of needing more memory per device, and a later restart keeps its
    layout (hence its bit-exact resume). An impossible layout is a one-line error listing what would work.
    """
    micro = train.micro_batch or _auto_micro(train.global_batch, world_size, keep_micro)
    if micro < 1 or train.global_batch % (micro * world_size):
        field = "train.micro_batch" if train.micro_batch else "train.global_batch"
        works = _what_works(train.global_batch, world_size)
        raise ConfigError(field, train.micro_batch or train.global_batch,
                          f"global_batch={train.global_batch} must be a multiple of micro_batch x "
                          f"world_size = {micro} x {world_size}; {works}")
    return micro, train.global_batch // (micro * world_size)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _auto_micro(global_batch: int, world_size: int, keep_micro: int) -> int:
    per_rank = global_batch // world_size
    if keep_micro and per_rank and global_batch % world_size == 0:
        return max(d for d in _divisors(per_rank) if d <= keep_micro)
    return per_rank


def _what_works(global_batch: int, world_size: int) -> str:
    if global_batch % world_size == 0:
        micro = ", ".join(map(str, _divisors(global_batch // world_size)))
        return f"micro_batch values that work on {world_size} rank(s): {micro}"
    worlds = ", ".join(map(str, _divisors(global_batch)))
    return (f"{global_batch} samples do not split over {world_size} ranks: world sizes that work: {worlds} "
            f"(or a global_batch that is a multiple of {world_size})")


def deepspeed_config(cfg: ExperimentConfig, world_size: int, layout: tuple[int, int] | None = None,
                     universal: bool = False) -> dict[str, Any]:
    """The ds_config dict: batch layout (``layout`` = (micro, accumulation), default :func:`batch_layout`),
    AdamW, clipping, warm-up, ZeRO stage, plus ``deepspeed.extra``; ``universal`` makes ``load_checkpoint``
    read a world-size-independent copy (launch/train/reshard.py)."""
    train = cfg.train
    micro, accum = layout or batch_layout(train, world_size)
    clashes = [k for k in RESERVED_DS_KEYS if k in cfg.deepspeed.extra]
    if clashes:
        raise ConfigError(f"deepspeed.extra.{clashes[0]}", cfg.deepspeed.extra[clashes[0]],
                          "set by the trainer from train.* (global_batch, micro_batch, lr, grad_clip, "
                          "precision)")
    ds: dict[str, Any] = {
        "train_batch_size": train.global_batch,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": train.grad_clip,
        "optimizer": {"type": "AdamW", "params": {"lr": train.lr, "betas": [0.9, 0.999], "eps": 1e-8,
                                                  "weight_decay": train.weight_decay, "torch_adam": True}},
        "zero_optimization": {"stage": cfg.deepspeed.zero_stage},
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if universal:
        ds["checkpoint"] = {"load_universal": True}
    if train.warmup_steps:
        ds["scheduler"] = {"type": "WarmupLR", "params": {
            "warmup_min_lr": 0.0, "warmup_max_lr": train.lr, "warmup_num_steps": train.warmup_steps,
            "warmup_type": "linear"}}
    return deep_merge(ds, cfg.deepspeed.extra)


def initialize(model: nn.Module, cfg: ExperimentConfig, world_size: int, *,
               layout: tuple[int, int] | None = None, universal: bool = False) -> Any:
    """``deepspeed.initialize`` on ``model`` with :func:`deepspeed_config`; returns the engine."""
    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters()
                                                                     if p.requires_grad],
                                      config=deepspeed_config(cfg, world_size, layout, universal))
    return engine


def master_fragments(engine: Any, state: str = "fp32") -> dict[str, tuple[int, Tensor]]:
    """name -> (offset into the flattened parameter, view of this rank's slice of its fp32 master weight,
    or of an optimizer state of it such as ``exp_avg`` when ``state`` names one).

    ZeRO-1/2 cut the flat fp32 buffer into equal rank partitions, so a parameter may be split between
    ranks or absent from this one (``_hp_mapping`` is None). ZeRO-3 partitions each parameter into
    ``partition_numel()`` elements per rank, the last one padded. Views are re-linked by DeepSpeed after
    ``load_checkpoint``, so call this again after loading.
    """
    optim_state = None if state == "fp32" else state
    frags: dict[str, tuple[int, Tensor]] = {}
    for name, param in engine.module.named_parameters():
        if not param.requires_grad:
            continue  # frozen weights never change; exports take them from the model itself
        if hasattr(param, "ds_id"):
            from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_optimizer_state

            size = param.partition_numel()
            offset = dist.get_rank() * size
            valid = max(0, min(size, param.ds_numel - offset))
            local = (safe_get_local_fp32_param(param) if optim_state is None
                     else safe_get_local_optimizer_state(param, optim_state))
            frags[name] = (offset, local.narrow(0, 0, valid))
        elif getattr(param, "_hp_mapping", None) is not None:
            mapping = param._hp_mapping
            frags[name] = (mapping.lp_fragment_address.start, mapping.get_hp_fragment(optim_state))
    return frags


def parameter_shapes(engine: Any) -> dict[str, list[int]]:
    """Full shapes of every parameter, also under ZeRO-3 (where ``param.shape`` is the empty stub)."""
    return {name: list(getattr(p, "ds_shape", p.shape)) for name, p in engine.module.named_parameters()}


@contextlib.contextmanager
def write_errors_as_oserror(path: str | Path) -> Iterator[None]:
    """``torch.save`` reports a full disk as ``RuntimeError: [enforce fail at inline_container.cc] unexpected
    pos`` (or "file write failed") from its zip writer, not as ``OSError``; turn those into the
    ``OSError`` that the checkpoint manager treats as a failed write."""
    try:
        yield
    except RuntimeError as err:
        if "inline_container" not in str(err) and "file write failed" not in str(err):
            raise
        raise OSError(errno.EIO, f"write failed, the disk may be full ({str(err).splitlines()[0]})",
                      str(path)) from err


def save_checkpoint(engine: Any, path: Path, client_state: dict[str, Any],
                    before_write: Callable[[str], None] = lambda _: None) -> list[Path]:
    """``engine.save_checkpoint`` into ``path``, raising the first ``OSError`` only AFTER DeepSpeed's own
    collectives have run on this rank; returns the files this rank wrote.

    DeepSpeed's save has barriers between file writes. A rank whose write failed (disk full) and that
    raised at once would leave the other ranks waiting there forever; instead its failed writes (and
    rank 0's copy of the recovery scripts into the run directory) are recorded and skipped, the
    collective sequence completes, and the caller's all-ranks vote fails the checkpoint cleanly.
    ``before_write(file)`` is the fault-injection hook used by the tests.
    """
    errors: list[OSError] = []
    written: list[Path] = []
    write, copy_scripts = engine.checkpoint_engine.save, engine._copy_recovery_script

    def guarded(state_dict: dict, path: str) -> None:
        if errors:
            return
        try:
            before_write(path)
            with write_errors_as_oserror(path):
                write(state_dict, path)
            written.append(Path(path))
        except OSError as err:
            errors.append(err)

    def guarded_copy(run_dir: str) -> None:  # rank 0 copies zero_to_fp32.py into the run directory
        if not errors:
            try:
                copy_scripts(run_dir)
            except OSError as err:
                errors.append(err)

    engine.checkpoint_engine.save, engine._copy_recovery_script = guarded, guarded_copy
    try:
        engine.save_checkpoint(str(path.parent), tag=path.name, client_state=client_state, save_latest=False)
    finally:
        del engine.checkpoint_engine.save, engine._copy_recovery_script  # back to the class methods
    if errors:
        raise errors[0]
    return written


def disk_full(path: str) -> OSError:
    """The error a full disk raises, for fault injection."""
    return OSError(errno.ENOSPC, "No space left on device (injected)", path)

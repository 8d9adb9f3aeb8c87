"""Side jobs of the training loop as hooks (composer-style), so ``Trainer.train_step`` is only the step.

Every hook is called on every rank, in list order, at the same points: a hook that works on rank 0 only
ends with ``trainer.collectives.barrier()``, and one that draws random numbers does so inside
``torch.random.fork_rng`` so the training RNG, and with it bit-exact resume, is untouched. A hook may
read the trainer (cfg, rank, world, device, run_dir, state, report, tracker, checkpointer, collectives,
data, log) but changes nothing the step depends on.

To add one: subclass :class:`Hook` (or :class:`AtEachGrid`, for work on each grid's checkpoint), override
the events it needs, and add it in :func:`build_hooks`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from data_pipeline.demo import SOURCE_NAME
from dimsum.config import ConfigError
from launch.generate.grid import ema_model, write_grid
from launch.generate.judge import Judge, load_judge
from launch.generate.quality import not_digits, sample_quality
from launch.train.checkpoint import marker, step_name
from launch.train.faults import Faults
from launch.train.metrics import StepMeter
from launch.train.reshard import remove_copies

if TYPE_CHECKING:
    from launch.train.trainer import Trainer


class Hook:
    """The events of a run; every one is a no-op here."""

    def on_fit_start(self, trainer: Trainer) -> None:
        """After resuming, before the first step of this attempt."""

    def on_step_start(self, trainer: Trainer, step: int) -> None:
        """Step ``step`` (1-based) is about to run."""

    def on_loss(self, trainer: Trainer, step: int, loss: Tensor) -> Tensor:
        """A micro-batch loss of ``step``, before the all-ranks finiteness vote; may replace it."""
        return loss

    def on_step_end(self, trainer: Trainer, step: int) -> None:
        """After the optimizer step and the EMA update; ``trainer.report`` describes the step."""

    def on_save(self, trainer: Trainer, step: int) -> None:
        """The checkpoint of ``step`` is complete on every rank."""

    def on_fit_end(self, trainer: Trainer, stopped: bool) -> None:
        """The loop ended: at ``train.max_steps``, or ``stopped`` by a preemption signal."""


class FaultInjection(Hook):
    """``DIMSUM_FAULTS`` (see faults.py) at the points of the loop; the save faults reach the
    checkpointer through ``faults.save_hook``."""

    def __init__(self, faults: Faults) -> None:
        self.faults = faults

    def on_step_start(self, trainer: Trainer, step: int) -> None:
        self.faults.at_step_start(step)

    def on_loss(self, trainer: Trainer, step: int, loss: Tensor) -> Tensor:
        return loss * float("nan") if self.faults.fires("nan", step) else loss


class ProgressLog(Hook):
    """The progress line and the MLflow metrics, every ``train.log_every`` steps, at the last step and
    when stopping. Averages over ranks and over the steps since the last line, so it is a collective."""

    def __init__(self, trainer: Trainer) -> None:
        cfg = trainer.cfg
        self.meter = StepMeter(cfg.model, cfg.train.global_batch, trainer.world, trainer.device,
                               trainer.out_channels)
        self.loss_sum, self.skipped_logged = 0.0, 0

    def on_step_end(self, trainer: Trainer, step: int) -> None:
        t, report = trainer.cfg.train, trainer.report
        self.meter.add(report.seconds, report.data_seconds)
        self.loss_sum += report.loss
        if step % t.log_every == 0 or step == t.max_steps or report.stop:
            self.log(trainer, step)

    def log(self, trainer: Trainer, step: int) -> None:
        t, data = trainer.cfg.train, trainer.data
        window_skips, self.skipped_logged = data.skipped - self.skipped_logged, data.skipped
        loss, skipped = trainer.collectives.mean([self.loss_sum / max(self.meter.steps, 1),
                                                  float(window_skips)])
        self.loss_sum = 0.0
        rates = self.meter.summary()
        metrics = {"loss": loss, "lr": trainer.engine.get_lr()[0], **rates,
                   "nonfinite_total": float(trainer.state.nonfinite_total),
                   "data_skipped": skipped * trainer.world}
        norm = trainer.engine.get_global_grad_norm()
        if norm is not None:
            metrics["grad_norm"] = float(norm)
        trainer.tracker.log_metrics(metrics, step)
        speed = f"MFU {100 * rates['mfu']:.1f}%" if "mfu" in rates else f"{rates['tflops']:.3f} TFLOP/s"
        eta = self.meter.eta(t.max_steps - step)
        trainer.log(f"step {step}/{t.max_steps} | loss {loss:.4f} | {rates['images_per_s']:.1f} img/s | "
                    f"data {rates['data_wait_pct']:.1f}% | {speed} | eta {eta}")


class RunIdRecorder(Hook):
    """Keeps the MLflow run id in the train state, so the next attempt continues the same run. It is
    known only once the tracking server answered, which may be well after the start."""

    def on_step_end(self, trainer: Trainer, step: int) -> None:
        trainer.state.mlflow_run_id = trainer.tracker.run_id if trainer.rank == 0 else None


class AtEachGrid(Hook):
    """Work on the newest checkpoint every ``grid.every`` steps and at the end, done on rank 0 while the
    others wait at the barrier, inside ``fork_rng`` (the training RNG must not move), and skipped when its
    output for that step already exists (a resumed run). A failure is logged: it must not end a multi-day
    run. Subclasses name the output (:meth:`output`), what the work is (``what``) and do it (:meth:`make`)."""

    what = "work"

    def output(self, trainer: Trainer, step: int) -> Path:
        raise NotImplementedError

    def make(self, trainer: Trainer, step: int) -> None:
        raise NotImplementedError

    def on_save(self, trainer: Trainer, step: int) -> None:
        if step % trainer.cfg.grid.every == 0:
            self.run(trainer)

    def on_fit_end(self, trainer: Trainer, stopped: bool) -> None:
        if not stopped:
            self.run(trainer)

    def run(self, trainer: Trainer) -> None:
        if trainer.rank == 0:
            latest = trainer.checkpointer.latest()
            if latest is not None and not self.output(trainer, latest.step).exists():
                try:
                    with torch.random.fork_rng(devices=[]):
                        self.make(trainer, latest.step)
                except Exception as err:
                    trainer.log(f"{self.what} at step {latest.step} failed: {type(err).__name__}: {err}")
        trainer.collectives.barrier()


class SampleGrid(AtEachGrid):
    """An EMA sample grid, ``RUN/samples/step-NNNNNNN.png``, also an MLflow artifact.

    Cost: rank 0 reads back the checkpoint just written, DeepSpeed's fp32 shards and every rank's EMA
    shard (the path ``dimsum export`` takes, so each grid also proves the checkpoint loads), then samples
    ``grid.count`` images; at XL/2 that is several GB read per grid, so ``grid.every`` should be thousands.
    """

    what = "sample grid"

    def output(self, trainer: Trainer, step: int) -> Path:
        return trainer.run_dir / "samples" / f"{step_name(step)}.png"

    def make(self, trainer: Trainer, step: int) -> None:
        path = write_grid(trainer.run_dir, step, trainer.cfg, trainer.data.manifest, device=trainer.device,
                          log=trainer.log)
        if path is not None:
            trainer.tracker.log_artifact(path, "samples")


class QualityHook(AtEachGrid):
    """The digits quality metrics (``quality:``) as ``quality/accuracy``, ``quality/fd``,
    ``quality/precision`` and ``quality/recall`` in MLflow at every grid, and in
    ``RUN/samples/step-NNNNNNN.quality.json`` beside it (``dimsum demo`` prints them).

    ``quality.count`` samples of the grid's checkpoint (its EMA weights), drawn with the grid's sampler,
    the guidance ``quality.cfg_scale`` and the run's seed, are scored by the digits judge
    (:mod:`launch.generate.quality`). Sampling draws from per-sample generators and the judge trains inside
    ``fork_rng``, so the training RNG is untouched. The judge is loaded (or trained, seconds) at the first
    grid and kept. Data the judge cannot score are refused at the start, not at the first grid.
    """

    what = "quality"
    names = ("accuracy", "fd", "precision", "recall")

    def __init__(self) -> None:
        self.judge: Judge | None = None

    def on_fit_start(self, trainer: Trainer) -> None:
        """Refuse data the judge cannot score before the first step (every rank reads the same manifest)."""
        manifest = trainer.data.manifest
        source = (manifest.get("source") or {}).get("name")
        if source != SOURCE_NAME or manifest.get("space") != "pixels":
            raise ConfigError("quality.enabled", True, "the digits judge only scores runs on the digits "
                              f"demo data ('dimsum prepare --demo digits'); {trainer.cfg.data.shards} holds "
                              f"{source or 'unnamed'} {manifest.get('space')} data")
        problem = not_digits(trainer.cfg.model)
        if problem:
            raise ConfigError("quality.enabled", True, problem)

    def output(self, trainer: Trainer, step: int) -> Path:
        return trainer.run_dir / "samples" / f"{step_name(step)}.quality.json"

    def make(self, trainer: Trainer, step: int) -> None:
        cfg = trainer.cfg
        if self.judge is None:
            self.judge = load_judge(cfg.quality.cache_dir, log=trainer.log)
            trainer.log(f"digits judge: held-out accuracy {100 * self.judge.held_out_accuracy:.1f}% "
                        f"({self.judge.origin})")
        model, objective = ema_model(trainer.run_dir, step, cfg, trainer.device)
        metrics = sample_quality(model, objective, self.judge, count=cfg.quality.count,
                                 sampler=cfg.grid.sampler, cfg_scale=cfg.quality.cfg_scale, seed=cfg.seed)
        trainer.tracker.log_metrics({f"quality/{k}": metrics[k] for k in self.names if k in metrics}, step)
        path = self.output(trainer, step)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp")
        tmp.write_text(json.dumps({"step": step, **metrics}) + "\n")
        tmp.replace(path)
        shown = ", ".join(f"{k} {metrics[k]:.3f}" for k in self.names if k in metrics)
        trainer.log(f"quality at step {step}: {shown} ({int(metrics['count'])} samples, "
                    f"{cfg.grid.sampler.method} {cfg.grid.sampler.steps} steps, cfg {cfg.quality.cfg_scale})")


class DropUniversalCopy(Hook):
    """After a resize: once the new world size has a checkpoint of its own, rank 0 deletes the
    world-size-independent copy it was resumed from (a preemption right after resuming may "save" the
    resized-from checkpoint, which is already complete: the copy is kept for that one)."""

    def __init__(self) -> None:
        self.done = False

    def on_save(self, trainer: Trainer, step: int) -> None:
        if self.done or marker(trainer.checkpointer.manager.step_dir(step))["world_size"] != trainer.world:
            return
        if trainer.rank == 0:
            remove_copies(trainer.run_dir, trainer.log)
        trainer.collectives.barrier()
        self.done = True


def build_hooks(trainer: Trainer, faults: Faults) -> list[Hook]:
    """The hooks of a run, in calling order: the one place a new hook is registered."""
    hooks: list[Hook] = [FaultInjection(faults), ProgressLog(trainer), RunIdRecorder()]
    if trainer.cfg.grid.every:
        hooks.append(SampleGrid())
    if trainer.cfg.grid.every and trainer.cfg.quality.enabled:
        hooks.append(QualityHook())
    if trainer.resize is not None:
        hooks.append(DropUniversalCopy())
    return hooks

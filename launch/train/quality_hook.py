"""The digits quality metrics as a trainer hook: ``quality/accuracy``, ``quality/fd``, ``quality/precision``
and ``quality/recall`` in MLflow at every sample grid, so a run shows quality curves beside its loss.

On rank 0, from the checkpoint the grid is drawn from (its EMA weights), with the grid's sampler, the
guidance ``quality.cfg_scale`` and the run's seed, ``quality.count`` samples are scored by the digits judge
(:mod:`launch.generate.quality`); the others wait at the barrier. Everything random runs inside
``torch.random.fork_rng``, and sampling draws from per-sample generators, so the training RNG and with it
bit-exact resume are untouched. The figures are also written to ``RUN/samples/step-NNNNNNN.quality.json``
beside the grid (``dimsum demo`` prints them). The judge is loaded (or trained, seconds) at the first
grid and kept. A failed measurement is logged and the run goes on, as for the grid.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from data_pipeline.demo import SOURCE_NAME
from dimsum.config import ConfigError
from launch.train.checkpoint import step_name
from launch.train.hooks import Hook

if TYPE_CHECKING:
    from launch.generate.judge import Judge
    from launch.train.trainer import Trainer

def quality_file(trainer: Trainer, step: int) -> Path:
    return trainer.run_dir / "samples" / f"{step_name(step)}.quality.json"


class QualityHook(Hook):
    """Scores the newest checkpoint whenever :class:`~launch.train.hooks.SampleGrid` draws a grid."""

    def __init__(self) -> None:
        self.judge: Judge | None = None

    def on_fit_start(self, trainer: Trainer) -> None:
        """Refuse data the judge cannot score before the first step (every rank reads the same manifest)."""
        from launch.generate.quality import not_digits

        manifest = trainer.data.manifest
        source = (manifest.get("source") or {}).get("name")
        if source != SOURCE_NAME or manifest.get("space") != "pixels":
            raise ConfigError("quality.enabled", True, "the digits judge only scores runs on the digits "
                              f"demo data ('dimsum prepare --demo digits'); {trainer.cfg.data.shards} holds "
                              f"{source or 'unnamed'} {manifest.get('space')} data")
        problem = not_digits(trainer.cfg.model)
        if problem:
            raise ConfigError("quality.enabled", True, problem)

    def on_save(self, trainer: Trainer, step: int) -> None:
        if step % trainer.cfg.grid.every == 0:
            self.measure(trainer)

    def on_fit_end(self, trainer: Trainer, stopped: bool) -> None:
        if not stopped:
            self.measure(trainer)

    def measure(self, trainer: Trainer) -> None:
        if trainer.rank == 0:
            latest = trainer.checkpointer.latest()
            if latest is not None and not quality_file(trainer, latest.step).exists():
                try:
                    with torch.random.fork_rng(devices=[]):
                        self.record(trainer, latest.step, self.score(trainer, latest.step))
                except Exception as err:  # as for the grid: a failed measurement must not end the run
                    trainer.log(f"quality at step {latest.step} failed: {type(err).__name__}: {err}")
        trainer.collectives.barrier()

    def score(self, trainer: Trainer, step: int) -> dict[str, float]:
        from launch.generate.grid import ema_model
        from launch.generate.judge import load_judge
        from launch.generate.quality import sample_quality

        cfg = trainer.cfg
        if self.judge is None:
            self.judge = load_judge(cfg.quality.cache_dir, log=trainer.log)
            trainer.log(f"digits judge: held-out accuracy {100 * self.judge.held_out_accuracy:.1f}% "
                        f"({self.judge.origin})")
        model, objective = ema_model(trainer.run_dir, step, cfg, trainer.device)
        return sample_quality(model, objective, self.judge, count=cfg.quality.count, sampler=cfg.grid.sampler,
                              cfg_scale=cfg.quality.cfg_scale, seed=cfg.seed)

    def record(self, trainer: Trainer, step: int, metrics: dict[str, float]) -> None:
        names = ("accuracy", "fd", "precision", "recall")
        trainer.tracker.log_metrics({f"quality/{k}": metrics[k] for k in names if k in metrics}, step)
        path = quality_file(trainer, step)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp")
        tmp.write_text(json.dumps({"step": step, **metrics}) + "\n")
        tmp.replace(path)
        shown = ", ".join(f"{k} {metrics[k]:.3f}" for k in names if k in metrics)
        sampler, scale = trainer.cfg.grid.sampler, trainer.cfg.quality.cfg_scale
        trainer.log(f"quality at step {step}: {shown} ({int(metrics['count'])} samples, "
                    f"{sampler.method} {sampler.steps} steps, cfg {scale})")

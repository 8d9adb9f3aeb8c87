"""``dimsum train CONFIG [key=value ...]``: DiMSUM with DeepSpeed ZeRO, fp32 EMA, atomic checkpoints,
auto-resume, preemption and MLflow. ``run_training(cfg)`` is the same entry for submitit tasks.

One process per device; every rank builds the same model from the same seed and draws its own noise from
a per-rank generator whose state is checkpointed (docs/architecture.md, "Determinism"). A micro-batch with
a non-finite loss on any rank is dropped on all ranks and counted; too many in a row stop the run with the
last good checkpoint intact. Side jobs (progress, tracking, sample grids, faults) are hooks (hooks.py).
"""

from __future__ import annotations

import dataclasses
import os
import socket
import time
import warnings
from typing import Any

import torch
import torch.distributed as dist

from data_pipeline.training_data import TrainingData, build_training_data
from dimsum.config import ConfigError
from dimsum.devices import rank_device, resolve_device
from dimsum.ema import EMA
from dimsum.models import build_model, count_parameters, forward_gmacs
from launch.config import ExperimentConfig, dump_config
from launch.logs import notice_log, progress_log
from launch.train import reshard
from launch.train.checkpoint import Checkpoint, CheckpointManager, mark_ours, marker
from launch.train.checkpointer import Checkpointer, resume_point
from launch.train.collectives import Collectives
from launch.train.deepspeed_engine import (
    batch_layout,
    initialize,
    master_fragments,
    parameter_shapes,
    select_precision,
)
from launch.train.distributed import init_distributed, resolve_env
from launch.train.faults import Faults
from launch.train.hooks import Hook, build_hooks
from launch.train.preemption import REQUEUE_EXIT_CODE, PreemptionFlag
from launch.train.state import CheckpointStates, RNGState, ShardOffsets, TrainState, seed_everything
from launch.train.tracking import flatten, make_tracker, saved_run_id

warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*", category=FutureWarning)  # DeepSpeed's


class NonFiniteLossError(RuntimeError):
    """Too many consecutive non-finite losses; the run stops without touching its checkpoints."""


def check_data_matches_model(cfg: ExperimentConfig, data: TrainingData) -> None:
    channels, height, width = data.latent_shape
    m = cfg.model
    if channels != m.in_channels:
        raise ConfigError("model.in_channels", m.in_channels,
                          f"data {cfg.data.shards} has {channels} channels")
    if height != m.input_size or width != m.input_size:
        raise ConfigError("model.input_size", m.input_size, f"data {cfg.data.shards} is {height}x{width}")
    if m.num_classes > 1 and data.num_classes > m.num_classes:
        raise ConfigError("model.num_classes", m.num_classes, f"data has {data.num_classes} classes")


def attempt_tags(state: TrainState, world_size: int) -> dict[str, str]:
    """Per-attempt facts as MLflow tags (current values, plus one ``attempt.N`` record each)."""
    tags = {"attempt": str(state.attempt), "world_size": str(world_size),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID", "-"),
            "restart_count": os.environ.get("SLURM_RESTART_COUNT", "0"),
            "hosts": os.environ.get("SLURM_JOB_NODELIST", socket.gethostname())}
    tags[f"attempt.{state.attempt}"] = (f"start_step={state.step} job={tags['slurm_job_id']} "
                                       f"restart={tags['restart_count']} hosts={tags['hosts']}")
    return tags


@dataclasses.dataclass
class StepReport:
    """What one optimizer step did, for the hooks."""

    loss: float  # mean over the accumulated micro-batches, this rank
    seconds: float
    data_seconds: float  # of which waiting for the loader
    stop: bool  # every rank agreed to stop after it (a preemption signal reached one of them)


class Trainer:
    """Holds the run's pieces; :meth:`fit` is the loop."""

    def __init__(self, cfg: ExperimentConfig) -> None:
        self.cfg, t = cfg, cfg.train
        self.preempt = PreemptionFlag().install()  # early: SLURM may signal while we start up
        self.device = resolve_device(t.device, "train.device")
        self.precision = select_precision(t.precision, self.device)
        batch_layout(t, resolve_env().world_size)  # an impossible batch layout fails before any work
        self.env = init_distributed(self.device)
        self.rank, self.world = self.env.rank, self.env.world_size
        self.collectives = Collectives(rank_device(self.device, self.env.local_rank))  # before any vote
        self.log = progress_log(self.rank)
        self.run_dir = cfg.run_dir
        faults = Faults.from_env(self.rank)
        manager = CheckpointManager(self.run_dir, rank=self.rank, world_size=self.world,
                                    barrier=self.collectives.barrier, all_true=self.collectives.all_true,
                                    keep_last=t.keep_last, milestone_every=t.milestone_every,
                                    log=notice_log("checkpoint"),
                                    facts=lambda: {"micro_batch": self.micro, "accumulation": self.accum,
                                                   "data_streams": self.streams})
        start, self.fallback, self.resize = resume_point(manager, cfg, self.collectives, self.log,
                                                         faults.reshard_hook)
        saved = marker(start.path) if start is not None else {}
        self.micro, self.accum = batch_layout(t, self.world, keep_micro=saved.get("micro_batch", 0))
        # the data order is the job's: kept from its first start whatever the world size now is
        self.streams = (cfg.data.streams or saved.get("data_streams")
                        or cfg.data.job_streams(saved.get("world_size", self.world)))
        if self.streams > t.global_batch:  # explicit values are refused when the config is loaded
            raise ConfigError("data.streams", cfg.data.streams, f"0 means one stream per worker per rank: "
                              f"{self.streams}, more than train.global_batch={t.global_batch}; set it to at "
                              "most that")
        self.data = build_training_data(dataclasses.replace(cfg.data, streams=self.streams),
                                        batch_size=self.micro, global_batch=t.global_batch, seed=cfg.seed,
                                        rank=self.rank, world_size=self.world)
        check_data_matches_model(cfg, self.data)
        self.objective = cfg.objective.build()
        self.out_channels = self.objective.out_channels(cfg.model.in_channels)
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self.engine = initialize(build_model(cfg.model, self.out_channels), cfg, self.world,
                                 layout=(self.micro, self.accum), universal=self.resize is not None)
        self.autocast = torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.precision == "bf16")
        self.fragments = master_fragments(self.engine)
        self.ema = EMA({n: f for n, (_, f) in self.fragments.items()}, t.ema_decay)
        self.state, self.nonfinite_in_a_row = TrainState(), 0
        self.checkpointer = Checkpointer(manager, self.checkpoint_states(), every=t.ckpt_every,
                                         last_step=t.max_steps, before_write=faults.save_hook, log=self.log)
        if start is None:
            seed_everything(cfg.seed, self.rank)
        elif self.resize is not None:
            reshard.restore(self.checkpoint_states(), self.resize, accumulation=self.accum, seed=cfg.seed,
                            rank=self.rank, log=self.log)
        else:
            self.checkpointer.load(start)  # the RNG last
        self.fragments = master_fragments(self.engine)  # DeepSpeed re-links its views after a load
        self.batches = self.data.batches(self.state.data_position)
        self.state.attempt += 1
        run_id = (self.state.mlflow_run_id or saved_run_id(self.run_dir)) if start is not None else None
        self.tracker = make_tracker(enabled=cfg.tracking.enabled, rank=self.rank, uri=cfg.tracking.uri,
                                    experiment=cfg.tracking.experiment, run_dir=self.run_dir, run_id=run_id,
                                    params=flatten(cfg.to_dict()), tags=self.tags(),
                                    flush_timeout=cfg.tracking.flush_timeout, log=self.log)
        self.report = StepReport(0.0, 0.0, 0.0, False)
        self.hooks: list[Hook] = build_hooks(self, faults)
        self.record_run()
        self.banner(start)

    def checkpoint_states(self) -> CheckpointStates:
        """What a checkpoint holds (state.py describes the files)."""
        offsets = ShardOffsets(lambda: {n: off for n, (off, _) in self.fragments.items()}, str(self.run_dir))
        return CheckpointStates(
            engine=self.engine, train=self.state,
            per_rank={"ema": self.ema, "offsets": offsets, "rng": RNGState()},
            facts=lambda: {"world_size": self.world, "config": self.cfg.to_dict(),
                           "param_shapes": parameter_shapes(self.engine), "ema_decay": self.ema.decay})

    def tags(self) -> dict[str, str]:
        tags = attempt_tags(self.state, self.world)
        if self.fallback:
            tags["checkpoint_fallback"] = f"attempt {self.state.attempt}: " + "; ".join(self.fallback)
        if self.resize is not None:
            tags["resized"] = tags[f"resize.{self.state.attempt}"] = self.resize_line()
        return tags

    def resize_line(self) -> str:
        r, batch = self.resize, self.cfg.train.global_batch
        return (f"{r.source.path.name}: {r.world_size} -> {self.world} ranks, global batch {batch} = "
                f"{batch // (r.world_size * r.accumulation)} x {r.world_size} x {r.accumulation} -> "
                f"{self.micro} x {self.world} x {self.accum}; data from global batch "
                f"{self.state.data_position // self.accum}")

    def record_run(self) -> None:
        """Mark the run directory as dimsum's and keep the resolved config beside the checkpoints (the next
        attempt compares against it)."""
        if self.rank == 0:
            mark_ours(self.run_dir)
            (self.run_dir / "config.yaml").write_text(dump_config(self.cfg))

    def banner(self, start: Checkpoint | None) -> None:
        cfg, t = self.cfg, self.cfg.train
        self.log(f"==> experiment {cfg.name}: run dir {self.run_dir}")
        self.log(f"    {self.world} x {self.device}, {self.precision}, ZeRO-{cfg.deepspeed.zero_stage}, "
                 f"seed {cfg.seed}")
        width = self.out_channels
        self.log(f"==> model {cfg.model.name}: {count_parameters(cfg.model, width):,} parameters, "
                 f"{forward_gmacs(cfg.model, width):.3f} GMACs/image forward")
        self.log(f"==> data {self.data.describe()}")
        self.log(f"==> optimisation: global batch {t.global_batch} = {self.micro} x {self.world} ranks x "
                 f"{self.accum} accumulation; AdamW lr {t.lr} wd {t.weight_decay}, warm-up {t.warmup_steps}, "
                 f"clip {t.grad_clip}; objective {cfg.objective.kind} {cfg.objective.options()}; "
                 f"EMA {t.ema_decay}")
        where = f"resumed from {start.path.name}" if start else "fresh start"
        if self.resize is not None:
            self.log(f"==> resized: {self.resize_line()}")
        self.log(f"==> checkpoints every {t.ckpt_every} steps, keep {t.keep_last}; {where} "
                 f"(attempt {self.state.attempt})")
        if cfg.tracking.enabled:
            self.log(f"==> mlflow: {getattr(self.tracker, 'uri', '-')}")

    # ---- the loop --------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        self.call("on_fit_start")
        while self.state.step < self.cfg.train.max_steps and not self.report.stop:
            self.step()
        self.call("on_fit_end", self.report.stop)
        return self.finish(self.report.stop)

    def step(self) -> None:
        """One iteration of the loop: the step, its hooks, and a checkpoint when one is due."""
        self.call("on_step_start", self.state.step + 1)
        self.report = self.train_step()
        self.call("on_step_end", self.state.step)
        if self.checkpointer.after_step(self.state.step, self.report.stop):
            self.call("on_save", self.state.step)

    def call(self, event: str, *args: Any) -> None:
        for hook in self.hooks:
            getattr(hook, event)(self, *args)

    def train_step(self) -> StepReport:
        """One optimizer step (``accum`` good micro-batches) and the EMA update."""
        state = self.state
        began, data_time, done, stop, loss_sum = time.perf_counter(), 0.0, 0, False, 0.0
        while done < self.accum:
            fetched = time.perf_counter()
            x, y = next(self.batches)
            data_time += time.perf_counter() - fetched
            state.data_position += 1
            x = x.to(self.device, non_blocking=True)
            y = None if self.cfg.model.num_classes == 1 else y.to(self.device, non_blocking=True)
            with self.autocast:
                loss = self.objective.loss(self.engine, x, {"y": y}).mean()
            for hook in self.hooks:
                loss = hook.on_loss(self, state.step + 1, loss)
            # two votes in one all-reduce (the step's only collective besides DeepSpeed's): drop this
            # micro-batch if any rank's loss is not finite; stop after this step if any rank was signalled
            bad, stop_flag = self.collectives.max([float(not torch.isfinite(loss)),
                                                   float(self.preempt.requested)])
            stop = stop or bool(stop_flag)
            if bad:
                self.skip_nonfinite()
                continue
            self.nonfinite_in_a_row = 0
            self.engine.backward(loss)
            self.engine.step()
            loss_sum += loss.item()
            done += 1
        state.step += 1
        self.ema.update({n: f for n, (_, f) in self.fragments.items()})
        return StepReport(loss_sum / self.accum, time.perf_counter() - began, data_time, stop)

    def skip_nonfinite(self) -> None:
        """Count a micro-batch every rank dropped; too many in a row end the run."""
        state, limit = self.state, self.cfg.train.max_nonfinite
        self.nonfinite_in_a_row += 1
        state.nonfinite_total += 1
        self.log(f"non-finite loss at step {state.step + 1}: micro-batch dropped "
                 f"({self.nonfinite_in_a_row} in a row, {state.nonfinite_total} in total)")
        if self.nonfinite_in_a_row >= limit:
            raise NonFiniteLossError(
                f"{self.nonfinite_in_a_row} consecutive non-finite losses at step {state.step + 1} "
                f"(train.max_nonfinite={limit}); stopping. The last complete checkpoint "
                f"in {self.run_dir} is intact; lower train.lr or check the data.")

    def finish(self, preempted: bool) -> dict[str, Any]:
        # Before the summary: closing reports undelivered metrics. A preempted attempt is KILLED; the
        # requeued one sets the same run RUNNING again.
        self.tracker.close(status="KILLED" if preempted else "FINISHED")
        summary = {"status": "preempted" if preempted else "finished", "step": self.state.step,
                   "run_dir": str(self.run_dir), "mlflow_run_id": self.tracker.run_id,
                   "exit_code": REQUEUE_EXIT_CODE if preempted else 0,
                   "nonfinite_total": self.state.nonfinite_total}
        if self.cfg.data.on_error == "skip":
            (skipped,) = self.collectives.mean([float(self.data.skipped)])
            summary["data_skipped"] = round(skipped * self.world)
            self.log(f"==> data: {summary['data_skipped']} bad sample(s) skipped on all ranks in this "
                     "attempt (data.on_error=skip)")
        self.log(f"==> {summary['status']} at step {self.state.step}; exit code {summary['exit_code']}")
        return summary

    def close(self) -> None:
        self.batches.close()  # stops the loader's workers now: at interpreter exit nothing would
        self.tracker.close()
        self.preempt.uninstall()
        if dist.is_initialized():
            dist.destroy_process_group()


def run_training(cfg: ExperimentConfig) -> dict[str, Any]:
    """Train (or continue) the experiment; returns a summary with ``status``, ``step``, ``run_dir``,
    ``mlflow_run_id`` and ``exit_code`` (0 finished, 75 = :data:`REQUEUE_EXIT_CODE` saved after a signal)."""
    trainer = Trainer(cfg)
    try:
        return trainer.fit()
    except BaseException:
        trainer.tracker.close(status="FAILED")
        raise
    finally:
        trainer.close()

"""``dimsum train CONFIG [key=value ...]``: DiMSUM with DeepSpeed ZeRO, fp32 EMA, atomic checkpoints,
auto-resume, preemption and MLflow. ``run_training(cfg)`` is the same entry for submitit tasks.

One process per device. Every rank builds the same model from the same seed, then draws its own noise,
times and label dropout from a per-rank seeded default generator, whose state is checkpointed; with the
deterministic loader this makes a resumed run bit-identical to an uninterrupted one. A micro-batch with a
non-finite loss on any rank is dropped on all ranks (no backward, no update) and counted; too many in a
row stop the run with the last good checkpoint intact.
"""

from __future__ import annotations

import json
import math
import os
import socket
import sys
import time
import warnings
from typing import Any

import torch

from data_pipeline.training_data import TrainingData, build_training_data
from dimsum.config import ConfigError
from dimsum.devices import rank_device, resolve_device
from dimsum.ema import EMA
from dimsum.errors import UserError
from dimsum.models import build_model, count_parameters, forward_gmacs
from launch.config import ExperimentConfig, check_resume_config, dump_config
from launch.train import state as resume
from launch.train.checkpoint import (
    MARKER,
    OURS,
    POINTER,
    Checkpoint,
    CheckpointManager,
    RunDirError,
    fully_written,
    is_ours,
    mark_ours,
    remove_ours,
)
from launch.train.collectives import Collectives
from launch.train.deepspeed_engine import (
    batch_layout,
    initialize,
    master_fragments,
    select_precision,
)
from launch.train.distributed import (
    init_distributed,
    resolve_env,
)
from launch.train.faults import Faults
from launch.train.metrics import StepMeter
from launch.train.preemption import REQUEUE_EXIT_CODE, PreemptionFlag
from launch.train.tracking import flatten, make_tracker, saved_run_id

warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*", category=FutureWarning)  # DeepSpeed's


class NonFiniteLossError(RuntimeError):
    """Too many consecutive non-finite losses; the run stops without touching its checkpoints."""


def say(*parts: Any) -> None:
    print(time.strftime("[%H:%M:%S]"), *parts, flush=True)


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


def attempt_tags(state: resume.TrainState, world_size: int) -> dict[str, str]:
    """Per-attempt facts as MLflow tags (current values, plus one ``attempt.N`` record each)."""
    tags = {"attempt": str(state.attempt), "world_size": str(world_size),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID", "-"),
            "restart_count": os.environ.get("SLURM_RESTART_COUNT", "0"),
            "hosts": os.environ.get("SLURM_JOB_NODELIST", socket.gethostname())}
    tags[f"attempt.{state.attempt}"] = (f"start_step={state.step} job={tags['slurm_job_id']} "
                                       f"restart={tags['restart_count']} hosts={tags['hosts']}")
    return tags


class Trainer:
    """Holds the run's pieces; :meth:`fit` is the loop."""

    def __init__(self, cfg: ExperimentConfig) -> None:
        self.cfg, t = cfg, cfg.train
        self.preempt = PreemptionFlag().install()  # early: SLURM may signal while we start up
        self.device = resolve_device(t.device, "train.device")
        self.precision = select_precision(t.precision, self.device)
        world = resolve_env().world_size
        self.micro, self.accum = batch_layout(t, world)  # a bad batch layout fails before any work
        self.env = init_distributed(self.device)
        self.rank, self.world = self.env.rank, self.env.world_size
        self.collectives = Collectives(rank_device(self.device, self.env.local_rank))  # before any vote
        self.log = say if self.rank == 0 else (lambda *_: None)
        self.faults = Faults.from_env(self.rank)
        self.run_dir = cfg.run_dir
        self.ckpt = CheckpointManager(self.run_dir, rank=self.rank, world_size=self.world,
                                      barrier=self.collectives.barrier, all_true=self.collectives.all_true,
                                      keep_last=t.keep_last, milestone_every=t.milestone_every,
                                      log=lambda m: print(f"[checkpoint] {m}", file=sys.stderr, flush=True))
        self.fallback: list[str] = []  # damaged newer checkpoints skipped on resume (rank 0)
        start = self.resume_point()

        self.data = build_training_data(cfg.data, batch_size=self.micro, seed=cfg.seed, rank=self.rank,
                                        world_size=self.world)
        check_data_matches_model(cfg, self.data)
        self.objective = cfg.objective.build()
        self.out_channels = self.objective.out_channels(cfg.model.in_channels)
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self.engine = initialize(build_model(cfg.model, self.out_channels), cfg, self.world)
        self.autocast = torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.precision == "bf16")
        self.loss_sum, self.nonfinite_in_a_row, self.skipped_logged = 0.0, 0, 0
        self.state = resume.TrainState()
        self.ema = EMA({n: f for n, (_, f) in master_fragments(self.engine).items()}, t.ema_decay)
        rank_part = None
        if start is not None:
            self.state, rank_part = resume.load(self.engine, start.path, self.rank)
            self.ema.load_state_dict(rank_part["ema"])
        self.fragments = master_fragments(self.engine)  # DeepSpeed re-links its views after a load
        self.batches = self.data.batches(self.state.data_position)
        if rank_part is None:
            resume.seed_everything(cfg.seed, self.rank)
        else:
            resume.set_rng_state(rank_part["rng"])
        self.state.attempt += 1
        run_id = (self.state.mlflow_run_id or saved_run_id(self.run_dir)) if start is not None else None
        self.tracker = make_tracker(enabled=cfg.tracking.enabled, rank=self.rank, uri=cfg.tracking.uri,
                                    experiment=cfg.tracking.experiment, run_dir=self.run_dir, run_id=run_id,
                                    params=flatten(cfg.to_dict()), tags=self.tags(),
                                    flush_timeout=cfg.tracking.flush_timeout, log=self.log)
        self.meter = StepMeter(cfg.model, t.global_batch, self.world, self.device, self.out_channels)
        self.banner(start)

    def resume_point(self) -> Checkpoint | None:
        """Rank 0's newest intact checkpoint (None: a fresh start it allowed), agreed by all ranks."""
        start, refusal = None, None
        if self.rank == 0:
            try:
                start = self.claim_run_dir()
            except UserError as err:
                refusal = err
        step, refused = self.collectives.max([start.step if start else -1.0, float(refusal is not None)])
        if refusal is not None:
            raise refusal
        if refused:
            raise RunDirError(f"rank 0 refused the run directory {self.run_dir} (see its message)")
        if step < 0:
            return None
        start = Checkpoint(int(step), self.ckpt.step_dir(int(step)))
        for change in check_resume_config(self.run_dir, self.cfg):
            self.log(f"resuming with a changed config: {change}")
        saved_world = json.loads((start.path / MARKER).read_text())["world_size"]
        if saved_world != self.world:
            raise RuntimeError(f"{start.path} was written by {saved_world} ranks but this job has "
                               f"{self.world}: ZeRO shards and the data stream depend on the world size; "
                               f"relaunch with {saved_world} ranks or start a new experiment name")
        return start

    def claim_run_dir(self) -> Checkpoint | None:
        """On rank 0: the checkpoint to resume from, or permission for a fresh start. A fresh start never
        mixes into another run or a foreign folder, and deletes only checkpoints dimsum wrote."""
        t, run_dir = self.cfg.train, self.run_dir
        if t.resume:
            start, self.fallback = self.ckpt.latest_intact()
            if start is not None:
                return start
        if not run_dir.is_dir() or not any(run_dir.iterdir()):
            return None
        if not is_ours(run_dir):
            raise RunDirError(f"{run_dir} is not empty and was not created by dimsum (no {OURS} file); "
                              "choose another name or output_root")
        complete, incomplete = self.ckpt.scan()
        # one incomplete save may be our own first one, killed part-way; more, or a fully written one, is a
        # run whose markers were lost: starting over would delete its checkpoints one by one
        if t.resume and (len(incomplete) > 1 or any(fully_written(c.path, self.world) for c in incomplete)):
            raise RunDirError(f"{run_dir} holds checkpoint directories but none is complete "
                              f"({', '.join(c.path.name for c in incomplete)} have no {MARKER} marker); "
                              "not starting over on top of them: restore the markers, or start over with "
                              "train.resume=false train.overwrite=true")
        if not t.resume:
            if not t.overwrite:
                raise ConfigError("train.resume", False, f"{run_dir} already holds a run; resume it "
                                  "(train.resume=true), choose another name, or start over with "
                                  "train.overwrite=true (deletes its checkpoints)")
            for ckpt in [*complete, *incomplete]:
                remove_ours(ckpt.path, self.ckpt.log)
            (run_dir / POINTER).unlink(missing_ok=True)
            self.log(f"==> train.overwrite: deleted the earlier checkpoints in {run_dir}")
        return None

    def tags(self) -> dict[str, str]:
        tags = attempt_tags(self.state, self.world)
        if self.fallback:
            tags["checkpoint_fallback"] = f"attempt {self.state.attempt}: " + "; ".join(self.fallback)
        return tags

    def banner(self, start: Checkpoint | None) -> None:
        cfg, t = self.cfg, self.cfg.train
        if self.rank == 0:
            mark_ours(self.run_dir)
            (self.run_dir / "config.yaml").write_text(dump_config(cfg))
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
        self.log(f"==> checkpoints every {t.ckpt_every} steps, keep {t.keep_last}; {where} "
                 f"(attempt {self.state.attempt})")
        if cfg.tracking.enabled:
            self.log(f"==> mlflow: {getattr(self.tracker, 'uri', '-')}")

    # ---- the loop --------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        t, state, stop = self.cfg.train, self.state, False
        while state.step < t.max_steps and not stop:
            stop = self.train_step()
            if state.step % t.log_every == 0 or state.step == t.max_steps or stop:
                self.log_progress()
            due = state.step % t.ckpt_every == 0 or state.step == t.max_steps or stop
            if due and not self.save() and state.step == t.max_steps:
                raise RuntimeError(f"the final checkpoint (step {state.step}) could not be written; "
                                   "free space and rerun: it resumes from the last complete one")
        if not stop and self.cfg.grid.every:
            self.sample_grid()
        return self.finish(stop)

    def train_step(self) -> bool:
        """One optimizer step (``accum`` good micro-batches) and the EMA update. Returns True when all
        ranks agreed to stop after it (a preemption signal reached at least one of them)."""
        t, state = self.cfg.train, self.state
        self.faults.at_step_start(state.step + 1)
        began, data_time, done, stop = time.perf_counter(), 0.0, 0, False
        while done < self.accum:
            fetched = time.perf_counter()
            x, y = next(self.batches)
            data_time += time.perf_counter() - fetched
            state.data_position += 1
            x = x.to(self.device, non_blocking=True)
            y = None if self.cfg.model.num_classes == 1 else y.to(self.device, non_blocking=True)
            with self.autocast:
                loss = self.objective.loss(self.engine, x, {"y": y}).mean()
            if self.faults.fires("nan", state.step + 1):
                loss = loss * math.nan
            votes = [float(not torch.isfinite(loss)), float(self.preempt.requested)]
            bad, stop_flag = self.collectives.max(votes)
            stop = stop or bool(stop_flag)
            if bad:
                self.nonfinite_in_a_row += 1
                state.nonfinite_total += 1
                self.log(f"non-finite loss at step {state.step + 1}: micro-batch dropped "
                         f"({self.nonfinite_in_a_row} in a row, {state.nonfinite_total} in total)")
                if self.nonfinite_in_a_row >= t.max_nonfinite:
                    raise NonFiniteLossError(
                        f"{self.nonfinite_in_a_row} consecutive non-finite losses at step {state.step + 1} "
                        f"(train.max_nonfinite={t.max_nonfinite}); stopping. The last complete checkpoint "
                        f"in {self.run_dir} is intact; lower train.lr or check the data.")
                continue
            self.nonfinite_in_a_row = 0
            self.engine.backward(loss)
            self.engine.step()
            self.loss_sum += loss.item() / self.accum
            done += 1
        state.step += 1
        self.ema.update({n: f for n, (_, f) in self.fragments.items()})
        self.meter.add(time.perf_counter() - began, data_time)
        return stop

    def log_progress(self) -> None:
        """Averages over ranks and over the steps since the last line (a collective)."""
        t, step = self.cfg.train, self.state.step
        window_skips, self.skipped_logged = self.data.skipped - self.skipped_logged, self.data.skipped
        loss, skipped = self.collectives.mean([self.loss_sum / max(self.meter.steps, 1), float(window_skips)])
        self.loss_sum = 0.0
        rates = self.meter.summary()
        norm = self.engine.get_global_grad_norm()
        metrics = {"loss": loss, "lr": self.engine.get_lr()[0], **rates,
                   "nonfinite_total": float(self.state.nonfinite_total), "data_skipped": skipped * self.world}
        if norm is not None:
            metrics["grad_norm"] = float(norm)
        self.tracker.log_metrics(metrics, step)
        speed = f"MFU {100 * rates['mfu']:.1f}%" if "mfu" in rates else f"{rates['tflops']:.3f} TFLOP/s"
        self.log(f"step {step}/{t.max_steps} | loss {loss:.4f} | {rates['images_per_s']:.1f} img/s | "
                 f"data {rates['data_wait_pct']:.1f}% | {speed} | eta {self.meter.eta(t.max_steps - step)}")

    def save(self) -> bool:
        state = self.state
        state.mlflow_run_id = self.tracker.run_id if self.rank == 0 else None
        began, written = time.perf_counter(), not (self.ckpt.step_dir(state.step) / MARKER).is_file()
        ok = self.ckpt.save(state.step, lambda path: resume.save(
            self.engine, path, state=state, config=self.cfg.to_dict(), ema=self.ema,
            offsets={n: off for n, (off, _) in self.fragments.items()}, rank=self.rank, world_size=self.world,
            before_write=self.faults.save_hook(state.step)))
        if ok and written:
            self.log(f"saved {self.ckpt.step_dir(state.step)} in {time.perf_counter() - began:.1f} s")
        if ok and self.cfg.grid.every and state.step % self.cfg.grid.every == 0:
            self.sample_grid()
        return ok

    def sample_grid(self) -> None:
        """An EMA sample grid from the newest checkpoint, made on rank 0 (the others wait at the next
        collective); the training RNG is untouched so determinism is preserved."""
        if self.rank == 0:
            from launch.generate.grid import write_grid

            latest = self.ckpt.latest()
            if latest is not None and not (self.run_dir / "samples" / f"{latest.path.name}.png").exists():
                try:
                    with torch.random.fork_rng(devices=[]):
                        path = write_grid(self.run_dir, latest.step, self.cfg, self.data.manifest,
                                          device=self.device, log=self.log)
                except Exception as err:  # a failed grid must not end a multi-day run
                    self.log(f"sample grid at step {latest.step} failed: {type(err).__name__}: {err}")
                    path = None
                if path is not None:
                    self.tracker.log_artifact(path, "samples")
        self.collectives.barrier()

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
        import torch.distributed as dist

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

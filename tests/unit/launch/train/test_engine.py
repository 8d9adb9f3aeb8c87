"""Pure pieces of the training launch: ds_config generation, rank resolution, fault specs, metrics."""

from __future__ import annotations

import os
import signal
import time

import pytest

from dimsum.config import ConfigError
from launch.config import load_config
from launch.train.deepspeed_engine import batch_layout, deepspeed_config, select_precision
from launch.train.distributed import resolve_env, slurm_master_port
from launch.train.faults import Faults, parse
from launch.train.metrics import StepMeter
from launch.train.preemption import REQUEUE_EXIT_CODE, PreemptionFlag


def cfg(*overrides: str):
    return load_config(None, ["model.name=DiMSUM-debug", *overrides])


def test_deepspeed_config_carries_the_recipe() -> None:
    ds = deepspeed_config(cfg("train.global_batch=64", "train.lr=0.0002", "train.grad_clip=2.0",
                              "deepspeed.zero_stage=3", "train.warmup_steps=100",
                              "deepspeed.extra.zero_optimization.overlap_comm=true"), world_size=4)
    layout = (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"])
    assert layout == (64, 16, 1)
    assert ds["gradient_clipping"] == 2.0 and ds["zero_optimization"] == {"stage": 3, "overlap_comm": True}
    adamw = {"lr": 0.0002, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0, "torch_adam": True}
    assert ds["optimizer"] == {"type": "AdamW", "params": adamw}
    assert ds["scheduler"]["params"]["warmup_num_steps"] == 100 and not ds["bf16"]["enabled"]


def test_batch_layout_and_its_errors() -> None:
    assert batch_layout(cfg("train.global_batch=64", "train.micro_batch=8").train, 2) == (8, 4)
    with pytest.raises(ConfigError, match=r"train.global_batch: got 30; .* multiple of micro_batch x"):
        batch_layout(cfg("train.global_batch=30").train, 4)
    with pytest.raises(ConfigError, match=r"train.micro_batch: got 5"):
        batch_layout(cfg("train.global_batch=64", "train.micro_batch=5").train, 2)


def test_extra_may_not_override_what_train_sets() -> None:
    with pytest.raises(ConfigError, match=r"deepspeed.extra.train_batch_size: got 5; set by the trainer"):
        deepspeed_config(cfg("deepspeed.extra.train_batch_size=5"), world_size=1)


def test_precision_defaults() -> None:
    assert select_precision("auto", "cuda") == "bf16" and select_precision("auto", "cpu") == "fp32"
    assert select_precision("bf16", "cpu") == "bf16"


def test_rank_resolution_order() -> None:
    launcher = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "n1",
                "MASTER_PORT": "123", "SLURM_PROCID": "0", "SLURM_NTASKS": "8"}
    env = resolve_env(launcher)
    assert (env.rank, env.local_rank, env.world_size) == (3, 1, 4)
    assert (env.master_addr, env.master_port) == ("n1", 123)
    slurm = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "4242",
             "MASTER_ADDR": "node7"}
    env = resolve_env(slurm)
    assert (env.rank, env.local_rank, env.world_size, env.master_port) == (5, 1, 8, slurm_master_port(4242))
    single = resolve_env({})
    assert (single.rank, single.world_size, single.master_addr) == (0, 1, "127.0.0.1")
    assert single.master_port > 0
    with pytest.raises(RuntimeError, match="MASTER_ADDR is not set"):
        resolve_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"})
    with pytest.raises(RuntimeError, match="RANK='x' is not an integer"):
        resolve_env({"RANK": "x", "WORLD_SIZE": "2"})


def test_fault_specs() -> None:
    faults = Faults("nan@3:1,kill@5,nan@7-:1", rank=1)
    assert [faults.fires("nan", s) for s in (2, 3, 3, 7, 8)] == [False, True, False, True, True]
    assert Faults("nan@3:1", rank=0).faults == []
    assert parse("") == []
    with pytest.raises(ValueError, match="unknown kind"):
        parse("explode@3")
    with pytest.raises(ValueError, match=r"expected kind@N\[-\]\[:rank\]"):
        parse("nan@x")


def test_step_meter_rates() -> None:
    meter = StepMeter(cfg().model, global_batch=64, world_size=2, device="cpu")
    meter.add(step_time=0.5, data_time=0.05)
    meter.add(step_time=0.5, data_time=0.05)
    rates = meter.summary()
    assert rates["images_per_s"] == pytest.approx(128.0)
    assert rates["images_per_s_per_device"] == pytest.approx(64.0)
    assert rates["data_wait_pct"] == pytest.approx(10.0) and "mfu" not in rates  # no agreed CPU peak
    assert rates["tflops"] == pytest.approx(128 * meter.train_flops_per_image / 1e12)
    assert meter.eta(120) == "1m00s" and meter.steps == 0


def test_preemption_flag_only_records_signals_and_restores_handlers() -> None:
    previous = signal.getsignal(signal.SIGUSR2)
    with PreemptionFlag() as flag:
        assert not flag.requested
        os.kill(os.getpid(), signal.SIGUSR2)
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal just adds to the record
        time.sleep(0.01)
        assert flag.requested and flag.received == ["SIGUSR2", "SIGTERM"]
    assert signal.getsignal(signal.SIGUSR2) is previous
    assert REQUEUE_EXIT_CODE == 75

"""The GPU path checked on one GPU, in a few minutes, into one JSON file.

    python -m benchmarks.gpu_check --out gpu_check.json           # needs CUDA (exit 2 without it)
    python -m benchmarks.gpu_check --cpu-dry-run --out dry.json   # the same code at toy sizes on CPU

Sections (each records its own error and the others still run; the file is rewritten after each):

* ``collectives``: ``launch.train.collectives.Collectives`` under a real one-rank NCCL group (no world-size
  shortcut exists), and whether the group rejects a CPU tensor, the crash the module prevents;
* ``scan``: every backend that loads (torch; cuda when the compiled kernels load) against the float64
  loop, forward and every gradient with h0, then time and peak memory of one forward + backward at the
  DiMSUM-L/2 (B 88, D 1024) and XL/2 (B 44, D 1152) shapes, 256 tokens, bf16 inputs as in training;
* ``train_step``: bf16 steps through the real trainer at world size 1 on synthetic latent shards (written
  here, no internet): DiMSUM-L/2 and DiT-L/2 at micro-batch 88, DiMSUM-XL/2 at 44: img/s, TFLOP/s, MFU and
  peak memory, after warm-up steps.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

GPU_SCAN_SHAPES = {"DiMSUM-L/2": (88, 1024), "DiMSUM-XL/2": (44, 1152)}  # (batch, d_inner)
GPU_STEPS = (("DiMSUM-L/2", 88), ("DiT-L/2", 88), ("DiMSUM-XL/2", 44))
TOKENS, STATE = 256, 16
TINY_MODEL = ["model.depth=2", "model.hidden_size=64", "model.attn_heads=4", "model.fusion_heads=4"]


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


# ----------------------------------------------------------------------------- collectives

def check_collectives(device: str, tmp: Path) -> dict[str, Any]:
    import torch.distributed as dist

    from dimsum.devices import rank_device
    from launch.train.collectives import Collectives

    backend = "nccl" if device == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"file://{tmp / 'pg'}", rank=0, world_size=1)
    try:
        coll = Collectives(rank_device(device, torch.cuda.current_device() if device == "cuda" else 0))
        out: dict[str, Any] = {"backend": backend, "device": str(coll.device),
                               "max_ok": coll.max([1.0, -2.0]) == [1.0, -2.0],
                               "mean_ok": coll.mean([3.0, 0.5]) == [3.0, 0.5],
                               "all_true_ok": coll.all_true(True) and not coll.all_true(False)}
        coll.barrier()
        try:
            dist.all_reduce(torch.zeros(1))
            out["cpu_tensor_rejected"] = False
        except RuntimeError as err:
            out["cpu_tensor_rejected"] = True
            out["cpu_tensor_error"] = str(err).splitlines()[0]
        return out
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- scan

def scan_inputs(batch: int, dim: int, length: int, *, dtype: torch.dtype, device: str,
                seed: int = 0) -> dict[str, torch.Tensor]:
    """Mamba-like inputs: A < 0, raw delta around the init, h0 broadcast over the state as in DiMSUM."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    fields = {"u": randn(batch, dim, length), "delta": 0.5 * randn(batch, dim, length) - 2.0,
              "A": -torch.arange(1, STATE + 1, dtype=torch.float64).repeat(dim, 1),
              "B": randn(batch, STATE, length), "C": randn(batch, STATE, length), "D": randn(dim),
              "z": randn(batch, dim, length), "delta_bias": 0.1 * randn(dim),
              "h0": randn(batch, dim, 1).expand(-1, -1, STATE).contiguous()}
    fp32 = ("A", "D", "delta_bias")  # parameters stay fp32 under autocast
    return {k: v.to(device, torch.float32 if k in fp32 else dtype) for k, v in fields.items()}


def forward_backward(fn: Callable[..., torch.Tensor], inputs: dict[str, torch.Tensor]):
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
    y = fn(**leaves, delta_softplus=True)
    weight = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y.backward(weight.to(y.device, y.dtype))
    return y.detach(), {k: v.grad for k, v in leaves.items()}


def scan_accuracy(backend: str, device: str, dims: tuple[int, int, int]) -> dict[str, float]:
    """Largest error relative to the largest reference value, per output and gradient, fp32 inputs."""
    from dimsum.ssm.reference import sequential_scan
    from dimsum.ssm.scan import selective_scan

    reference = forward_backward(sequential_scan, scan_inputs(*dims, dtype=torch.float64, device="cpu"))
    result = forward_backward(lambda **kw: selective_scan(**kw, backend=backend),
                              scan_inputs(*dims, dtype=torch.float32, device=device))
    pairs = {"y": (result[0], reference[0])} | {f"grad_{k}": (result[1][k], reference[1][k])
                                                 for k in reference[1]}
    return {name: float((got.double().cpu() - want).abs().max() / want.abs().max())
            for name, (got, want) in pairs.items()}


def scan_cost(backend: str, device: str, shape: tuple[int, int, int], repeats: int) -> dict[str, Any]:
    """Median forward + backward time and peak memory of one call at ``shape`` = (batch, d_inner, length)."""
    from dimsum.ssm.scan import selective_scan

    inputs = scan_inputs(*shape, dtype=torch.bfloat16, device=device)
    run = lambda: forward_backward(lambda **kw: selective_scan(**kw, backend=backend), inputs)  # noqa: E731
    run()
    reset_peak(device)
    times = []
    for _ in range(repeats):
        synchronize(device)
        began = time.perf_counter()
        run()
        synchronize(device)
        times.append(time.perf_counter() - began)
    return {"ms_per_call": 1000 * statistics.median(times), "peak_memory_gib": peak_gib(device)}


def check_scan(device: str, dry_run: bool) -> dict[str, Any]:
    from dimsum.ssm import scan

    backends = ["torch"]
    missing = scan._cuda_kernels().missing if device == "cuda" else "not on CUDA"
    if not missing:
        backends.append("cuda")
    shapes = {"tiny": (2, 32)} if dry_run else GPU_SCAN_SHAPES
    length = 16 if dry_run else TOKENS
    out: dict[str, Any] = {"backends": backends, "cuda_kernels_missing": missing or None}
    for backend in backends:
        entry: dict[str, Any] = {"accuracy_vs_float64": scan_accuracy(backend, device, (2, 64, length))}
        for model, (batch, dim) in shapes.items():
            entry[model] = scan_cost(backend, device, (batch, dim, length), repeats=2 if dry_run else 5)
        out[backend] = entry
    return out


# ----------------------------------------------------------------------------- training step

def write_latent_shards(out: Path, samples: int, shape: tuple[int, int, int]) -> None:
    """Random fp16 latents with random labels, in the real shard format and manifest."""
    from data_pipeline.manifest import new_manifest, write_json_atomic
    from data_pipeline.shards import ShardWriter

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((samples, *shape), dtype=np.float32)
    labels = rng.integers(0, 1000, samples)
    with ShardWriter(out, 0, 64) as writer:
        writer.add(latents, latents[..., ::-1], labels, [f"synthetic/{i:05d}" for i in range(samples)])
        record = writer.close()
    manifest = new_manifest(shards=[record], skipped=[], latent_shape=shape, store="sample", num_classes=1000,
                            label_map=None, block_size=64, space="latents", vae=None, scaling_factor=1.0,
                            resolution=8 * shape[-1], shard_size=samples, shuffle_seed=0,
                            source={"name": "benchmarks.gpu_check", "layout": "synthetic"})
    write_json_atomic(out / "manifest.json", manifest)


def train_step_figures(name: str, micro: int, device: str, tmp: Path, dry_run: bool) -> dict[str, Any]:
    from launch.config import load_config
    from launch.train.metrics import StepMeter, device_peak_tflops
    from launch.train.trainer import Trainer

    warmup, timed = (1, 2) if dry_run else (2, 5)
    size = 8 if dry_run else 32
    shards = tmp / f"shards-{size}"
    if not (shards / "manifest.json").is_file():
        write_latent_shards(shards, max(512, micro * (warmup + timed + 1)), (4, size, size))
    overrides = [f"model.name={name}", f"model.input_size={size}", "model.num_classes=1000",
                 *(TINY_MODEL if dry_run else []), f"output_root={tmp}",
                 f"name=gpu-check-{name.replace('/', '')}",
                 f"data.shards={shards}", "data.num_workers=2", f"train.global_batch={micro}",
                 f"train.micro_batch={micro}", "train.max_steps=1000000", "grid.every=0",
                 "train.log_every=1000000", "train.resume=false", "tracking.enabled=false",
                 f"train.device={device}", f"train.precision={'bf16' if device == 'cuda' else 'fp32'}"]
    trainer = Trainer(load_config(None, overrides))
    try:
        reset_peak(device)
        for _ in range(warmup):
            trainer.train_step()
        times = []
        for _ in range(timed):
            synchronize(device)
            began = time.perf_counter()
            trainer.train_step()
            synchronize(device)
            times.append(time.perf_counter() - began)
        step = statistics.median(times)
        images_per_s = micro / step
        meter = StepMeter(trainer.cfg.model, micro, 1, device, trainer.out_channels)
        tflops = images_per_s * meter.train_flops_per_image / 1e12
        peak = device_peak_tflops(device)
        return {"micro_batch": micro, "backend": trainer.cfg.model.backend, "step_s": step,
                "images_per_s": images_per_s, "tflops": tflops, "mfu": tflops / peak if peak else None,
                "peak_memory_gib": peak_gib(device), "loss_finite": math.isfinite(trainer.report.loss)}
    finally:
        trainer.close()


def check_train_steps(device: str, tmp: Path, dry_run: bool) -> dict[str, Any]:
    """Each model in its own process: DeepSpeed keeps module-level groups that outlive a destroyed process
    group, and a fresh process also gives each model its own peak-memory figure."""
    steps = (("DiMSUM-S/2", 4), ("DiT-S/2", 4)) if dry_run else GPU_STEPS
    out: dict[str, Any] = {}
    for name, micro in steps:
        result = tmp / f"step-{name.replace('/', '')}.json"
        command = [sys.executable, "-m", "benchmarks.gpu_check", "--one-step", f"{name}:{micro}",
                   "--tmp", str(tmp), "--out", str(result), *(["--cpu-dry-run"] if dry_run else [])]
        began = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        out[name] = json.loads(result.read_text()) if result.is_file() else \
            {"error": f"exit code {done.returncode}", "stderr_tail": done.stderr[-3000:]}
        out[name]["seconds"] = round(time.perf_counter() - began, 1)
    return out


# ----------------------------------------------------------------------------- driver

def guarded(section: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    began = time.perf_counter()
    try:
        result = section()
    except Exception as err:  # one failing section must not hide the others' figures
        result = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc(limit=8)}
    result["seconds"] = round(time.perf_counter() - began, 1)
    return result


def environment(device: str) -> dict[str, Any]:
    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": device}
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
        env["cudnn_conv_fp32_precision"] = torch.backends.cudnn.conv.fp32_precision
    return env


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    parser.add_argument("--cpu-dry-run", action="store_true", help="toy sizes on CPU (a smoke test)")
    parser.add_argument("--one-step", metavar="MODEL:MICRO", help=argparse.SUPPRESS)  # the per-model process
    parser.add_argument("--tmp", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not args.cpu_dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device is visible (torch.cuda.is_available() is False); run it on a GPU "
              "machine, or pass --cpu-dry-run", file=sys.stderr)
        return 2
    device = "cpu" if args.cpu_dry_run else "cuda"
    if args.one_step:
        name, micro = args.one_step.rsplit(":", 1)
        result = guarded(lambda: train_step_figures(name, int(micro), device, args.tmp, args.cpu_dry_run))
        args.out.write_text(json.dumps(result, indent=2))
        return 0
    report: dict[str, Any] = {"environment": environment(device), "dry_run": args.cpu_dry_run}
    with tempfile.TemporaryDirectory(prefix="dimsum-gpu-check-") as tmp:
        sections = {"collectives": lambda: check_collectives(device, Path(tmp)),
                    "scan": lambda: check_scan(device, args.cpu_dry_run),
                    "train_step": lambda: check_train_steps(device, Path(tmp), args.cpu_dry_run)}
        for name, section in sections.items():
            report[name] = guarded(section)
            args.out.write_text(json.dumps(report, indent=2))
            print(f"gpu_check: {name} done in {report[name]['seconds']} s -> {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Throughput, achieved TFLOP/s, MFU and peak memory for the progress line and MLflow.

FLOPs come from the analytic count: ``forward_gmacs(cfg)`` MACs per image for the forward pass, x3 for
forward + backward, x2 FLOPs per MAC. MFU is against the device's dense bf16 peak, looked up by
device name; a GPU not in the table and CPUs (no agreed peak) report TFLOP/s only, never a guessed MFU.
"""

from __future__ import annotations

import functools
import resource
import sys
import warnings

import torch

from dimsum.models import ModelConfig, forward_gmacs

# Dense (no sparsity) bf16 tensor-core peaks from the vendor's data sheets, matched as substrings of
# torch.cuda.get_device_name() in this order, so the more specific names come first ("H100 PCIe" is a
# different part from the SXM "H100 80GB HBM3", and "H100 NVL" from both).
BF16_PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("H800", 989.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
)


def peak_for_name(name: str) -> float | None:
    """The dense bf16 peak in TFLOP/s for a CUDA device name, or None when the name is not known."""
    return next((peak for key, peak in BF16_PEAK_TFLOPS if key in name), None)


@functools.cache
def _note_unknown_device(name: str) -> None:
    warnings.warn(f"no bf16 peak known for '{name}' (launch/train/metrics.py BF16_PEAK_TFLOPS): "
                  f"logging TFLOP/s without MFU", RuntimeWarning, stacklevel=3)


def device_peak_tflops(device: str) -> float | None:
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    peak = peak_for_name(name)
    if peak is None:
        _note_unknown_device(name)
    return peak


def peak_memory_gib(device: str) -> float:
    """Peak allocated accelerator memory, or this process's peak resident size on CPU."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


class StepMeter:
    """Accumulates step and data-wait times between two log lines and turns them into rates."""

    def __init__(self, model_cfg: ModelConfig, global_batch: int, world_size: int, device: str,
                 out_channels: int | None = None) -> None:
        self.train_flops_per_image = 3 * 2 * forward_gmacs(model_cfg, out_channels) * 1e9
        self.global_batch, self.world_size, self.device = global_batch, world_size, device
        self.peak = device_peak_tflops(device)
        self.steps, self.step_time, self.data_time = 0, 0.0, 0.0
        self.avg_step_time: float | None = None

    def add(self, step_time: float, data_time: float) -> None:
        self.steps += 1
        self.step_time += step_time
        self.data_time += data_time

    def summary(self) -> dict[str, float]:
        """Rates since the last call (then reset). Keys are the MLflow metric names."""
        per_step = self.step_time / max(self.steps, 1)
        images_per_s = self.global_batch / per_step if per_step > 0 else 0.0
        tflops = images_per_s * self.train_flops_per_image / 1e12
        out = {"step_time": per_step, "images_per_s": images_per_s,
               "images_per_s_per_device": images_per_s / self.world_size,
               "data_wait_pct": 100.0 * self.data_time / max(self.step_time, 1e-12),
               "tflops": tflops, "peak_memory_gib": peak_memory_gib(self.device)}
        if self.peak:
            out["mfu"] = tflops / self.world_size / self.peak
        if per_step > 0:
            previous = self.avg_step_time
            self.avg_step_time = per_step if previous is None else 0.7 * previous + 0.3 * per_step
        self.steps, self.step_time, self.data_time = 0, 0.0, 0.0
        return out

    def eta(self, steps_left: int) -> str:
        if self.avg_step_time is None:
            return "?"
        seconds = int(steps_left * self.avg_step_time)
        hours, rest = divmod(seconds, 3600)
        return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"

"""The bf16 peak table that MFU is scored against: by device name, never a wrong peak."""

from __future__ import annotations

import pytest

from launch.train.metrics import peak_for_name


@pytest.mark.parametrize(("name", "peak"), [
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A100 80GB PCIe", 312.0),
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.0), ("NVIDIA GH200 480GB", 989.0), ("NVIDIA L40S", 362.0),
])
def test_peak_by_device_name(name: str, peak: float) -> None:
    assert peak_for_name(name) == peak


@pytest.mark.parametrize("name", ["NVIDIA GeForce RTX 4090", "Tesla T4", "AMD Instinct MI300X"])
def test_unknown_devices_get_no_peak(name: str) -> None:
    assert peak_for_name(name) is None

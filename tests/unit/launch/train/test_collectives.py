"""The collectives of the training loop: right values over a real two-process group, every tensor handed
to torch.distributed on the bound device, and no collective tensor built anywhere else in launch/."""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dimsum.devices import rank_device
from launch.train.collectives import Collectives
from tests.support.paths import REPO

# Every torch.distributed call that takes a tensor; only launch/train/collectives.py may make them.
TENSOR_COLLECTIVES = {"all_reduce", "all_gather", "all_gather_into_tensor", "reduce", "reduce_scatter",
                      "reduce_scatter_tensor", "broadcast", "all_to_all", "all_to_all_single", "gather",
                      "scatter", "send", "recv", "isend", "irecv"}


def _rank_main(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """One rank: spy on the real dist.all_reduce (recording each tensor's device, then calling through)."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    devices: list[str] = []
    real_all_reduce = dist.all_reduce

    def spy(tensor, *args, **kwargs):
        devices.append(str(tensor.device))
        return real_all_reduce(tensor, *args, **kwargs)

    dist.all_reduce = spy
    try:
        coll = Collectives(rank_device("cpu", rank))
        result = {"max": coll.max([float(rank), 1.0 - rank, -3.0]), "mean": coll.mean([float(rank), 4.0]),
                  "all_true_mixed": coll.all_true(rank == 0), "all_true_all": coll.all_true(True),
                  "bound": str(coll.device)}
        coll.barrier()
        result["devices"] = devices
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.all_reduce = real_all_reduce
        dist.destroy_process_group()


@pytest.mark.multiprocess
def test_collectives_over_a_real_two_process_group(tmp_path: Path) -> None:
    mp.start_processes(_rank_main, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2,
                       start_method="spawn", join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for res in results:
        assert res["max"] == [1.0, 1.0, -3.0]
        assert res["mean"] == [0.5, 4.0]
        assert res["all_true_mixed"] is False and res["all_true_all"] is True
        # four reductions, each tensor on the bound device: the rule does not rest on a world-size shortcut
        assert res["devices"] == [res["bound"]] * 4


def test_without_a_group_values_pass_through_on_the_bound_device() -> None:
    coll = Collectives("cpu")
    assert coll.max([2.0, -1.0]) == [2.0, -1.0] and coll.mean([3.0]) == [3.0]
    assert coll.all_true(True) and not coll.all_true(False)
    coll.barrier()


def test_rank_device_is_the_local_gpu() -> None:
    assert rank_device("cuda", 3) == torch.device("cuda", 3)
    assert rank_device("cpu", 3) == torch.device("cpu")
    assert rank_device("cuda:1", 3) == torch.device("cuda", 1)  # an explicit index is kept


def _distributed_calls(path: Path) -> list[str]:
    """``dist.X(...)`` / ``torch.distributed.X(...)`` calls of tensor collectives in one file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                node.func.attr in TENSOR_COLLECTIVES:
            owner = ast.unparse(node.func.value)
            if owner in ("dist", "torch.distributed") or owner.endswith("distributed"):
                found.append(f"{path.relative_to(REPO)}:{node.lineno}: {ast.unparse(node.func)}")
    return found


def test_no_collective_tensor_is_built_outside_launch_collectives() -> None:
    files = sorted((REPO / "launch").rglob("*.py"))
    assert REPO / "launch" / "train" / "collectives.py" in files
    offenders = [call for f in files if f.name != "collectives.py" for call in _distributed_calls(f)]
    assert offenders == [], "use launch.train.collectives.Collectives instead: " + "; ".join(offenders)
    assert _distributed_calls(REPO / "launch" / "train" / "collectives.py")  # the check sees the real call


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_collectives_under_a_one_rank_nccl_group(tmp_path: Path) -> None:
    """The crash this module prevents: an NCCL-only group cannot reduce CPU tensors."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        with pytest.raises(RuntimeError):
            dist.all_reduce(torch.zeros(1))
        coll = Collectives(rank_device("cuda", torch.cuda.current_device()))
        assert coll.max([1.0, 2.0]) == [1.0, 2.0] and coll.mean([3.0]) == [3.0] and coll.all_true(True)
        coll.barrier()
    finally:
        dist.destroy_process_group()

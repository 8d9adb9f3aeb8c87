"""The small reductions and votes of the training loop, on the device the process group can reduce.

The rule: every tensor handed to ``torch.distributed`` lives on the engine's device, and this module is the
only place in ``launch/`` that builds one (``tests/unit/launch/train/test_collectives.py`` checks both).
DeepSpeed starts the group with NCCL on GPU, and an NCCL-only group has no CPU backend: a CPU tensor there
fails with "No backend type associated with device type cpu". A collective tensor built anywhere else would
bring that crash back, so callers ask a :class:`Collectives` for the reduction instead of calling
``dist.all_reduce`` themselves.

There is no world-size-1 shortcut: a single-GPU run reduces through its one-rank NCCL group, so the device
rule is exercised by every run that has a group, not only by multi-GPU ones. Without a group (plain unit
tests, the sampler on one device) the values are returned as they are.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class Collectives:
    """Element-wise max/mean over ranks, an all-ranks vote and a barrier, bound to one device.

    Every rank must call the same methods in the same order (they are collectives).
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)

    def _all_reduce(self, values: list[float], op: dist.ReduceOp) -> torch.Tensor:
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        if dist.is_initialized():
            dist.all_reduce(tensor, op=op)
        return tensor

    def max(self, values: list[float]) -> list[float]:
        """Element-wise max: one collective for several flags (any rank's "stop" stops all)."""
        return self._all_reduce(values, dist.ReduceOp.MAX).tolist()

    def mean(self, values: list[float]) -> list[float]:
        tensor = self._all_reduce(values, dist.ReduceOp.SUM)
        return (tensor / (dist.get_world_size() if dist.is_initialized() else 1)).tolist()

    def all_true(self, flag: bool) -> bool:
        """True only when every rank passed True."""
        return self.max([float(not flag)])[0] == 0.0

    def barrier(self) -> None:
        """Every rank waits for all; on NCCL, on this rank's GPU (``device_ids``), not a guessed one."""
        if not dist.is_initialized():
            return
        if self.device.type == "cuda":
            dist.barrier(device_ids=[self.device.index])
        else:
            dist.barrier()

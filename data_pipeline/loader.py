"""The training loader: a deterministic, resumable stream of latent batches read from WebDataset shards.

It keeps the determinism contract of ``training_data.py`` (docs/architecture.md), on which the trainer's
bit-exact resume and its elastic resize rely; the design below says how.

* One global order. The job reads ``G = data.streams`` sample streams (streams.py), whatever its world
  size. Global batch ``g`` (``B`` = train.global_batch samples) is cut into ``G`` lanes: lane ``s`` is
  positions ``[s*B//G, (s+1)*B//G)`` and holds batch ``g`` of stream ``s``. So the samples the whole job
  consumes, in order, are a function of (seed, data config, B, G, g) only: not of the world size, the
  micro-batch or the worker count.
* Rank slices. Rank ``r`` of ``M`` takes positions ``[r*B/M, (r+1)*B/M)`` of every global batch, as
  ``A = B / (micro * M)`` consecutive micro-batches: micro-batch ``k`` of the rank is sub-batch ``k % A``
  of global batch ``k // A``. After a resize the trainer restarts at the next global batch, so no sample is
  replayed or skipped beyond that boundary.
* Read share. A rank reads only the streams of the lanes its slice overlaps: ``G/M`` streams when M
  divides G, one more at each boundary otherwise (the boundary stream is then read by two ranks). Reading
  starts mid-pass after a resume and ends with one pass read ahead, so a rank reads its share of the data
  plus at most two shards per stream (``benchmarks/loader.py --read-amplification`` measures it).
* Workers. DataLoader worker w of W owns every W-th of the rank's streams and writes its rows of
  micro-batch k straight into a shared-memory slot of the batch; the main process takes the batch once
  all W workers reported it (PyTorch hands worker items back round-robin, one per worker per batch).
  The content does not depend on W; an idle worker (W above the rank's stream count) reports empty parts.
* Passes and resume. Samples per shard come from the manifest, so the pass holding any stream position
  is found by cheap RNG draws without reading data; starting at any step reads the current pass and
  discards its consumed part.
* Speed. Shards hold blocks of samples (see shards.py), so no per-sample Python work remains: a pass
  reads each block into reused buffers, picks each row's variant and scatters it to its shuffled
  position; a part of a batch is a slice of the pass. Batches travel in float16 through reused
  shared-memory slots (see _Batches); the main process casts to float32. A background thread reads the
  next pass while rows are cut from the current one. Memory: two passes per stream a worker owns (shard
  size x one latent each, e.g. 2 x 10k x 8 KiB = 160 MiB).
* Checksums. Every pass hashes its shard after reading it and compares the manifest's sha256 (one
  sequential read from the page cache per pass), so a bit flip that still decodes cannot train silently.
  A structural problem found while reading is reported first, being more precise. With ``"skip"`` a
  mismatch is logged once per pass and the shard's rows that pass the per-sample checks are used: the
  digest cannot tell which sample changed.
* Bad data. An unreadable tar, a block with wrong members/shape/dtype, non-finite values or a label
  outside the manifest's range raise :class:`ShardError` naming shard, block key and sample
  (``on_error="raise"``); with ``"skip"`` they are dropped and counted, and the pass is topped up to the
  manifest count with duplicates of its good samples drawn from the pass RNG, so positions, and hence
  resume, stay deterministic. A pass's skip count is attributed to the part of a batch holding its first
  sample, so ``skipped`` is the same with workers, adds up across a resume and, summed, across ranks.
* ``store == "moments"``: the noise of batch g of stream s is seeded by (seed, s, g), drawn whole.

Why not the stock ``wds.WebDataset(..., resampled=True).shuffle(n)`` pipeline: its shard sampler and
shuffle buffer are stateful streams, so reproducing batch k means replaying all k batches before it:
an unbounded cost on resume. The shards stay plain WebDataset tars (any WebDataset reader can stream
them); only the reading order is computed here instead of accumulated.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import signal
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from data_pipeline.config import DataConfig
from data_pipeline.locations import resolve
from data_pipeline.shards import ShardError
from data_pipeline.streams import Stream, StreamPlan, retry_of


@dataclasses.dataclass(frozen=True)
class Part:
    """Rows ``[lo, hi)`` of batch ``g`` of ``stream`` go to rows ``[offset, offset + hi - lo)`` of a batch."""

    stream: int
    g: int
    lo: int
    hi: int
    offset: int


class Layout:
    """Where every row of a rank's micro-batch ``k`` comes from (see the module docstring)."""

    def __init__(self, *, streams: int, global_batch: int, batch_size: int, rank: int,
                 world_size: int) -> None:
        if global_batch % (batch_size * world_size):
            raise ValueError(f"global batch {global_batch} is not a multiple of micro-batch x world size = "
                             f"{batch_size} x {world_size}")
        if streams > global_batch:
            raise ValueError(f"data.streams={streams} exceeds the global batch {global_batch}: every stream "
                             "supplies at least one sample of each global batch")
        self.batch_size, self.streams = batch_size, streams
        self.share = global_batch // world_size
        self.accum = self.share // batch_size
        self.first = rank * self.share
        self.bounds = [s * global_batch // streams for s in range(streams + 1)]
        self.owned = self._streams_between(self.first, self.first + self.share)

    def _streams_between(self, start: int, end: int) -> list[int]:
        return list(range(bisect.bisect_right(self.bounds, start) - 1, bisect.bisect_left(self.bounds, end)))

    def stream_batch(self, stream: int) -> int:
        return self.bounds[stream + 1] - self.bounds[stream]

    def parts(self, k: int) -> list[Part]:
        g, a = divmod(k, self.accum)
        start = self.first + a * self.batch_size
        end = start + self.batch_size
        parts = []
        for s in self._streams_between(start, end):
            lo, hi = max(start, self.bounds[s]), min(end, self.bounds[s + 1])
            parts.append(Part(s, g, lo - self.bounds[s], hi - self.bounds[s], lo - start))
        return parts

    def read_share(self) -> int:
        """Samples per global batch of the streams this rank reads (its share is ``self.share``)."""
        return sum(self.stream_batch(s) for s in self.owned)


class _Batches(torch.utils.data.IterableDataset):
    """From ``start_step`` on, every micro-batch's rows of the streams worker w of W owns (module docstring).

    In a worker, the rows are written into the shared-memory ring ``slots`` (allocated by the main process
    before the workers fork) and only ``(k, skipped, read)`` is sent. A fresh shared-memory tensor per
    batch would cost more than reading the data: its page faults plus the fd hand-over take ~5 ms per 4 MiB
    batch here. Slot reuse is safe because a worker runs at most ``prefetch_factor`` batches ahead of the
    one the main process is copying out, and the ring has ``prefetch_factor + 2`` slots; ``tags`` (one per
    slot and worker) turn any violation into an error instead of silent corruption.
    """

    def __init__(self, plan: StreamPlan, layout: Layout, start_step: int,
                 slots: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> None:
        super().__init__()
        self.plan, self.layout, self.start_step, self.slots = plan, layout, start_step, slots

    def __iter__(self) -> Iterator[tuple[Any, ...] | ShardError]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="dimsum-pass-reader") as reader:
            try:
                yield from self._batches(worker, workers, reader)
            except ShardError as err:
                if info is None:
                    raise
                # Handed over as a batch: the main process raises it as it is. Raised here, DataLoader would
                # re-raise it with the worker's traceback folded into the message.
                yield err

    def _batches(self, worker: int, workers: int, reader: ThreadPoolExecutor) -> Iterator[tuple[Any, ...]]:
        owned = self.layout.owned[worker::workers]
        streams = {s: Stream(self.plan, s, self.layout.stream_batch(s), reader) for s in owned}
        size, read = self.layout.batch_size, 0
        for k in itertools.count(self.start_step):
            if self.slots is None:
                latents = np.empty((size, *self.plan.latent_shape), dtype=np.float32)
                labels = np.empty(size, dtype=np.int64)
            else:
                slot = k % self.slots[0].shape[0]
                self.slots[2][slot, worker] = -1  # invalid while being written
                latents, labels = self.slots[0][slot].numpy(), self.slots[1][slot].numpy()
            skipped = 0
            for part in self.layout.parts(k):
                if part.stream in streams:
                    rows = slice(part.offset, part.offset + part.hi - part.lo)
                    stream = streams[part.stream]
                    skipped += stream.part(part.g, part.lo, part.hi, latents[rows], labels[rows])
            now = sum(stream.read for stream in streams.values())
            if self.slots is None:
                yield torch.from_numpy(latents), torch.from_numpy(labels), skipped, now - read
            else:
                self.slots[2][slot, worker] = k
                yield k, skipped, now - read
            read = now


def _as_is(batch: Any) -> Any:
    return batch


def _ignore_sigterm(_worker: int) -> None:
    """SLURM signals every process of a step. The trainer turns SIGTERM into a collective save; a worker
    killed by it would instead make the main process raise mid-step, and nothing would be saved."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class LatentLoader:
    """Endless ``(latents float32 (B, C, H, W), labels int64 (B,))`` for one rank, from ``start_step`` on.

    ``batch_size`` is the rank's micro-batch; ``global_batch`` (default: micro-batch x world size) the
    samples of one optimizer step of the whole job. Every ``iter()`` starts again at ``start_step``.
    ``skipped`` counts bad samples dropped in the batches yielded so far (``on_error="skip"``), ``read``
    the samples of the shards read for them (read-ahead included). The global torch RNG is never touched,
    so the trainer's RNG stream does not depend on when or how often the loader is (re)built.
    """

    def __init__(self, cfg: DataConfig, *, batch_size: int, seed: int, rank: int, world_size: int,
                 start_step: int = 0, global_batch: int = 0) -> None:
        if batch_size <= 0 or seed < 0 or start_step < 0 or not 0 <= rank < world_size or global_batch < 0:
            raise ValueError(f"LatentLoader: need batch_size > 0, seed >= 0, start_step >= 0, global_batch "
                             f">= 0 and 0 <= rank < world_size; got {batch_size=}, {seed=}, {start_step=}, "
                             f"{rank=}, {world_size=}, {global_batch=}")
        cfg.validate()
        self.cfg, self.start_step, self.skipped, self.read = cfg, start_step, 0, 0
        source = resolve(cfg.shards, cfg.manifest)
        self.manifest = source.read_manifest(retry_of(cfg))
        self.latent_shape = tuple(self.manifest["latent_shape"])
        self.num_classes = int(self.manifest["num_classes"])
        streams = cfg.job_streams(world_size)
        self.layout = Layout(streams=streams, global_batch=global_batch or batch_size * world_size,
                             batch_size=batch_size, rank=rank, world_size=world_size)
        self._plan = StreamPlan(cfg, self.manifest, source.locations(self.manifest), streams=streams,
                                seed=seed)
        self._seed = seed
        if rank == 0 and streams % world_size:
            warnings.warn(f"data.streams={streams} is not a multiple of the world size {world_size}: ranks "
                          "share the streams at their boundaries and read them twice", stacklevel=2)

    def describe(self) -> str:
        m = self.manifest
        return (f"{self.cfg.shards}: {m['num_samples']} samples in {len(m['shards'])} shards, latents "
                f"{self.latent_shape}, {self.num_classes} classes; {self.layout.streams} streams, "
                f"{len(self.layout.owned)} read by this rank")

    def batches(self, start_step: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The TrainingData protocol (training_data.py): batches from ``start_step`` on."""
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}")
        self.start_step = start_step
        return iter(self)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        plan, layout = self._plan, self.layout
        if not self.cfg.num_workers:
            for latents, labels, skipped, read in _Batches(plan, layout, self.start_step):
                self.skipped, self.read = self.skipped + skipped, self.read + read
                yield latents, labels
            return
        workers = self.cfg.num_workers
        dtype = torch.float32 if plan.moments else torch.float16  # samples are stored as fp16: no loss
        ring = self.cfg.prefetch_factor + 2
        slots = (torch.empty((ring, layout.batch_size, *plan.latent_shape), dtype=dtype).share_memory_(),
                 torch.empty((ring, layout.batch_size), dtype=torch.int64).share_memory_(),
                 torch.full((ring, workers), -1, dtype=torch.int64).share_memory_())
        batches = torch.utils.data.DataLoader(
            _Batches(plan, layout, self.start_step, slots), batch_size=None, num_workers=workers,
            prefetch_factor=self.cfg.prefetch_factor, collate_fn=_as_is, worker_init_fn=_ignore_sigterm,
            generator=torch.Generator().manual_seed(self._seed))  # keeps the global torch RNG untouched
        iterator = iter(batches)
        try:
            for k in itertools.count(self.start_step):
                for _ in range(workers):  # one item per worker and batch, in worker order
                    item = next(iterator)
                    if isinstance(item, ShardError):
                        raise item
                    _, skipped, read = item
                    self.skipped, self.read = self.skipped + skipped, self.read + read
                slot = k % ring
                latents = torch.empty(slots[0].shape[1:], pin_memory=torch.cuda.is_available())
                np.copyto(latents.numpy(), slots[0][slot].numpy())  # fp16 -> fp32 in numpy: no thread pool
                labels = slots[1][slot].clone()
                if not bool((slots[2][slot] == k).all()):
                    raise RuntimeError(f"loader slot {slot} was overwritten before batch {k} was copied out: "
                                       "DataLoader prefetching no longer bounds the workers' lead")
                yield latents, labels
        finally:
            # Stop the workers now. After an error the traceback keeps the iterator alive in a reference
            # cycle, and torch's shutdown from the garbage collector then waits 5 s per worker.
            getattr(iterator, "_shutdown_workers", lambda: None)()
            for worker in getattr(iterator, "_workers", []):  # still reading: SIGTERM is ignored (above),
                if worker.is_alive():  # and multiprocessing's exit hook would wait for it forever
                    worker.kill()
                    worker.join()

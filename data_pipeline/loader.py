"""The training loader: a deterministic, resumable stream of latent batches read from WebDataset shards.

It keeps the determinism contract of ``training_data.py`` (docs/architecture.md); the design below says how.

* Streams. A rank reads ``S = cfg.num_streams`` independent streams; batch k is batch ``k // S`` of
  stream ``k % S``. DataLoader worker w of W (W divides S) yields batches start_step + w, + W, + 2W, ...,
  so it owns a fixed set of streams (batching happens in the worker), and PyTorch hands worker batches
  back round-robin starting with worker 0: the main process sees start_step, start_step + 1, ... in order,
  whatever W is. With ``streams`` set explicitly, W can even change between runs.
* Passes (the reseeded segments). A stream is an endless sequence of passes. Pass p reads one whole
  shard, chosen with an RNG seeded by (seed, rank, world_size, stream, p): uniformly among all shards
  when ``resampled`` (ranks and streams differ by seed), otherwise by walking a fresh permutation of the
  stream's own disjoint shard subset each epoch (split per node, then per stream). A second RNG seeded
  the same way orders the pass's samples and picks the flipped or unflipped latent of each. Batches are
  consecutive runs of ``batch_size`` samples of the concatenated passes.
* Resume. Samples per shard come from the manifest, so the pass holding any stream position is found by
  cheap RNG draws without reading data. Starting at any step reads the current pass and discards its
  consumed part: the extra cost is bounded by one shard per stream.
* Speed. Shards hold blocks of samples (see shards.py), so no per-sample Python work remains: a pass
  reads each block into reused buffers, picks each row's variant and scatters it to its shuffled
  position; a batch is a slice of the pass. Workers hand batches over in float16 through reused
  shared-memory slots (see _Batches); the main process casts to float32. A background thread reads
  the next pass while batches are cut from the current one. Memory: two passes per stream a worker
  owns (shard size x one latent each, e.g. 2 x 10k x 8 KiB = 160 MiB).
* Checksums. Every pass hashes its shard after reading it and compares the manifest's sha256 (one
  sequential read from the page cache per pass), so a bit flip that still decodes cannot train silently.
  A structural problem found while reading is reported first, being more precise. With ``"skip"`` a
  mismatch is logged once per pass and the shard's rows that pass the per-sample checks are used: the
  digest cannot tell which sample changed.
* Bad data. An unreadable tar, a block with wrong members/shape/dtype, non-finite values or a label
  outside the manifest's range raise :class:`ShardError` naming shard, block key and sample
  (``on_error="raise"``); with ``"skip"`` they are dropped and counted, and the pass is topped up to the
  manifest count with duplicates of its good samples drawn from the pass RNG, so positions, and hence
  resume, stay deterministic. A pass's skip count is attributed to the batch holding its first sample,
  so ``skipped`` is the same with workers and adds up across a resume.
* ``store == "moments"``: the noise of batch j of a stream is seeded by (seed, rank, world, stream, j).

Why not the stock ``wds.WebDataset(..., resampled=True).shuffle(n)`` pipeline: its shard sampler and
shuffle buffer are stateful streams, so reproducing batch k means replaying all k batches before it:
an unbounded cost on resume. The shards stay plain WebDataset tars (any WebDataset reader can stream
them); only the reading order is computed here instead of accumulated.
"""

from __future__ import annotations

import itertools
import logging
import signal
import warnings
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from data_pipeline.config import DataConfig
from data_pipeline.locations import Retry, ShardReader, is_remote, local_path, resolve
from data_pipeline.shards import ShardError, decode_block

log = logging.getLogger(__name__)
_SHARD, _ORDER, _EPOCH, _NOISE = range(4)  # RNG purposes, the last word of every seed


def _retry(cfg: DataConfig) -> Retry:
    return Retry(attempts=cfg.retries + 1, backoff_s=cfg.retry_backoff_s)


class _Plan:
    """Everything needed to rebuild any stream position; small and picklable (workers get a copy)."""

    def __init__(self, cfg: DataConfig, manifest: dict[str, Any], locations: dict[str, str], *,
                 batch_size: int, seed: int, rank: int, world_size: int) -> None:
        self.where, self.cfg, self.batch_size = cfg.shards, cfg, batch_size
        self.locations, self.retry = locations, _retry(cfg)
        self.words = (seed, rank, world_size)
        self.streams = cfg.num_streams
        self.stored_shape = tuple(manifest["stored_shape"])
        self.latent_shape = tuple(manifest["latent_shape"])
        self.num_classes = manifest["num_classes"]
        self.moments = manifest["store"] == "moments"
        self.scaling_factor = float(manifest["scaling_factor"])
        self.shards = [(e["name"], e["samples"]) for e in manifest["shards"] if e["samples"] > 0]
        self.digests = {e["name"]: e["sha256"] for e in manifest["shards"]}
        if not self.shards:
            raise ShardError(f"{self.where}: the manifest lists no shard with samples")
        missing = [name for name, _ in self.shards
                   if not is_remote(locations[name]) and not local_path(locations[name]).is_file()]
        if missing:  # remote shards are not probed here: a missing one is found when a pass opens it
            raise ShardError(f"{self.where}: {len(missing)} shard(s) listed in manifest.json are "
                             f"missing, e.g. {missing[0]}")
        readers = self.streams * world_size
        if readers > len(self.shards):
            text = (f"{world_size} rank(s) x {self.streams} stream(s) = {readers} readers but only "
                    f"{len(self.shards)} non-empty shard(s) in {self.where}")
            if not cfg.resampled:
                raise ShardError(f"{text}: without resampling each reader needs its own shard; write more, "
                                 "smaller shards (--shard-size) or set data.resampled=true")
            warnings.warn(f"{text}: readers will often read the same shard (in different orders)",
                          stacklevel=3)
        node = list(range(rank, len(self.shards), world_size))
        self.subsets = [node[v::self.streams] for v in range(self.streams)]

    def rng(self, *words: int) -> np.random.Generator:
        return np.random.default_rng([*self.words, *words])

    def shard_of(self, stream: int, p: int) -> int:
        """Index (into ``self.shards``) of the shard read by pass ``p`` of ``stream``."""
        if self.cfg.resampled:
            return int(self.rng(stream, p, _SHARD).integers(len(self.shards)))
        subset = self.subsets[stream]
        epoch, i = divmod(p, len(subset))
        return subset[self.rng(stream, epoch, _EPOCH).permutation(len(subset))[i]]

    def _problem(self, message: str) -> None:
        if self.cfg.on_error == "raise":
            raise ShardError(message + " (data.on_error=skip would skip and count it)")
        log.warning("skipping bad data: %s", message)

    def _readable_blocks(self, reader: ShardReader) -> Iterator[tuple[str, dict[str, bytes]]]:
        try:
            yield from reader
        except ShardError as err:  # unreadable or truncated tar: the blocks before it were yielded
            self._problem(str(err))

    def _check_digest(self, name: str, reader: ShardReader) -> None:
        digest = reader.digest()
        if digest is not None and digest != self.digests[name]:
            self._problem(f"{name}: sha256 {digest[:16]}... does not match the manifest's "
                          f"{self.digests[name][:16]}...: the shard changed after it was written")

    def load_pass(self, stream: int, p: int, shard: int, into: _PassBuffer, tried: int = 0) -> int:
        """Fill ``into`` with pass p of ``stream`` (shard ``shard``) in stream order; return the skip count.

        Rows are scattered straight to their shuffled positions, and all buffers are reused from pass to
        pass: fresh allocations cost as much in page faults as the copies themselves. A shard with no
        usable sample at all (a 404, a bucket object that stays unreadable) is, under ``skip``, replaced
        by the next shard in manifest order, cut or topped up to the same count, so positions still hold.
        """
        latents, labels = into.latents, into.labels
        name, count = self.shards[shard]
        rng = self.rng(stream, p, _ORDER)
        order = rng.permutation(count)  # stream position -> sample (in file order)
        flips = rng.random(count) < 0.5 if self.cfg.random_flip else np.zeros(count, dtype=bool)
        position = np.empty(count, dtype=np.int64)
        position[order] = np.arange(count)
        filled = np.zeros(count, dtype=bool)
        read = 0  # samples of decodable blocks seen so far: indexes flips and positions
        reader = ShardReader(name, self.locations[name], self.retry, reuse_buffers=True)  # rows copied out
        for key, members in self._readable_blocks(reader):
            try:
                block = decode_block(name, key, members, self.stored_shape)
            except ShardError as err:
                self._problem(str(err))
                continue
            n = len(block)
            if read + n > count:
                raise ShardError(f"{name}, key {key}: the shard holds more than the manifest's {count} "
                                 "samples; manifest.json does not describe these shards")
            flip, dest = flips[read:read + n], position[read:read + n]
            if len(into.scratch) < n:
                into.scratch = np.empty_like(block.latent)
            chosen = into.scratch[:n]
            chosen[...] = block.latent
            chosen[flip] = block.latent_flip[flip]
            block_labels = block.labels
            read += n
            if problems := block.row_problems(self.num_classes, chosen):
                for message in problems.values():
                    self._problem(message)
                keep = np.setdiff1d(np.arange(n), list(problems))
                chosen, dest, block_labels = chosen[keep], dest[keep], block_labels[keep]
            latents[dest], labels[dest], filled[dest] = chosen, block_labels, True
        if read < count:
            self._problem(f"{name}: only {read} of the manifest's {count} samples could be read")
        self._check_digest(name, reader)
        holes = np.flatnonzero(~filled)
        if len(holes) == count:
            if tried + 1 >= len(self.shards):
                raise ShardError(f"{name}: no usable sample, and no other shard could stand in; run "
                                 f"'dimsum data verify {self.where}'")
            substitute = (shard + 1) % len(self.shards)
            log.warning("%s has no usable sample: pass %d of stream %d reads %s instead", name, p, stream,
                        self.shards[substitute][0])
            skips = self.load_pass(stream, p, substitute, into, tried + 1)
            got = self.shards[substitute][1]
            if got < count:
                source = rng.integers(got, size=count - got)
                latents[got:count], labels[got:count] = latents[source], labels[source]
            return count + skips
        if len(holes):  # duplicates of good samples, drawn after order and flips so those never shift
            good = np.flatnonzero(filled)
            source = good[rng.integers(len(good), size=len(holes))]
            latents[holes], labels[holes] = latents[source], labels[source]
        return len(holes)


class _PassBuffer:
    """Reused arrays for one pass: latents and labels in stream order, and a per-block scratch."""

    def __init__(self, plan: _Plan) -> None:
        most = max(count for _, count in plan.shards)
        self.latents = np.empty((most, *plan.stored_shape), dtype=np.float16)
        self.labels = np.empty(most, dtype=np.int64)
        self.scratch = np.empty((0, *plan.stored_shape), dtype=np.float16)


class _Stream:
    """One stream's cursor: the current pass, its shard and start position, and the next pass, which a
    background thread reads while batches are cut from the current one (file reads and numpy copies
    release the GIL), so a worker does not stall the round-robin for a whole shard read."""

    def __init__(self, plan: _Plan, index: int, reader: ThreadPoolExecutor) -> None:
        self.plan, self.index, self.reader = plan, index, reader
        self.p, self.start, self.shard = 0, 0, plan.shard_of(index, 0)
        self.current, self.upcoming = _PassBuffer(plan), _PassBuffer(plan)
        self.loaded = False
        self.ahead: tuple[int, Future] | None = None  # (pass, its load into self.upcoming)

    def _next_pass(self) -> None:
        self.start += self.plan.shards[self.shard][1]
        self.p += 1
        self.shard, self.loaded = self.plan.shard_of(self.index, self.p), False

    def _load(self) -> int:
        """Make pass p current (read ahead, or read now) and start reading pass p + 1; return p's skips."""
        skips = None
        if self.ahead is not None:
            p, future = self.ahead
            self.ahead = None
            result = future.result()  # also: self.upcoming may only be reused once this read is over
            if p == self.p:
                self.current, self.upcoming = self.upcoming, self.current
                skips = result
        if skips is None:
            skips = self.plan.load_pass(self.index, self.p, self.shard, self.current)
        self.loaded = True
        nxt = self.p + 1
        self.ahead = nxt, self.reader.submit(self.plan.load_pass, self.index, nxt,
                                             self.plan.shard_of(self.index, nxt), self.upcoming)
        return skips

    def batch(self, j: int, out: np.ndarray) -> tuple[np.ndarray, int]:
        """Write batch j of this stream into ``out`` (B, C, H, W); return its labels and skip count."""
        plan, size = self.plan, self.plan.batch_size
        first, end = j * size, (j + 1) * size
        assert first >= self.start, "streams only move forward"
        rows = np.empty((size, *plan.stored_shape), dtype=np.float32) if plan.moments else out
        labels = np.empty(size, dtype=np.int64)
        skipped, pos = 0, first
        while pos < end:
            count = plan.shards[self.shard][1]
            if pos >= self.start + count:  # a pass that is not needed: only its shard choice is drawn
                self._next_pass()
                continue
            if not self.loaded:
                skips = self._load()
                skipped += skips if self.start >= first else 0
            stop = min(end, self.start + count)
            rows[pos - first:stop - first] = self.current.latents[pos - self.start:stop - self.start]
            labels[pos - first:stop - first] = self.current.labels[pos - self.start:stop - self.start]
            pos = stop
        if plan.moments:
            mean, logvar = np.split(rows, 2, axis=1)
            noise = plan.rng(self.index, j, _NOISE).standard_normal(mean.shape, dtype=np.float32)
            out[...] = plan.scaling_factor * (mean + np.exp(0.5 * logvar) * noise)
        return labels, skipped


class _Batches(torch.utils.data.IterableDataset):
    """Batches start_step + w, + W, ... for worker w of W (see the module docstring).

    In a worker, a batch is written into the worker's ring of shared-memory ``slots`` (allocated by the
    main process before the workers fork) and only ``(slot, step)``, the labels and the skip count are
    sent. A fresh shared-memory tensor per batch would cost more than reading the data: its page faults
    plus the fd hand-over take ~5 ms per 4 MiB batch here. Slot reuse is safe because a worker runs at
    most ``prefetch_factor`` batches ahead of the one the main process is copying out, and the ring has
    ``prefetch_factor + 2`` slots; ``tags`` turn any violation into an error instead of silent corruption.
    """

    def __init__(self, plan: _Plan, start_step: int, slots: torch.Tensor | None = None,
                 tags: torch.Tensor | None = None) -> None:
        super().__init__()
        self.plan, self.start_step, self.slots, self.tags = plan, start_step, slots, tags

    def __iter__(self) -> Iterator[tuple[Any, np.ndarray, int] | ShardError]:
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

    def _batches(self, worker: int, workers: int,
                 reader: ThreadPoolExecutor) -> Iterator[tuple[Any, np.ndarray, int]]:
        streams: dict[int, _Stream] = {}
        for i, k in enumerate(itertools.count(self.start_step + worker, workers)):
            v = k % self.plan.streams
            if v not in streams:
                streams[v] = _Stream(self.plan, v, reader)
            if self.slots is None:
                out = np.empty((self.plan.batch_size, *self.plan.latent_shape), dtype=np.float32)
                yield (torch.from_numpy(out), *streams[v].batch(k // self.plan.streams, out))
                continue
            slot = (worker, i % self.slots.shape[1])
            self.tags[slot] = -1  # invalid while being written
            labels, skipped = streams[v].batch(k // self.plan.streams, self.slots[slot].numpy())
            self.tags[slot] = k
            yield (slot, k), labels, skipped


def _as_is(batch: Any) -> Any:
    return batch


def _ignore_sigterm(_worker: int) -> None:
    """SLURM signals every process of a step. The trainer turns SIGTERM into a collective save; a worker
    killed by it would instead make the main process raise mid-step, and nothing would be saved."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class LatentLoader:
    """Endless ``(latents float32 (B, C, H, W), labels int64 (B,))`` for one rank, from ``start_step`` on.

    Every ``iter()`` starts again at ``start_step``. ``skipped`` counts bad samples dropped in the batches
    yielded so far (``on_error="skip"``). The global torch RNG is never touched, so the trainer's RNG
    stream does not depend on when or how often the loader is (re)built.
    """

    def __init__(self, cfg: DataConfig, *, batch_size: int, seed: int, rank: int, world_size: int,
                 start_step: int = 0) -> None:
        if batch_size <= 0 or seed < 0 or start_step < 0 or not 0 <= rank < world_size:
            raise ValueError(f"LatentLoader: need batch_size > 0, seed >= 0, start_step >= 0 and 0 <= rank < "
                             f"world_size; got {batch_size=}, {seed=}, {start_step=}, {rank=}, {world_size=}")
        cfg.validate()
        self.cfg, self.start_step, self.skipped = cfg, start_step, 0
        source = resolve(cfg.shards, cfg.manifest)
        self.manifest = source.read_manifest(_retry(cfg))
        self.latent_shape = tuple(self.manifest["latent_shape"])
        self.num_classes = int(self.manifest["num_classes"])
        self._plan = _Plan(cfg, self.manifest, source.locations(self.manifest), batch_size=batch_size,
                           seed=seed, rank=rank, world_size=world_size)
        self._seed = seed

    def describe(self) -> str:
        m = self.manifest
        return (f"{self.cfg.shards}: {m['num_samples']} samples in {len(m['shards'])} shards, latents "
                f"{self.latent_shape}, {self.num_classes} classes")

    def batches(self, start_step: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The TrainingData protocol (training_data.py): batches from ``start_step`` on."""
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}")
        self.start_step = start_step
        return iter(self)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if not self.cfg.num_workers:
            for latents, labels, skipped in _Batches(self._plan, self.start_step):
                self.skipped += skipped
                yield latents, torch.from_numpy(labels)
            return
        workers, plan = self.cfg.num_workers, self._plan
        dtype = torch.float32 if plan.moments else torch.float16  # samples are stored as fp16: no loss
        slots = torch.empty((workers, self.cfg.prefetch_factor + 2, plan.batch_size, *plan.latent_shape),
                            dtype=dtype).share_memory_()
        tags = torch.full(slots.shape[:2], -1, dtype=torch.int64).share_memory_()
        batches = torch.utils.data.DataLoader(
            _Batches(plan, self.start_step, slots, tags), batch_size=None, num_workers=workers,
            prefetch_factor=self.cfg.prefetch_factor, collate_fn=_as_is, worker_init_fn=_ignore_sigterm,
            generator=torch.Generator().manual_seed(self._seed))  # keeps the global torch RNG untouched
        iterator = iter(batches)
        try:
            for batch in iterator:
                if isinstance(batch, ShardError):
                    raise batch
                (slot, k), labels, skipped = batch
                latents = torch.empty(slots.shape[2:], pin_memory=torch.cuda.is_available())
                np.copyto(latents.numpy(), slots[slot].numpy())  # fp16 -> fp32 in numpy: no thread pool
                if tags[slot] != k:
                    raise RuntimeError(f"loader slot {slot} was overwritten before batch {k} was copied out: "
                                       "DataLoader prefetching no longer bounds the workers' lead")
                self.skipped += skipped
                yield latents, torch.from_numpy(labels)
        finally:
            # Stop the workers now. After an error the traceback keeps the iterator alive in a reference
            # cycle, and torch's shutdown from the garbage collector then waits 5 s per worker.
            getattr(iterator, "_shutdown_workers", lambda: None)()
            for worker in getattr(iterator, "_workers", []):  # still reading: SIGTERM is ignored (above),
                if worker.is_alive():  # and multiprocessing's exit hook would wait for it forever
                    worker.kill()
                    worker.join()

"""The sample streams the loader cuts batches from: each one an endless, seeded sequence of shard passes.

A job reads ``G`` streams (``data.streams``), numbered 0..G-1 whatever the world size. Stream ``s`` is a
sequence of passes; pass ``p`` reads one whole shard, chosen with an RNG seeded by (seed, s, p): uniformly
among all shards when ``resampled``, otherwise by walking a fresh permutation of the stream's own disjoint
shard subset (``shards[s::G]``) each epoch. A second RNG seeded the same way orders the pass's samples and
picks the flipped or unflipped latent of each. The stream is the concatenation of its passes, and its
batch ``g`` is rows ``[g * b, (g + 1) * b)`` for the stream's fixed batch size ``b`` (see loader.py).

The seeds keep the (rank 0, world size 1) words of the per-rank design this replaced, so a single-rank job
with one stream reads exactly what it read before (older checkpoints resume onto the same samples).

Checksums, bad data and the skip semantics are described in loader.py; this module implements them.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from data_pipeline.config import DataConfig
from data_pipeline.locations import Retry, ShardReader, is_remote, local_path
from data_pipeline.shards import ShardError, decode_block

log = logging.getLogger(__name__)
_SHARD, _ORDER, _EPOCH, _NOISE = range(4)  # RNG purposes, the last word of every seed
_LEGACY_WORDS = (0, 1)  # rank 0 of world size 1: see the module docstring


def retry_of(cfg: DataConfig) -> Retry:
    return Retry(attempts=cfg.retries + 1, backoff_s=cfg.retry_backoff_s)


class StreamPlan:
    """Everything needed to rebuild any stream position; small and picklable (workers get a copy)."""

    def __init__(self, cfg: DataConfig, manifest: dict[str, Any], locations: dict[str, str], *,
                 streams: int, seed: int) -> None:
        self.where, self.cfg, self.streams = cfg.shards, cfg, streams
        self.locations, self.retry = locations, retry_of(cfg)
        self.words = (seed, *_LEGACY_WORDS)
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
        if streams > len(self.shards):
            text = (f"{streams} streams (data.streams) but only {len(self.shards)} non-empty shard(s) in "
                    f"{self.where}")
            if not cfg.resampled:
                raise ShardError(f"{text}: without resampling each stream needs its own shard; write more, "
                                 "smaller shards (--shard-size), lower data.streams or set "
                                 "data.resampled=true")
            warnings.warn(f"{text}: streams will often read the same shard (in different orders)",
                          stacklevel=4)
        self.subsets = [list(range(s, len(self.shards), streams)) for s in range(streams)]

    def rng(self, *words: int) -> np.random.Generator:
        return np.random.default_rng([*self.words, *words])

    def shard_of(self, stream: int, p: int) -> int:
        """Index (into ``self.shards``) of the shard read by pass ``p`` of ``stream``."""
        if self.cfg.resampled:
            return int(self.rng(stream, p, _SHARD).integers(len(self.shards)))
        subset = self.subsets[stream]
        epoch, i = divmod(p, len(subset))
        return subset[self.rng(stream, epoch, _EPOCH).permutation(len(subset))[i]]

    def noise(self, stream: int, g: int, shape: tuple[int, ...]) -> np.ndarray:
        """The sampling noise of batch ``g`` of ``stream`` (``store == "moments"``), drawn whole so that
        every part of the batch gets the same values whichever rank reads it."""
        return self.rng(stream, g, _NOISE).standard_normal(shape, dtype=np.float32)

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

    def load_pass(self, stream: int, p: int, shard: int, into: PassBuffer, tried: int = 0) -> int:
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


class PassBuffer:
    """Reused arrays for one pass: latents and labels in stream order, and a per-block scratch."""

    def __init__(self, plan: StreamPlan) -> None:
        most = max(count for _, count in plan.shards)
        self.latents = np.empty((most, *plan.stored_shape), dtype=np.float16)
        self.labels = np.empty(most, dtype=np.int64)
        self.scratch = np.empty((0, *plan.stored_shape), dtype=np.float16)


class Stream:
    """One stream's cursor: the current pass, its shard and start position, and the next pass, which a
    background thread reads while rows are cut from the current one (file reads and numpy copies
    release the GIL), so a worker does not stall the others for a whole shard read."""

    def __init__(self, plan: StreamPlan, index: int, batch_size: int, reader: ThreadPoolExecutor) -> None:
        self.plan, self.index, self.batch_size, self.reader = plan, index, batch_size, reader
        self.p, self.start, self.shard = 0, 0, plan.shard_of(index, 0)
        self.current, self.upcoming = PassBuffer(plan), PassBuffer(plan)
        self.loaded = False
        self.ahead: tuple[int, Future] | None = None  # (pass, its load into self.upcoming)
        self.read = 0  # samples of the shards this stream has started to read (read-ahead included)

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
            self.read += self.plan.shards[self.shard][1]
            skips = self.plan.load_pass(self.index, self.p, self.shard, self.current)
        self.loaded = True
        nxt, shard = self.p + 1, self.plan.shard_of(self.index, self.p + 1)
        self.read += self.plan.shards[shard][1]
        self.ahead = nxt, self.reader.submit(self.plan.load_pass, self.index, nxt, shard, self.upcoming)
        return skips

    def part(self, g: int, lo: int, hi: int, out: np.ndarray, labels: np.ndarray) -> int:
        """Write rows ``[lo, hi)`` of this stream's batch ``g`` into ``out`` (hi - lo, C, H, W) and
        ``labels``; return the skips of the passes that start in those rows (each pass is counted by
        exactly one part)."""
        plan = self.plan
        first, end = g * self.batch_size + lo, g * self.batch_size + hi
        assert first >= self.start, "streams only move forward"
        rows = np.empty((hi - lo, *plan.stored_shape), dtype=np.float32) if plan.moments else out
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
            noise = plan.noise(self.index, g, (self.batch_size, *mean.shape[1:]))[lo:hi]
            out[...] = plan.scaling_factor * (mean + np.exp(0.5 * logvar) * noise)
        return skipped

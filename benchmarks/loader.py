"""Loader throughput: block-shard LatentLoader vs one .npy file per sample (as most DiT forks store latents).

Both read the same random 4x32x32 fp16 latents (plus their flip variants) from a temp folder and deliver
ready float32 batches of 256 with labels, including the per-sample flip choice and tensor conversion,
through a torch DataLoader with the same number of workers. The baseline keeps labels in memory and
reads one file per sample (holding both variants), which is cheaper than the two files per sample of
fast-DiT, so its number is an upper bound. Each side is warmed up, then both are timed over the same
number of batches in alternating rounds, so that both see the same load from other processes. Besides
samples/s (wall), the CPU time of the worker processes plus the main process is reported: samples per
CPU-second does not depend on what else runs on the machine. Goals on a 2-core machine: >= 20,000
samples/s and >= 3x the baseline.

``--source http`` (or ``pipe``) instead measures the same LatentLoader reading the shards from a loopback
``python -m http.server`` (through webdataset.gopen, i.e. curl, and WebDataset's tar iterator; or
``pipe:cat``) against reading them from the local folder (the seekable path) in the same run. The CPU
time of the server and of curl is not in the per-CPU figure; the load average is printed. Goal on 2
cores: >= 20,000 samples/s from loopback HTTP.

``--read-amplification`` instead counts what each rank of a 1, 2, 3, 4 and 8 rank job reads: the samples of
the shards its streams opened (read-ahead included), against what it consumed and against the ideal,
1/M of what the whole job consumed. The job starts mid-run (global batch 50, as after a resume), uses 12
streams and a global batch of 768, and reads 100 global batches (1.5 epochs of the 50k latents).

    python benchmarks/loader.py                  # 50k latents, 5 rounds x 40 batches each
    python benchmarks/loader.py --source http    # remote vs local shards
    python benchmarks/loader.py --read-amplification
    python benchmarks/loader.py --quick          # smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from data_pipeline.config import DataConfig
from data_pipeline.loader import LatentLoader
from data_pipeline.manifest import new_manifest, write_json_atomic
from data_pipeline.shards import ShardWriter

SHAPE = (4, 32, 32)


class PerFileLatents(torch.utils.data.Dataset):
    """The baseline: ``i.npy`` holds sample i's (2, 4, 32, 32) latent and flip; labels in memory."""

    def __init__(self, folder: Path, labels: np.ndarray) -> None:
        self.folder, self.labels = folder, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        both = np.load(self.folder / f"{i}.npy")
        return torch.from_numpy(both[np.random.randint(2)].astype(np.float32)), int(self.labels[i])


def build(root: Path, n: int, shard_size: int, block_size: int, per_file: bool) -> np.ndarray:
    """Write the same random latents as block shards (and one file per sample); return the labels."""
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((n, 2, *SHAPE), dtype=np.float32).astype(np.float16)
    labels = rng.integers(1000, size=n)
    (root / "shards").mkdir()
    records = []
    for index, start in enumerate(range(0, n, shard_size)):
        rows = slice(start, start + shard_size)
        with ShardWriter(root / "shards", index, block_size) as writer:
            writer.add(latents[rows, 0], latents[rows, 1], labels[rows], [str(i) for i in range(n)][rows])
            records.append(writer.close())
    write_json_atomic(root / "shards" / "manifest.json", new_manifest(
        shards=records, skipped=[], latent_shape=SHAPE, store="sample", num_classes=1000, label_map=None,
        block_size=block_size, space="latents", vae="random", scaling_factor=1.0))
    (root / "files").mkdir()
    for i in range(n if per_file else 0):
        np.save(root / "files" / f"{i}.npy", latents[i])
    return labels


@contextlib.contextmanager
def http_server(folder: Path) -> Iterator[str]:
    """``python -m http.server`` on a free loopback port, serving ``folder``; yields its URL."""
    command = [sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1", "--directory", folder]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) as server:
        try:
            port = re.search(r"port (\d+)", server.stdout.readline())[1]  # "Serving HTTP on ... port N"
            yield f"http://127.0.0.1:{port}"
        finally:
            server.terminate()


def _children() -> set[int]:
    tasks = Path("/proc/self/task")
    return {int(pid) for t in tasks.iterdir() for pid in (t / "children").read_text().split()}


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


class Meter:
    """An endless batch iterator with the wall time spent waiting on it and the CPU time it used
    (its worker processes plus the main process): CPU time does not depend on what else runs."""

    def __init__(self, batches: Iterable, batch_size: int) -> None:
        before = _children()
        self.it, self.batch_size = iter(batches), batch_size
        next(self.it)
        self.workers = _children() - before
        self.wall = self.cpu = 0.0
        self.samples = 0

    def run(self, n: int) -> None:
        cpu = sum(map(_cpu_seconds, self.workers)) + time.process_time()
        start = time.perf_counter()
        for latents, labels in itertools.islice(self.it, n):
            assert latents.shape == (self.batch_size, *SHAPE) and latents.dtype == torch.float32
            assert labels.shape == (self.batch_size,) and labels.dtype == torch.int64
        self.wall += time.perf_counter() - start
        self.cpu += sum(map(_cpu_seconds, self.workers)) + time.process_time() - cpu
        self.samples += n * self.batch_size

    def report(self, name: str) -> tuple[float, float]:
        rate, per_cpu = self.samples / self.wall, self.samples / self.cpu
        print(f"{name:<44} {rate:>12,.0f} samples/s   {per_cpu:>12,.0f} samples per CPU-second")
        return rate, per_cpu


def read_amplification(shards: Path, shard_size: int, quick: bool) -> None:
    """Per rank of 1-8 rank jobs: samples read / samples consumed, and the share of the job's reads."""
    streams, global_batch, start = 12, 768, 50
    batches = 10 if quick else 100
    print(f"{streams} streams, global batch {global_batch}, {batches} global batches from global batch "
          f"{start}, shards of {shard_size}")
    for world in (1, 2, 3, 4, 8):
        worst = bound = 0.0
        for rank in range(world):
            cfg = DataConfig(shards=str(shards), num_workers=0, streams=streams)
            data = LatentLoader(cfg, batch_size=global_batch // world, seed=0, rank=rank, world_size=world,
                                global_batch=global_batch)
            consumed = sum(len(x) for x, _ in itertools.islice(data.batches(start), batches))
            layout = data.layout  # the streams it reads, plus the pass it starts in and one read ahead each
            worst = max(worst, data.read / consumed)
            most = batches * layout.read_share() + 2 * shard_size * len(layout.owned)
            bound = max(bound, most / consumed)
            print(f"  {world} rank(s), rank {rank}: read {data.read:>7,} samples for {consumed:>7,} consumed "
                  f"({data.read / consumed:.3f}x); {data.read / (consumed * world):.1%} of the job's data "
                  f"(ideal {1 / world:.1%}), {len(layout.owned)} streams")
        print(f"  {world} rank(s): worst read amplification {worst:.3f}x; bound {bound:.3f}x (the streams "
              "its slice overlaps + 2 shards per stream)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="5k latents, 2 rounds of 10 batches")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--source", choices=["files", "http", "pipe"], default="files",
                        help="files: block shards vs one file per sample; http/pipe: remote vs local shards")
    parser.add_argument("--read-amplification", action="store_true",
                        help="count what each rank of 1-8 rank jobs reads instead of timing")
    args = parser.parse_args()
    sizes = (5_000, 1_000, 5, 2, 10) if args.quick else (50_000, 10_000, 20, 5, 40)
    n, shard_size, warmup, rounds, per_round = sizes
    if args.read_amplification:
        with tempfile.TemporaryDirectory(prefix="dimsum-loader-bench-") as tmp:
            build(Path(tmp), n, 1_000, block_size=256, per_file=False)
            read_amplification(Path(tmp) / "shards", 1_000, args.quick)
        return
    with tempfile.TemporaryDirectory(prefix="dimsum-loader-bench-") as tmp, contextlib.ExitStack() as stack:
        root = Path(tmp)
        start = time.perf_counter()
        labels = build(root, n, shard_size, block_size=256, per_file=args.source == "files")
        print(f"built {n} latents {SHAPE} fp16 in {time.perf_counter() - start:.1f} s")

        def loader(shards: str) -> Meter:
            cfg = DataConfig(shards=shards, num_workers=args.workers)
            return Meter(LatentLoader(cfg, batch_size=args.batch_size, seed=0, rank=0, world_size=1),
                         args.batch_size)

        pattern = f"shard-{{000000..{(n - 1) // shard_size:06d}}}.tar"
        if args.source == "files":
            names = (f"LatentLoader (block shards, {args.workers} workers)",
                     f"per-file .npy Dataset ({args.workers} workers)")
            ours = loader(str(root / "shards"))
            per_file = torch.utils.data.DataLoader(
                PerFileLatents(root / "files", labels), batch_size=args.batch_size, shuffle=True,
                drop_last=True, num_workers=args.workers, persistent_workers=True)
            baseline = Meter(itertools.chain.from_iterable(itertools.repeat(per_file)), args.batch_size)
        else:
            url = (stack.enter_context(http_server(root / "shards")) if args.source == "http"
                   else f"pipe:cat {root / 'shards'}")
            names = f"LatentLoader from {url}/... ({args.workers} workers)", "LatentLoader, local folder"
            ours, baseline = loader(f"{url}/{pattern}"), loader(str(root / "shards"))
        for meter in (ours, baseline):  # warm-up, then alternate so both see the same machine load
            meter.run(warmup)
            meter.wall = meter.cpu = meter.samples = 0
        for _ in range(rounds):
            ours.run(per_round)
            baseline.run(per_round)
    print(f"{rounds} x {per_round} batches of {args.batch_size} each, alternating; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    rate, per_cpu = ours.report(names[0])
    base_rate, base_per_cpu = baseline.report(names[1])
    goals = "goals: >= 20,000 samples/s and >= 3x" if args.source == "files" else "goal: >= 20,000 samples/s"
    print(f"ratio: {rate / base_rate:.2f}x samples/s, {per_cpu / base_per_cpu:.2f}x per CPU-second ({goals})")


if __name__ == "__main__":
    main()

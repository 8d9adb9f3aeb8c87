"""``dimsum data verify SHARDS_DIR``: read every shard and check it against ``manifest.json``.

First the manifest itself, with the same strict check the training loader runs (``check_manifest``).
Per shard: present, sha256 as in the manifest, tar readable to the end, every block has exactly the
expected members, .npy arrays load without pickle with the manifest's dtype and shape, values are
finite, labels lie in ``[0, num_classes)``, and the sample count matches. Then: no tar in the folder that the
manifest does not list. Every problem names its shard (and block key and sample);
the exit status is 1 if there is any.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from data_pipeline.shards import (
    ManifestError,
    ShardError,
    decode_block,
    file_sha256,
    iter_blocks,
    read_manifest,
)


@dataclasses.dataclass
class ShardReport:
    name: str
    samples: int = 0
    bytes: int = 0
    class_counts: np.ndarray | None = None
    problems: list[str] = dataclasses.field(default_factory=list)


def verify_shard(directory: Path, entry: dict[str, Any], stored_shape: tuple[int, ...],
                 num_classes: int) -> ShardReport:
    """Read one shard completely; collect every problem instead of stopping at the first."""
    report = ShardReport(entry["name"], class_counts=np.zeros(num_classes, dtype=np.int64))
    path = directory / entry["name"]
    if not path.is_file():
        report.problems.append(f"{entry['name']}: listed in the manifest but missing")
        return report
    report.bytes = path.stat().st_size
    try:
        digest = file_sha256(path)
    except OSError as err:
        report.problems.append(f"{entry['name']}: cannot be read ({err.strerror})")
        return report
    if digest != entry["sha256"]:
        report.problems.append(f"{entry['name']}: sha256 {digest[:16]}... does not match the manifest's "
                               f"{entry['sha256'][:16]}...")
    seen: set[str] = set()
    try:
        for key, members in iter_blocks(path):
            if key in seen:
                report.problems.append(f"{entry['name']}, key {key}: block key appears twice")
            seen.add(key)
            try:
                block = decode_block(entry["name"], key, members, stored_shape)
            except ShardError as err:
                report.problems.append(str(err))
                continue
            report.samples += len(block)
            report.problems += block.row_problems(num_classes).values()
            labels = block.labels[(block.labels >= 0) & (block.labels < num_classes)]
            report.class_counts += np.bincount(labels, minlength=num_classes)
    except ShardError as err:
        report.problems.append(str(err))
    if report.samples != entry["samples"]:
        report.problems.append(f"{entry['name']}: holds {report.samples} readable samples; "
                               f"the manifest says {entry['samples']}")
    return report


def verify(directory: str | Path, workers: int = 1) -> tuple[dict[str, Any], list[ShardReport], list[str]]:
    """``(manifest, per-shard reports, data-set level problems)``; raises ManifestError if unreadable."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    args = (tuple(manifest["stored_shape"]), manifest["num_classes"])
    entries = manifest["shards"]
    if workers > 1:
        with concurrent.futures.ProcessPoolExecutor(workers) as pool:
            futures = [pool.submit(verify_shard, directory, e, *args) for e in entries]
            reports = [f.result() for f in futures]
    else:
        reports = [verify_shard(directory, e, *args) for e in entries]
    problems = []
    listed = {e["name"] for e in entries}
    problems += [f"{p.name}: shard file not listed in the manifest" for p in sorted(directory.glob("*.tar"))
                 if p.name not in listed]
    return manifest, reports, problems


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    check = actions.add_parser("verify", help="read every shard and check it against manifest.json")
    check.add_argument("shards", help="folder holding manifest.json and the shard tars")
    check.add_argument("--workers", type=int, default=1, help="shards checked in parallel processes")


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    try:
        manifest, reports, problems = verify(args.shards, args.workers)
    except ManifestError as err:
        print(f"dimsum data verify: {err}", file=sys.stderr)
        return 1
    problems = [p for r in reports for p in r.problems] + problems
    counts = np.sum([r.class_counts for r in reports], axis=0)
    print(f"{args.shards}: {len(reports)} shards, {sum(r.samples for r in reports)} samples "
          f"(manifest: {manifest['num_samples']}), {manifest.get('space', '?')} "
          f"{tuple(manifest['latent_shape'])} {manifest['dtype']} store={manifest['store']}, "
          f"{manifest['num_classes']} classes ({counts.min()}..{counts.max()} samples per class), "
          f"{sum(r.bytes for r in reports) / 2**20:.1f} MiB in {time.perf_counter() - start:.1f} s")
    if leftovers := sorted(Path(args.shards).glob("*.tmp")):
        print(f"note: {len(leftovers)} temporary file(s) left by an interrupted prepare, "
              f"e.g. {leftovers[0].name}")
    if problems:
        print(f"FAILED: {len(problems)} problem(s):", file=sys.stderr)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    print("OK")
    return 0

"""``dimsum data verify SHARDS``: read every shard and check it against ``manifest.json``.

``SHARDS`` is a folder or any shard spec ``data.shards`` accepts (http(s), ``pipe:``, brace patterns, a
list file); each shard is read once, remote ones hashed while they stream.

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

from data_pipeline.locations import Retry, ShardReader, is_remote, local_path, resolve
from data_pipeline.manifest import ManifestError
from data_pipeline.shards import ShardError, decode_block


@dataclasses.dataclass
class ShardReport:
    name: str
    samples: int = 0
    bytes: int = 0
    class_counts: np.ndarray | None = None
    problems: list[str] = dataclasses.field(default_factory=list)


def verify_shard(location: str, entry: dict[str, Any], stored_shape: tuple[int, ...], num_classes: int,
                 retry: Retry | None = None) -> ShardReport:
    """Read one shard completely, once (a remote one is hashed while it streams); collect every problem
    instead of stopping at the first."""
    report = ShardReport(entry["name"], class_counts=np.zeros(num_classes, dtype=np.int64))
    if not is_remote(location) and not local_path(location).is_file():
        report.problems.append(f"{entry['name']}: listed in the manifest but missing")
        return report
    reader = ShardReader(entry["name"], location, retry or Retry())
    seen: set[str] = set()
    try:
        for key, members in reader:
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
    try:
        digest = reader.digest()
    except ShardError as err:
        report.problems.append(str(err))
        return report
    report.bytes = reader.size or 0
    if digest is not None and digest != entry["sha256"]:
        report.problems.insert(0, f"{entry['name']}: sha256 {digest[:16]}... does not match the manifest's "
                                  f"{entry['sha256'][:16]}...")
    if report.samples != entry["samples"]:
        report.problems.append(f"{entry['name']}: holds {report.samples} readable samples; "
                               f"the manifest says {entry['samples']}")
    return report


def verify(shards: str | Path, workers: int = 1,
           manifest_location: str = "") -> tuple[dict[str, Any], list[ShardReport], list[str]]:
    """``(manifest, per-shard reports, data-set level problems)``; raises ManifestError if unreadable.

    ``shards`` is anything ``data.shards`` accepts (locations.py); remote shards are streamed once each.
    """
    source = resolve(str(shards), manifest_location)
    manifest = source.read_manifest(Retry())
    locations = source.locations(manifest)
    args = (tuple(manifest["stored_shape"]), manifest["num_classes"])
    entries = manifest["shards"]
    if workers > 1:
        with concurrent.futures.ProcessPoolExecutor(workers) as pool:
            futures = [pool.submit(verify_shard, locations[e["name"]], e, *args) for e in entries]
            reports = [f.result() for f in futures]
    else:
        reports = [verify_shard(locations[e["name"]], e, *args) for e in entries]
    problems = []
    if source.specs is None:  # a folder: every tar in it should be listed
        listed = {e["name"] for e in entries}
        problems += [f"{p.name}: shard file not listed in the manifest"
                     for p in sorted(Path(shards).glob("*.tar")) if p.name not in listed]
    return manifest, reports, problems


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    check = actions.add_parser("verify", help="read every shard and check it against manifest.json")
    check.add_argument("shards", help="folder holding manifest.json and the shard tars, a shard spec "
                       "(brace pattern of paths or URLs, pipe:COMMAND) or a file listing specs")
    check.add_argument("--manifest", default="", help="manifest location (default: next to the shards)")
    check.add_argument("--workers", type=int, default=1, help="shards checked in parallel processes")


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    try:
        manifest, reports, problems = verify(args.shards, args.workers, args.manifest)
    except (ManifestError, ShardError) as err:
        print(f"dimsum data verify: {err}", file=sys.stderr)
        return 1
    problems = [p for r in reports for p in r.problems] + problems
    counts = np.sum([r.class_counts for r in reports], axis=0)
    print(f"{args.shards}: {len(reports)} shards, {sum(r.samples for r in reports)} samples "
          f"(manifest: {manifest['num_samples']}), {manifest.get('space', '?')} "
          f"{tuple(manifest['latent_shape'])} {manifest['dtype']} store={manifest['store']}, "
          f"{manifest['num_classes']} classes ({counts.min()}..{counts.max()} samples per class), "
          f"{sum(r.bytes for r in reports) / 2**20:.1f} MiB in {time.perf_counter() - start:.1f} s")
    if Path(args.shards).is_dir() and (leftovers := sorted(Path(args.shards).glob("*.tmp"))):
        print(f"note: {len(leftovers)} temporary file(s) left by an interrupted prepare, "
              f"e.g. {leftovers[0].name}")
    if problems:
        print(f"FAILED: {len(problems)} problem(s):", file=sys.stderr)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    print("OK")
    return 0

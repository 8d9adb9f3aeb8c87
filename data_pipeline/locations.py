"""Where shards live: a local folder, a brace pattern (local or http(s)), ``pipe:`` specs, or a list file.

``data.shards`` is one of

* a folder holding ``manifest.json`` and its shards (the layout ``dimsum prepare`` writes);
* a WebDataset shard spec, brace-expanded: ``/data/in256/shard-{000000..000127}.tar``,
  ``https://host/in256/shard-{000000..000127}.tar``, ``pipe:aws s3 cp s3://b/shard-{000000..000127}.tar -``;
* a text file listing one spec per line (blank lines and ``#`` comments ignored).

A spec is matched to its manifest entry by the shard file name in it (``shard-000042.tar``), so the
manifest stays the one description of the data set and the specs only say where each shard is. The
manifest is read from ``data.manifest`` (a path, URL or ``pipe:`` spec), by default from next to the
first shard: its spec with the shard's file name replaced by ``manifest.json``.

Local files keep the seekable fast path of :func:`shards.iter_blocks`. Everything else is opened with
``webdataset.gopen`` and read with WebDataset's tar iterator, hashing the bytes as they stream past,
so the manifest's sha256 costs no second read. A read that fails (connection dropped, 404, a pipe
command that exits non-zero) is retried ``retries`` times with doubling backoff, each retry re-opening
the stream and skipping the blocks already delivered; then it is a :class:`ShardError` naming the URL.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
import tarfile
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any, TypeVar

from webdataset import gopen
from webdataset.shardlists import expand_urls
from webdataset.tariterators import tar_file_iterator

from data_pipeline.manifest import ManifestError, check_manifest, read_manifest, write_json_atomic
from data_pipeline.shards import ShardError, ShardWriter, file_sha256, group_blocks, iter_blocks

log = logging.getLogger(__name__)
_REMOTE = re.compile(r"pipe:|[A-Za-z][A-Za-z0-9+.-]*://")
# a shard file name as it appears in a path, URL or command: after '/', ':' or a space, before the end,
# a space, '?' or '#'
_NAME_IN_SPEC = re.compile(r"(?:^|(?<=[/:\s]))([A-Za-z0-9][A-Za-z0-9._-]*\.tar)(?=$|[\s?#])")
T = TypeVar("T")
READ_ERRORS = (OSError, EOFError, tarfile.TarError)  # what a dropped connection or failed command raises


def is_remote(location: str) -> bool:
    """True for ``pipe:`` specs and URLs other than ``file://``: read through webdataset.gopen."""
    return bool(_REMOTE.match(location)) and not location.startswith("file://")


def local_path(location: str) -> Path:
    """The path of a local location (a plain path or a ``file://`` URL)."""
    return Path(location.removeprefix("file://"))


@dataclasses.dataclass(frozen=True)
class Retry:
    """Bounded retries of remote reads: ``attempts - 1`` retries, waiting backoff_s, 2 backoff_s, ..."""

    attempts: int = 4
    backoff_s: float = 0.5

    def run(self, location: str, action: Callable[[], T]) -> T:
        """``action()`` until it returns; an error of the last attempt becomes a ShardError."""
        for attempt in range(self.attempts):
            try:
                return action()
            except READ_ERRORS as err:
                self.failed(location, attempt, err)
        raise AssertionError("unreachable")

    def failed(self, location: str, attempt: int, err: BaseException) -> None:
        """Attempt ``attempt`` (from 0) failed: wait before the next one, or raise after the last."""
        if attempt + 1 == self.attempts:
            raise ShardError(f"{location}: unreadable after {self.attempts} attempt(s) ({err})") from None
        delay = self.backoff_s * 2 ** attempt
        log.warning("reading %s failed (%s); retry %d of %d in %.1f s", location, err, attempt + 1,
                    self.attempts - 1, delay)
        time.sleep(delay)


def read_bytes(location: str, retry: Retry) -> bytes:
    """The whole of a small object (a manifest): a local file, or through gopen with retries."""
    if not is_remote(location):
        return local_path(location).read_bytes()

    def read() -> bytes:
        with closing(gopen(location, "rb")) as stream:
            return stream.read()
    return retry.run(location, read)


@dataclasses.dataclass(frozen=True)
class ShardSource:
    """``data.shards`` resolved: where the manifest is, and each manifest shard's location."""

    spec: str
    manifest_location: str
    specs: tuple[str, ...] | None  # None: a local folder, shard locations are folder/name

    def read_manifest(self, retry: Retry) -> dict[str, Any]:
        """The strictly checked manifest (``manifest.check_manifest``); errors name its location."""
        if self.specs is None and self.manifest_location == str(Path(self.spec) / "manifest.json"):
            return read_manifest(self.spec)  # keeps the hint on how to create shards
        try:
            data = read_bytes(self.manifest_location, retry)
        except ShardError as err:
            raise ManifestError(f"manifest {err}") from None
        except OSError as err:
            raise ManifestError(f"{self.manifest_location}: cannot be read ({err.strerror})") from None
        try:
            manifest = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ManifestError(f"{self.manifest_location}: not valid JSON ({err})") from None
        return check_manifest(manifest, self.manifest_location)

    def locations(self, manifest: dict[str, Any]) -> dict[str, str]:
        """Shard name -> location for every manifest shard; a spec naming no manifest shard, or a manifest
        shard without a spec, is a ShardError."""
        names = [e["name"] for e in manifest["shards"]]
        if self.specs is None:
            return {name: str(local_path(self.spec) / name) for name in names}
        found: dict[str, str] = {}
        for spec in self.specs:
            name = spec_shard_name(spec, self.spec)
            if name in found:
                raise ShardError(f"{self.spec}: {found[name]!r} and {spec!r} both name shard {name}")
            found[name] = spec
        if unknown := sorted(set(found) - set(names)):
            raise ShardError(f"{self.spec}: {len(unknown)} spec(s) name shards that "
                             f"{self.manifest_location} does not list, e.g. {found[unknown[0]]!r}")
        if missing := [n for n in names if n not in found]:
            raise ShardError(f"{self.spec}: no spec for {len(missing)} shard(s) of "
                             f"{self.manifest_location}, e.g. {missing[0]}")
        return {name: found[name] for name in names}


def spec_shard_name(spec: str, where: str) -> str:
    """The shard file name a spec reads (the last ``NAME.tar`` in it)."""
    names = _NAME_IN_SPEC.findall(spec)
    if not names:
        raise ShardError(f"{where}: spec {spec!r} names no shard file (NAME.tar)")
    return names[-1]


def resolve(shards: str, manifest: str = "") -> ShardSource:
    """Interpret ``data.shards`` (and ``data.manifest``, default next to the shards); see the module doc."""
    path = local_path(shards)
    is_pattern = is_remote(shards) or "{" in shards or shards.endswith(".tar")
    if not is_pattern and not path.is_file():  # a folder (a missing one: read_manifest says how to make it)
        return ShardSource(shards, manifest or str(path / "manifest.json"), None)
    if not is_pattern:
        lines = (line.strip() for line in path.read_text().splitlines())
        patterns = [line for line in lines if line and not line.startswith("#")]
    else:
        patterns = [shards]
    specs = tuple(url for pattern in patterns for url in expand_urls(pattern))  # braces, "::" lists
    if not specs:
        raise ShardError(f"{shards}: lists no shard spec")
    if not manifest:
        first = specs[0]
        name = spec_shard_name(first, shards)
        at = first.rfind(name)
        manifest = first[:at] + "manifest.json" + first[at + len(name):]
    return ShardSource(shards, manifest, specs)


@dataclasses.dataclass(frozen=True)
class ShardDestination:
    """``prepare --out``: a local folder (atomic renames), or a brace pattern / ``pipe:`` spec naming one
    location per shard, written through ``webdataset.gopen(spec, "wb")``; the manifest goes next to the
    first shard (as :func:`resolve` reads it), last."""

    out: str
    specs: tuple[str, ...] | None  # None: a local folder

    @classmethod
    def parse(cls, out: str) -> ShardDestination:
        if not is_remote(out) and "{" not in out:
            return cls(out, None)
        return cls(out, tuple(expand_urls(out)))

    @property
    def folder(self) -> Path | None:
        return None if self.specs is not None else local_path(self.out)

    def check_count(self, shards: int) -> None:
        """A pattern must name exactly one location per shard."""
        if self.specs is not None and len(self.specs) != shards:
            raise ShardError(f"--out {self.out}: names {len(self.specs)} shard location(s) but the data "
                             f"set has {shards} shards (e.g. shard-{{000000..{shards - 1:06d}}}.tar)")

    def writer(self, index: int, block_size: int) -> ShardWriter:
        if self.specs is None:
            return ShardWriter(local_path(self.out), index, block_size)
        spec = self.specs[index]
        return ShardWriter.streaming(gopen(spec, "wb"), spec_shard_name(spec, self.out), index, block_size)

    def write_manifest(self, manifest: dict[str, Any]) -> str:
        """Write the manifest (the commit point of the data set); return where it went."""
        if self.specs is None:
            path = local_path(self.out) / "manifest.json"
            write_json_atomic(path, manifest)
            return str(path)
        location = resolve(self.out).manifest_location
        with closing(gopen(location, "wb")) as stream:
            stream.write(json.dumps(manifest, indent=1).encode())
        return location


class ShardReader:
    """One read of one shard: iterate for its blocks, then :meth:`digest` gives the sha256 of its bytes.

    Local: the seekable path, and the digest hashes the file afterwards (from the page cache). Remote:
    the stream is hashed as it is read, so the digest is known only once a read got to the end.
    """

    def __init__(self, name: str, location: str, retry: Retry, *, reuse_buffers: bool = False) -> None:
        self.name, self.location, self.retry, self.reuse_buffers = name, location, retry, reuse_buffers
        self.size: int | None = None
        self._digest: str | None = None

    def __iter__(self) -> Iterator[tuple[str, dict[str, bytes]]]:
        if not is_remote(self.location):
            path = local_path(self.location)
            yield from iter_blocks(path, reuse_buffers=self.reuse_buffers)
            self.size = path.stat().st_size
            return
        delivered = 0  # blocks handed out so far; a retry re-reads the stream and skips them

        def attempt() -> Iterator[tuple[str, dict[str, bytes]]]:
            nonlocal delivered
            with closing(gopen(self.location, "rb")) as stream:
                hashing = _HashingReader(stream)
                members = ((m["fname"], m["data"]) for m in tar_file_iterator(hashing))
                for i, block in enumerate(group_blocks(self.location, members)):
                    if i >= delivered:
                        delivered += 1
                        yield block
                hashing.drain()
            self.size, self._digest = hashing.size, hashing.sha.hexdigest()

        # a generator that has yielded cannot be re-run from outside, so the attempts are made here
        for number in range(self.retry.attempts):
            try:
                yield from attempt()
                return
            except READ_ERRORS as err:
                self.retry.failed(self.location, number, err)

    def digest(self) -> str | None:
        """The shard's sha256, or None when a remote read did not get to its end (already reported)."""
        if is_remote(self.location):
            return self._digest
        try:
            return file_sha256(local_path(self.location))
        except OSError as err:
            raise ShardError(f"{self.name}: cannot be read ({err.strerror})") from None


class _HashingReader:
    """A read-only stream wrapper that hashes and counts what passes through it."""

    def __init__(self, stream: Any) -> None:
        self.stream, self.sha, self.size = stream, hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        self.sha.update(data)
        self.size += len(data)
        return data

    def drain(self) -> None:
        """Read (and hash) what follows the tar's end marker up to the end of the stream."""
        while self.read(1 << 20):
            pass

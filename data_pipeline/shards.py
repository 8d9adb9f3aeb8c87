"""The latent shard format: WebDataset tars of sample BLOCKS, described by ``manifest.json``
(``manifest.py``).

Why blocks: a latent is tiny (4x32x32 fp16 = 8 KiB), so a one-sample-per-key layout pays three tar
headers and three .npy parses per sample and tops out near 7.5k samples/s with 2 workers (cpu-facts.md),
far below what a GPU consumes. Here one WebDataset sample (tar key ``SSSSSS-BBBBB``) holds a block of up
to ``block_size`` samples, so the per-member costs are paid once per block:

    KEY.latent.npy       (n, C', H, W) float16
    KEY.latent_flip.npy  (n, C', H, W) float16: the same for the horizontally flipped image
    KEY.cls.npy          (n,) int64 class labels (all 0 for unconditional data, which has num_classes 1)
    KEY.keys.json        the n source keys (image path relative to the source, or LMDB key)

With ``store == "sample"``, C' = C and a row is one posterior sample times the VAE scaling factor. With
``store == "moments"``, C' = 2C and a row is the unscaled posterior mean followed by its logvar; the loader
then draws fresh noise and scales. Arrays are plain .npy, read with ``allow_pickle=False``. Samples are
shuffled globally before they are written, so every block is an i.i.d. subset of the data set and a
reader may stream whole blocks without making batches less random. The manifest describes all of this
(``layout``, ``stored_shape``, ``dtype``, ``store``), so a reader needs no out-of-band knowledge.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import re
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from webdataset import TarWriter

from dimsum.errors import UserError

MEMBERS = ("cls.npy", "keys.json", "latent.npy", "latent_flip.npy")


class ShardError(UserError, RuntimeError):
    """A shard is missing, unreadable, or holds data that disagrees with the manifest."""


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def file_sha256(path: Path) -> str:
    """The hex sha256 of a file, read in large chunks (hashlib releases the GIL while it hashes)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class _HashingFile:
    """File wrapper that hashes what is written, so a shard's sha256 costs no second read."""

    def __init__(self, f: BinaryIO) -> None:
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


class ShardWriter:
    """Writes one shard under a temporary name; :meth:`close` fsyncs and renames it into place.

    The rename is the commit point: a file with a final shard name is always complete, so an interrupted
    writer leaves only a ``.tmp`` file, which the next attempt overwrites. :meth:`streaming` writes to an
    open stream instead (a ``pipe:`` upload); there the manifest, written last, is the commit point.
    Use as a context manager.
    """

    def __init__(self, out_dir: Path, index: int, block_size: int) -> None:
        self.path: Path | None = Path(out_dir) / shard_name(index)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self._start(open(self.tmp, "wb"), self.path.name, index, block_size)  # noqa: SIM115 -- see close()

    @classmethod
    def streaming(cls, stream: BinaryIO, name: str, index: int, block_size: int) -> ShardWriter:
        """A writer into ``stream`` (e.g. ``webdataset.gopen(spec, "wb")``), closed by :meth:`close`."""
        writer = cls.__new__(cls)
        writer.path = None
        writer._start(stream, name, index, block_size)
        return writer

    def _start(self, file: BinaryIO, name: str, index: int, block_size: int) -> None:
        self.name, self.index, self.block_size = name, index, block_size
        self._file = file
        self._hashing = _HashingFile(self._file)
        # fixed mtime for reproducible bytes; an int, because a float adds a pax header to every member
        self._tar = TarWriter(self._hashing, encoder=False, mtime=0)
        self._pending: list[tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]] = []
        self.samples = self.blocks = 0

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: type | None, *_: object) -> None:
        if exc_type is not None and not self._file.closed:
            self._file.close()
            if self.path is not None:
                self.tmp.unlink(missing_ok=True)

    def add(self, latent: np.ndarray, latent_flip: np.ndarray, labels: np.ndarray, keys: list[str]) -> None:
        """Append rows (any number); full blocks are written as soon as they are complete."""
        assert latent.shape == latent_flip.shape and len(latent) == len(labels) == len(keys)
        self._pending.append((latent.astype(np.float16), latent_flip.astype(np.float16),
                              labels.astype(np.int64), list(keys)))
        while sum(len(p[0]) for p in self._pending) >= self.block_size:
            self._flush(self.block_size)

    def _flush(self, n: int) -> None:
        latent, flip, labels = (np.concatenate([p[i] for p in self._pending]) for i in range(3))
        keys = [k for p in self._pending for k in p[3]]
        rest = (latent[n:], flip[n:], labels[n:], keys[n:])
        self._pending = [rest] if len(rest[0]) else []
        self._tar.write({
            "__key__": f"{self.index:06d}-{self.blocks:05d}",
            "latent.npy": _npy_bytes(latent[:n]),
            "latent_flip.npy": _npy_bytes(flip[:n]),
            "cls.npy": _npy_bytes(labels[:n]),
            "keys.json": json.dumps(keys[:n]).encode(),
        })
        self.samples += n
        self.blocks += 1

    def close(self) -> dict[str, Any]:
        """Finish the shard and return its manifest entry."""
        if self._pending:
            self._flush(sum(len(p[0]) for p in self._pending))
        self._tar.close()
        if self.path is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
        self._file.close()  # a pipe: waits for the command and raises if it failed
        if self.path is not None:
            os.replace(self.tmp, self.path)
        return {"name": self.name, "samples": self.samples, "blocks": self.blocks,
                "bytes": self._hashing.size, "sha256": self._hashing.sha.hexdigest()}


def _read(tar: tarfile.TarFile, info: tarfile.TarInfo, buffer: list[bytearray]) -> memoryview:
    """Read a member into ``buffer[0]`` (replaced when too small) and return a view of its bytes."""
    if not buffer or len(buffer[0]) < info.size:
        buffer[:] = [bytearray(info.size)]
    view = memoryview(buffer[0])[:info.size]
    tar.fileobj.seek(info.offset_data)
    if tar.fileobj.readinto(view) != info.size:
        raise tarfile.ReadError("unexpected end of data")
    return view


def group_blocks(where: str, members: Iterable[tuple[str, bytes]]) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {member: data})`` per block from tar members in file order (WebDataset's key convention:
    the name up to the first dot is the key)."""
    key, block = "", {}
    for name, data in members:
        block_key, _, member = name.partition(".")
        if block_key != key:
            if key:
                yield key, block
            key, block = block_key, {}
        if member in block:
            raise ShardError(f"{where}, key {key}: duplicate member {member!r}")
        block[member] = data
    if key:
        yield key, block


def iter_blocks(path: Path, *, reuse_buffers: bool = False) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {member: data})`` per block of a local shard, in file order.

    The tar is opened seekable (``r:``), so each member is one read: 2-3x faster than the stream mode
    of WebDataset's own iterator, which reads big members in 10 KiB pieces. ``reuse_buffers``: members
    are memoryviews into buffers that the NEXT block overwrites (no fresh allocation, whose page faults
    cost as much as the copy); the caller must copy what it keeps. (Memory-mapping the file saved no
    measurable CPU and turns a shard truncated while in use into a SIGBUS crash.)
    """
    try:
        tar = tarfile.open(path, mode="r:")  # noqa: SIM115 -- closed in finally (a generator yields inside)
        file_size = os.fstat(tar.fileobj.fileno()).st_size
    except (tarfile.TarError, OSError) as err:
        raise ShardError(f"{path.name}: cannot open as a tar file ({err})") from err
    last = ""

    def members() -> Iterator[tuple[str, bytes]]:
        nonlocal last
        # two buffers per member, alternating per block: group_blocks yields a block only after the next
        # block's first member has been read
        buffers: dict[tuple[str, bool], list[bytearray]] = {}
        block, odd = "", False
        for info in tar:
            if not info.isreg():
                continue
            if info.offset_data + info.size > file_size:  # checked before a buffer of that size exists
                raise tarfile.ReadError(f"member {info.name!r} declares {info.size} bytes; the file ends "
                                        f"{file_size - info.offset_data} bytes after its header")
            key, _, member = info.name.partition(".")
            if key != block:
                block, odd = key, not odd
            yield info.name, _read(tar, info, buffers.setdefault((member, odd), [])) if reuse_buffers \
                else tar.extractfile(info).read()
            last = info.name
        # tarfile ends quietly at a damaged header; a complete archive ends with >= 2 zero blocks
        tar.fileobj.seek(tar.offset)
        tail = tar.fileobj.read()
        if len(tail) < 2 * tarfile.BLOCKSIZE or tail.count(0) != len(tail):
            raise tarfile.ReadError("no end-of-archive marker where the last member ends")

    try:
        yield from group_blocks(path.name, members())
    except (tarfile.TarError, OSError, EOFError) as err:
        key = last.partition(".")[0] or "-"
        raise ShardError(f"{path.name}, key {key}: truncated or corrupt tar after member "
                         f"{last or '(start of file)'!r} ({err})") from err
    finally:
        tar.close()


def _nonfinite_rows(array: np.ndarray) -> np.ndarray:
    """Rows of a float16 array holding inf or NaN: exactly the values whose 5 exponent bits are all set.
    The bit test is about 4x faster than ``np.isfinite`` on float16."""
    magnitude = array.reshape(len(array), -1).view(np.uint16) & 0x7FFF
    return magnitude.max(axis=1) >= 0x7C00


@dataclasses.dataclass
class Block:
    """One decoded block; ``where`` names it in messages."""

    where: str
    latent: np.ndarray
    latent_flip: np.ndarray
    labels: np.ndarray
    keys: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def row_problems(self, num_classes: int, chosen: np.ndarray | None = None) -> dict[int, str]:
        """Rows with non-finite values or a label outside ``[0, num_classes)``, with a message each.

        ``chosen`` checks only the rows a reader will use (one variant per sample); by default both
        stored arrays are checked.
        """
        arrays = ({"chosen latent": chosen} if chosen is not None
                  else {"latent.npy": self.latent, "latent_flip.npy": self.latent_flip})
        nonfinite = {name: _nonfinite_rows(a) for name, a in arrays.items()}
        bad_label = (self.labels < 0) | (self.labels >= num_classes)
        problems = {}
        for i in np.flatnonzero(np.logical_or.reduce([bad_label, *nonfinite.values()])).tolist():
            what = [f"non-finite values in {name}" for name, rows in nonfinite.items() if rows[i]]
            what += [f"label {self.labels[i]} outside [0, {num_classes})"] if bad_label[i] else []
            problems[i] = f"{self.where} sample {i} ({self.keys[i]!r}): {', '.join(what)}"
        return problems


# The header np.save writes, e.g. {'descr': '<f2', 'fortran_order': False, 'shape': (64, 4, 32, 32), }.
# Parsed here without numpy's ast.literal_eval: faster, and CPython 3.11's AST constructor can fail with
# "recursion depth mismatch" in forked DataLoader workers. Other spellings fall back to numpy's parser.
_NPY_HEADER = re.compile(rb"\{'descr': '([<>|=]?[a-z]\d+)', 'fortran_order': False, "
                         rb"'shape': \(([\d, ]*)\), \} *\n")


def _npy_header(data: bytes) -> tuple[np.dtype, tuple[int, ...], int]:
    """``(dtype, shape, offset of the array data)`` of a .npy payload."""
    if data[:8] == b"\x93NUMPY\x01\x00":
        end = 10 + int.from_bytes(data[8:10], "little")
        if match := _NPY_HEADER.fullmatch(data, 10, end):
            dims = bytes(match[2]).split(b",")
            return np.dtype(bytes(match[1]).decode()), tuple(int(d) for d in dims if d.strip()), end
    header = io.BytesIO(data)
    version = np.lib.format.read_magic(header)
    read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    if version not in read:
        raise ValueError(f"unsupported .npy version {version}")
    shape, fortran, dtype = read[version](header)
    if fortran:
        raise ValueError("Fortran order is not expected")
    return dtype, shape, header.tell()


def _npy(where: str, member: str, data: bytes) -> np.ndarray:
    """A read-only view of a .npy payload (no copy). Object arrays are refused: they would need pickle."""
    try:
        dtype, shape, offset = _npy_header(data)
        if dtype.hasobject:
            raise ValueError("object dtype (pickle) is not allowed")
        if math.prod(shape) * dtype.itemsize != len(data) - offset:
            raise ValueError(f"the header declares shape {shape} of {dtype}, but {len(data) - offset} bytes "
                             "follow it")
        return np.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=offset).reshape(shape)
    except (ValueError, TypeError, OSError, EOFError) as err:
        raise ShardError(f"{where}: {member} is not a readable .npy array without pickle ({err})") from None


def decode_block(shard: str, key: str, members: dict[str, bytes],
                 stored_shape: tuple[int, ...]) -> Block:
    """Decode and check one block's members against the manifest's shape and dtypes."""
    where = f"{shard}, key {key}"
    if sorted(members) != list(MEMBERS):
        raise ShardError(f"{where}: members {sorted(members)}; expected {list(MEMBERS)}")
    latent, flip, labels = (_npy(where, m, members[m]) for m in ("latent.npy", "latent_flip.npy", "cls.npy"))
    for member, array, dtype in (("latent.npy", latent, np.float16), ("latent_flip.npy", flip, np.float16),
                                 ("cls.npy", labels, np.int64)):
        if array.dtype != dtype:
            raise ShardError(f"{where}: {member} has dtype {array.dtype}; expected {np.dtype(dtype)}")
    n = len(labels)
    if labels.shape != (n,) or n == 0:
        raise ShardError(f"{where}: cls.npy has shape {labels.shape}; expected (n,) with n >= 1")
    for member, array in (("latent.npy", latent), ("latent_flip.npy", flip)):
        if array.shape != (n, *stored_shape):
            raise ShardError(f"{where}: {member} has shape {array.shape}; expected {(n, *stored_shape)} "
                             "(manifest stored_shape, one row per label)")
    try:
        keys = json.loads(bytes(members["keys.json"]))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ShardError(f"{where}: keys.json is not valid JSON ({err})") from None
    if not (isinstance(keys, list) and len(keys) == n and all(isinstance(k, str) for k in keys)):
        raise ShardError(f"{where}: keys.json must be a list of {n} strings")
    return Block(where, latent, flip, labels, keys)

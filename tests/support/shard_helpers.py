"""Planting damage in real shards and manifests, shared by the verify, loader and CLI error tests."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from webdataset import TarWriter

from data_pipeline.shards import iter_blocks

Members = dict[str, bytes]


def npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def load(members: Members, name: str) -> np.ndarray:
    return np.load(io.BytesIO(members[name])).copy()


def with_array(name: str, edit: Callable[[np.ndarray], np.ndarray]) -> Callable[[Members], Members]:
    return lambda members: {**members, name: npy(edit(load(members, name)))}


def set_row(value: float | int, row: int = 3) -> Callable[[np.ndarray], np.ndarray]:
    def edit(array: np.ndarray) -> np.ndarray:
        array[row] = value
        return array
    return edit


def declared_shape(shape: tuple[int, ...]) -> Callable[[Members], Members]:
    """latent.npy keeps its data but its header declares ``shape`` (e.g. terabytes of it)."""
    def change(members: Members) -> Members:
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(header, {"descr": "<f2", "fortran_order": False, "shape": shape})
        return {**members, "latent.npy": header.getvalue() + load(members, "latent.npy").tobytes()}
    return change


def update_manifest_entry(folder: Path, shard: int) -> None:
    """Make the manifest's sha256 and size of shard ``shard`` match the file again."""
    path = folder / f"shard-{shard:06d}.tar"
    edit_manifest(folder, lambda m: m["shards"][shard].update(
        sha256=hashlib.sha256(path.read_bytes()).hexdigest(), bytes=path.stat().st_size))


def rewrite_block(folder: Path, shard: int, block: int, change: Callable[[Members], Members], *,
                  update_manifest: bool = True) -> str:
    """Rewrite one block of a shard; by default fix the manifest's sha256 so only ``change`` is wrong."""
    path = folder / f"shard-{shard:06d}.tar"
    blocks = list(iter_blocks(path))
    key = blocks[block][0]
    tmp = path.with_suffix(".new")
    with open(tmp, "wb") as f, TarWriter(f, encoder=False, mtime=0.0) as tar:
        for k, members in blocks:
            tar.write({"__key__": k, **(change(dict(members)) if k == key else members)})
    tmp.replace(path)
    if update_manifest:
        update_manifest_entry(folder, shard)
    return key


def declare_member_size(folder: Path, shard: int, member: str, size: int) -> None:
    """Patch the tar header of ``member`` (e.g. '000000-00007.latent.npy') to declare ``size`` bytes; the
    file keeps its length and the manifest its checksum is updated, so only the declared size lies."""
    path = folder / f"shard-{shard:06d}.tar"
    with tarfile.open(path) as tar:
        info = tar.getmember(member)
    info.size = size
    with open(path, "r+b") as f:
        f.seek(info.offset)
        f.write(info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape"))
    update_manifest_entry(folder, shard)


def edit_manifest(folder: Path, edit: Callable[[dict[str, Any]], Any]) -> None:
    """Apply ``edit`` to the parsed manifest; when it returns something other than None, write that."""
    manifest = json.loads((folder / "manifest.json").read_text())
    result = edit(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest if result is None else result))

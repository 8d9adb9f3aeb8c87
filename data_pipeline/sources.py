"""Image sources for ``dimsum prepare``: an ImageNet-style class folder, a flat folder, or an LMDB.

A source lists all its items up front (a sorted, reproducible list of keys with labels) and reads one
item's encoded bytes on demand, so the list can be shuffled and split across ranks before a single image
is decoded, and an unreadable image only surfaces (with its key) when it is read.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import lmdb

from dimsum.errors import UserError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})


class SourceError(UserError, RuntimeError):
    """The source itself is unusable (not one bad image); the message names the path."""


@dataclasses.dataclass(frozen=True)
class Item:
    key: str  # path relative to the source root, or the LMDB key
    label: int


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _images_under(root: Path) -> list[str]:
    """Image paths under ``root``, following symlinks; a folder reached again (a symlink loop, or two links
    to one folder) is read once, at its first path in sorted order, so no image is encoded twice."""
    found, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        folder = os.stat(dirpath)
        if (folder.st_dev, folder.st_ino) in seen:
            dirnames[:] = []
            continue
        seen.add((folder.st_dev, folder.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [os.path.join(dirpath, f) for f in filenames if _is_image(Path(f))]
    return found


class FolderSource:
    """``root/CLASS/**/IMAGE`` (labelled; classes in sorted order) or ``root/**/IMAGE`` (unconditional)."""

    def __init__(self, root: Path, labelled: bool) -> None:
        self.root, self.layout = root, "imagenet" if labelled else "flat"
        if labelled:
            classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
            if not classes:
                raise SourceError(f"{root}: no class subfolders (the ImageNet layout is root/CLASS/image)")
            self.label_map: dict[str, int] | None = {c: i for i, c in enumerate(classes)}
            self.items = [Item(os.path.relpath(p, root), i) for c, i in self.label_map.items()
                          for p in _images_under(root / c)]
        else:
            self.label_map = None
            self.items = [Item(os.path.relpath(p, root), 0) for p in _images_under(root)]
        self.items.sort(key=lambda item: item.key)
        if not self.items:
            raise SourceError(f"{root}: no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})")

    def read(self, key: str) -> bytes:
        return (self.root / key).read_bytes()

    def where(self, key: str) -> str:
        return str(self.root / key)


class LMDBSource:
    """A CelebA-HQ / LSUN style LMDB whose values are encoded images, read in key order (unconditional).

    ``length`` (an item count some converters store) is not an image and is left out; ``key_prefix``
    picks one resolution from multi-resolution LMDBs (e.g. ``256-`` for keys like ``256-00042``).
    Keys are bytes; they are kept as latin-1 strings, which round-trip every byte value.
    """

    layout = "lmdb"
    label_map = None

    def __init__(self, path: Path, key_prefix: str = "") -> None:
        self.path = path
        self._env = None
        self._pid = -1
        prefix = key_prefix.encode("latin-1")
        with self._open().begin() as txn:
            keys = [k for k in txn.cursor().iternext(values=False) if k.startswith(prefix) and k != b"length"]
        self._env.close()  # DataLoader workers fork: lmdb refuses an environment inherited from the parent
        self._env, self._pid = None, -1
        self.items = [Item(k.decode("latin-1"), 0) for k in keys]
        if not self.items:
            with_prefix = f" with prefix {key_prefix!r}" if prefix else ""
            raise SourceError(f"{path}: LMDB holds no image keys{with_prefix}")

    def _open(self) -> lmdb.Environment:
        if self._pid != os.getpid():  # an LMDB environment must not be shared across fork
            try:
                self._env = lmdb.open(str(self.path), readonly=True, lock=False, readahead=False,
                                      subdir=self.path.is_dir())
            except lmdb.Error as err:
                raise SourceError(f"{self.path}: cannot open as LMDB ({err})") from err
            self._pid = os.getpid()
        return self._env

    def read(self, key: str) -> bytes:
        with self._open().begin() as txn:
            value = txn.get(key.encode("latin-1"))
        if value is None:
            raise OSError(f"LMDB key {key!r} has no value")
        return bytes(value)

    def where(self, key: str) -> str:
        return f"{self.path} key {key!r}"

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_env": None, "_pid": -1}


class Source(Protocol):
    """What ``prepare`` needs of an image source. ``items`` is sorted and reproducible; ``label_map`` is
    class name -> label (None: unconditional); ``read`` returns one item's encoded bytes (an OSError names
    nothing: ``where`` does); ``layout`` is the SOURCES key that opened it."""

    layout: str
    items: list[Item]
    label_map: dict[str, int] | None

    def read(self, key: str) -> bytes: ...

    def where(self, key: str) -> str: ...


def _folder(root: Path, _key_prefix: str, *, labelled: bool) -> FolderSource:
    if not root.is_dir():
        raise SourceError(f"{root}: layout {'imagenet' if labelled else 'flat'!r} expects a folder")
    return FolderSource(root, labelled=labelled)


# layout -> opener(root, key_prefix): the one place a new source is registered (prepare's --layout choices)
SOURCES: dict[str, Callable[[Path, str], Source]] = {
    "imagenet": functools.partial(_folder, labelled=True),
    "flat": functools.partial(_folder, labelled=False),
    "lmdb": LMDBSource,
}


def detect_layout(root: Path) -> str:
    """lmdb (data.mdb), flat (images at the top) or imagenet (class folders)."""
    if (root / "data.mdb").is_file() or root.suffix == ".mdb":
        return "lmdb"
    if not root.is_dir():
        raise SourceError(f"{root}: expected a folder of images, a folder of class folders, or an LMDB")
    return "flat" if any(_is_image(p) for p in root.iterdir() if p.is_file()) else "imagenet"


def open_source(path: str | Path, layout: str = "auto", key_prefix: str = "") -> Source:
    """Open ``path`` with the SOURCES entry ``layout``; ``auto`` detects it (:func:`detect_layout`)."""
    root = Path(path).expanduser()
    if not root.exists():
        raise SourceError(f"{root}: source does not exist")
    layout = detect_layout(root) if layout == "auto" else layout
    if layout not in SOURCES:
        raise SourceError(f"layout {layout!r} is not one of auto, {', '.join(SOURCES)}")
    return SOURCES[layout](root, key_prefix)

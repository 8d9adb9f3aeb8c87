"""``manifest.json``: the one file that describes a shard folder (see ``shards.py`` for the tars).

It is written last, after every shard is in place, so a manifest that parses names complete shards. It
carries everything a reader needs to size and check what it opens (``layout``, ``stored_shape``,
``dtype``, ``store``, per-shard sample counts, byte sizes and sha256), and :func:`check_manifest` bounds
every one of those numbers before a reader trusts them.
"""

from __future__ import annotations

import json
import math
import os
import re
from importlib import metadata
from pathlib import Path
from typing import Any

from dimsum.errors import UserError

FORMAT = "dimsum-latent-shards"
FORMAT_VERSION = 1
LAYOUT = {
    "kind": "blocks",
    "members": {
        "latent.npy": "float16 (n, *stored_shape)",
        "latent_flip.npy": "float16 (n, *stored_shape), horizontally flipped image",
        "cls.npy": "int64 (n,)",
        "keys.json": "JSON list of n source keys",
    },
}


class ManifestError(UserError, RuntimeError):
    """``manifest.json`` is missing or malformed; the message names the field."""


def tool_version() -> str:
    try:
        return f"dimsum-train {metadata.version('dimsum-train')}"
    except metadata.PackageNotFoundError:
        return "dimsum-train (not installed)"


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write, fsync, rename: a reader sees the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


_MANIFEST_FIELDS: dict[str, type | tuple[type, ...]] = {
    "format": str, "version": int, "space": str, "store": str, "dtype": str, "latent_shape": list,
    "stored_shape": list, "scaling_factor": (int, float), "num_classes": int, "num_samples": int,
    "block_size": int, "shards": list,
}
_SHARD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\.tar")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _is(value: Any, tp: type | tuple[type, ...]) -> bool:
    """isinstance, except that a JSON ``true`` is not the integer 1 (no manifest field is a bool)."""
    return isinstance(value, tp) and not isinstance(value, bool)


def _is_shape(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 3 and all(_is(d, int) and d > 0 for d in value)


def _bad(where: str, message: str) -> ManifestError:
    return ManifestError(f"{where}: {message}")


def check_manifest(manifest: Any, where: str) -> dict[str, Any]:
    """The one strict manifest check, shared by ``dimsum data verify`` and the training loader.

    Everything a reader sizes or opens is bounded here: shapes are three positive ints, ``stored_shape``
    is what ``store`` implies, every shard name is a plain file name inside the folder, and a shard's
    declared sample count cannot need more bytes than the shard's declared size (the reader then bounds
    every tar member by the real file size), so no declared number can make a reader allocate terabytes.
    """
    if not isinstance(manifest, dict):
        raise _bad(where, f"expected a JSON object at the top level, got a {type(manifest).__name__}")
    for field, tp in _MANIFEST_FIELDS.items():
        if not _is(manifest.get(field), tp):
            raise _bad(where, f"field {field!r} is {manifest.get(field)!r}; expected a {tp}")
    if manifest["format"] != FORMAT or manifest["version"] != FORMAT_VERSION:
        raise _bad(where, f"format {manifest['format']!r} v{manifest['version']}; "
                   f"this reader understands {FORMAT!r} v{FORMAT_VERSION}")
    if manifest["dtype"] != "float16" or manifest["store"] not in ("sample", "moments"):
        raise _bad(where, f"unsupported dtype/store {manifest['dtype']!r}/{manifest['store']!r}")
    latent, stored = manifest["latent_shape"], manifest["stored_shape"]
    for field in ("latent_shape", "stored_shape"):
        if not _is_shape(manifest[field]):
            raise _bad(where, f"field {field!r} is {manifest[field]!r}; expected [channels, height, "
                       "width], all > 0")
    moments = manifest["store"] == "moments"
    implied = [latent[0] * (2 if moments else 1), *latent[1:]]
    if stored != implied:
        raise _bad(where, f"stored_shape {stored} does not match latent_shape {latent} with store "
                   f"{manifest['store']!r} (expected {implied}{': mean and logvar' if moments else ''})")
    if not (math.isfinite(manifest["scaling_factor"]) and manifest["scaling_factor"] > 0):
        raise _bad(where, f"scaling_factor is {manifest['scaling_factor']!r}; expected a finite "
                   "number > 0")
    for field in ("num_classes", "block_size", "num_samples"):
        if manifest[field] < 1:
            raise _bad(where, f"field {field!r} is {manifest[field]}; expected >= 1")
    _check_shard_entries(manifest["shards"], 2 * 2 * math.prod(stored), where)  # latent + flip, float16
    total = sum(e["samples"] for e in manifest["shards"])
    if total != manifest["num_samples"]:
        raise _bad(where, f"num_samples is {manifest['num_samples']}, shards sum to {total}")
    return manifest


def _check_shard_entries(entries: list[Any], row_bytes: int, where: str) -> None:
    names: set[str] = set()
    for i, entry in enumerate(entries):
        if not (isinstance(entry, dict) and isinstance(entry.get("name"), str)
                and isinstance(entry.get("sha256"), str)
                and all(_is(entry.get(k), int) and entry[k] >= 0 for k in ("samples", "bytes"))):
            raise _bad(where, f"shards[{i}] = {entry!r}; expected {{name, samples >= 0, bytes >= 0, "
                              "sha256, ...}")
        name = entry["name"]
        if not _SHARD_NAME.fullmatch(name):
            raise _bad(where, f"shards[{i}].name {name!r} is not a plain shard file name "
                       "(NAME.tar, inside the folder)")
        if name in names:
            raise _bad(where, f"shards[{i}].name {name!r} is listed twice")
        names.add(name)
        if not _SHA256.fullmatch(entry["sha256"]):
            raise _bad(where, f"shards[{i}].sha256 {entry['sha256']!r} is not 64 lowercase hex digits")
        if entry["samples"] * row_bytes > entry["bytes"]:
            raise _bad(where, f"shards[{i}] ({name}) declares {entry['samples']} samples, more than "
                       f"its {entry['bytes']} bytes can hold at {row_bytes} bytes per sample")


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """Load and strictly check ``directory/manifest.json``; errors name the file and the field."""
    path = Path(directory) / "manifest.json"
    if not path.is_file():
        raise ManifestError(f"{path}: not found. Create shards with 'dimsum prepare SOURCE --out {directory} "
                            f"--vae VAE' (or 'dimsum prepare --demo digits --out {directory}')")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ManifestError(f"{path}: not valid JSON ({err})") from None
    except OSError as err:
        raise ManifestError(f"{path}: cannot be read ({err.strerror})") from None
    return check_manifest(manifest, str(path))


def new_manifest(*, shards: list[dict[str, Any]], skipped: list[dict[str, str]],
                 latent_shape: tuple[int, ...], store: str, num_classes: int,
                 label_map: dict[str, int] | None, block_size: int, **info: Any) -> dict[str, Any]:
    """The manifest for finished shards; ``info`` adds descriptive fields (space, vae, resolution, ...)."""
    channels = latent_shape[0] * (2 if store == "moments" else 1)
    return {
        "format": FORMAT, "version": FORMAT_VERSION, "tool": tool_version(), **info,
        "store": store, "dtype": "float16", "latent_shape": list(latent_shape),
        "stored_shape": [channels, *latent_shape[1:]], "block_size": block_size, "layout": LAYOUT,
        "num_classes": num_classes, "label_map": label_map,
        "num_samples": sum(s["samples"] for s in shards), "shards": shards,
        "skipped": {"count": len(skipped), "items": skipped[:1000]},
    }

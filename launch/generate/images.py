"""Image I/O shared by ``dimsum sample``, ``dimsum eval fid`` and the trainer's sample grids.

The exchange format is ADM's (guided-diffusion's evaluator, also used by DiT and SiT): one .npz whose
``arr_0`` is uint8 N×H×W×3, and ``arr_1`` the class labels when there are any.
"""

from __future__ import annotations

import io
import math
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data_pipeline.preprocess import center_crop
from data_pipeline.sources import SourceError, open_source


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Images in [-1, 1], (N, C, H, W) with C = 1 or 3 -> uint8 (N, H, W, 3); grey is repeated to RGB."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images of shape (N, 1 or 3, H, W), got {tuple(images.shape)}")
    pixels = ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return pixels.expand(-1, 3, -1, -1).permute(0, 2, 3, 1).cpu().numpy()


def make_grid(images: np.ndarray, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """Tile uint8 (N, H, W, 3) into one image, ``nrow`` per row (default: square), ``pad`` pixels apart."""
    n, h, w, _ = images.shape
    cols = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), dtype=np.uint8)
    for i, image in enumerate(images):
        top, left = pad + (i // cols) * (h + pad), pad + (i % cols) * (w + pad)
        grid[top:top + h, left:left + w] = image
    return grid


def save_grid(images: np.ndarray, path: str | Path, nrow: int | None = None) -> Path:
    """Write a PNG grid of uint8 (N, H, W, 3) images."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(make_grid(images, nrow)).save(path)
    return path


def save_npz(images: np.ndarray, labels: np.ndarray | None, path: str | Path) -> Path:
    """ADM-style batch: ``arr_0`` uint8 (N, H, W, 3), ``arr_1`` int64 labels when class-conditional."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images of shape (N, H, W, 3), got {images.dtype} {images.shape}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"arr_0": images} if labels is None else {"arr_0": images, "arr_1": labels.astype(np.int64)}
    np.savez(path, **arrays)
    return path


def npz_batches(path: Path, batch_size: int) -> Iterator[np.ndarray]:
    """Stream ``arr_0`` of an ADM .npz in batches: 50k images at 256 px are 9.8 GB, never all in memory."""
    with zipfile.ZipFile(path) as archive:
        if "arr_0.npy" not in archive.namelist():
            raise ValueError(f"{path}: no 'arr_0' array (expected an ADM-style batch of uint8 N×H×W×3)")
        with archive.open("arr_0.npy") as stream:
            version = np.lib.format.read_magic(stream)
            fmt = np.lib.format
            readers = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}
            if version not in readers:
                raise ValueError(f"{path}: arr_0 uses .npy format version {version}; expected 1.0 or 2.0")
            shape, fortran, dtype = readers[version](stream)
            if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3 or fortran:
                raise ValueError(f"{path}: arr_0 must be uint8 (N, H, W, 3) in C order, got {dtype} {shape}")
            row = int(np.prod(shape[1:]))
            for start in range(0, shape[0], batch_size):
                n = min(batch_size, shape[0] - start)
                batch = np.empty((n, *shape[1:]), dtype=np.uint8)
                if stream.readinto(memoryview(batch).cast("B")) != n * row:
                    raise ValueError(f"{path}: arr_0 is truncated after {start} of {shape[0]} images")
                yield batch


def iter_images(source: str | Path, batch_size: int, resolution: int | None = None) -> Iterator[np.ndarray]:
    """uint8 (n, H, W, 3) batches from an ADM .npz (``arr_0``) or an image folder / class folders / LMDB.

    Folder and LMDB images are ADM-center-cropped to ``resolution`` (required for them, since their sizes
    vary); .npz batches are taken as they are.
    """
    source = Path(source)
    if source.suffix == ".npz":
        yield from npz_batches(source, batch_size)
        return
    if resolution is None:
        raise ValueError(f"{source}: reading a folder or LMDB needs a resolution to center-crop to")
    try:
        images_source = open_source(source)
    except SourceError as err:
        raise ValueError(str(err)) from None
    batch = []
    for item in images_source.items:
        try:
            image = Image.open(io.BytesIO(images_source.read(item.key)))
            batch.append(center_crop(image, resolution))
        except OSError as err:
            raise ValueError(f"{source}: cannot decode image {item.key!r}: {err}") from None
        if len(batch) == batch_size:
            yield np.stack(batch)
            batch = []
    if batch:
        yield np.stack(batch)

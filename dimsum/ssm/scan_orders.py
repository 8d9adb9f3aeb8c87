"""Token scan orders: which 1-D sequence a Mamba sees for a 2-D token grid (spec §4).

Every order is a permutation ``perm`` of the row-major token indices: the scanned sequence is
``x[:, perm]`` and ``x_scanned[:, inverse]`` restores the grid order. Paths are built once per
(order, block, grid) in numpy; :func:`scan_indices` caches the index tensors per device, so nothing is
stored in the model (it builds on the meta device and loads any grid size).

Multi-path orders ("sweep-8", "zigzag-8", "jpeg-8") start from the four corners, each with a row-wise
and a column-wise variant, in the order of the released ``scanning_orders.py``; block ``i`` uses path
``i mod 8``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import torch

Path = np.ndarray  # (grid*grid,) int64 flat row-major indices, in visiting order

# (start_row, start_col, row_step, col_step) of each corner, as in the released code.
_CORNERS = ((0, 0, 1, 1), (0, -1, 1, -1), (-1, 0, -1, 1), (-1, -1, -1, -1))


def _raster(n: int) -> list[tuple[int, int]]:
    return [(r, c) for r in range(n) for c in range(n)]


def _snake(n: int) -> list[tuple[int, int]]:
    """Boustrophedon: even rows left to right, odd rows right to left (continuous path)."""
    return [(r, c if r % 2 == 0 else n - 1 - c) for r in range(n) for c in range(n)]


def _jpeg(n: int) -> list[tuple[int, int]]:
    """JPEG's zig-zag over anti-diagonals: up-right on even diagonals, down-left on odd ones."""
    cells = []
    for s in range(2 * n - 1):
        rows = range(max(0, s - n + 1), min(s, n - 1) + 1)
        cells += [(r, s - r) for r in (rows if s % 2 else reversed(rows))]
    return cells


def _from_corners(base: Callable[[int], list[tuple[int, int]]], n: int) -> list[Path]:
    """8 paths: ``base`` (row-wise) and its transpose (column-wise), started from each corner."""
    paths = []
    for row, col, dr, dc in _CORNERS:
        r0, c0 = row % n, col % n
        for transpose in (False, True):
            cells = [(c, r) if transpose else (r, c) for r, c in base(n)]
            paths.append(np.array([(r0 + dr * r) * n + c0 + dc * c for r, c in cells], dtype=np.int64))
    return paths


def window_path(n: int, window: int, column_first: bool) -> Path:
    """Local windows of side ``window``: windows in raster order, tokens in raster order inside each.

    ``column_first`` makes both levels column-major (the released ``local_scan``).
    """
    if n % window:
        raise ValueError(f"window scan: grid {n} is not a multiple of the window side {window}")
    g = n // window
    idx = np.arange(n * n).reshape(g, window, g, window)  # (window row, row in it, window col, col in it)
    axes = (2, 0, 3, 1) if column_first else (0, 2, 1, 3)
    return idx.transpose(axes).reshape(-1)


def sweep4_path(block: int, n: int) -> Path:
    """Default spatial order: row-major, row-major reversed, column-major, column-major reversed."""
    path = np.arange(n * n).reshape(n, n)
    path = (path.T if block % 4 >= 2 else path).reshape(-1)
    return path[::-1].copy() if block % 2 else path


def _bi_path(block: int, n: int) -> Path:
    """"bi": row-major on even blocks, column-major on odd ones; the reversed pass is a second Mamba."""
    path = np.arange(n * n).reshape(n, n)
    return (path.T if block % 2 else path).reshape(-1)


def frequency_path(block: int, n: int) -> Path:
    """Frequency branch: windows of side grid/4; row-major on even blocks, column-major on odd ones.

    Never reversed.
    """
    return window_path(n, n // 4, column_first=block % 2 == 1)


SPATIAL_ORDERS: dict[str, Callable[[int, int], Path]] = {
    "sweep-4": sweep4_path,
    "sweep-8": lambda block, n: _from_corners(_raster, n)[block % 8],
    "zigzag-8": lambda block, n: _from_corners(_snake, n)[block % 8],
    "jpeg-8": lambda block, n: _from_corners(_jpeg, n)[block % 8],
    "window": frequency_path,  # the same local windows as the frequency branch, on the spatial tokens
    "bi": _bi_path,
}


def spatial_path(order: str, block: int, n: int) -> Path:
    if order not in SPATIAL_ORDERS:
        raise ValueError(f"unknown scan order {order!r}; choose from {', '.join(SPATIAL_ORDERS)}")
    return SPATIAL_ORDERS[order](block, n)


@functools.lru_cache(maxsize=512)
def scan_indices(order: str, block: int, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(perm, inverse)`` index tensors on ``device`` for block ``block`` of an ``n`` x ``n`` grid.

    ``order`` is a spatial order name or ``"frequency"``.
    """
    path = frequency_path(block, n) if order == "frequency" else spatial_path(order, block, n)
    inverse = np.empty_like(path)
    inverse[path] = np.arange(path.size)
    # from_numpy is not redirected by a default-device context (e.g. meta), so .to() decides the device.
    return torch.from_numpy(path).to(device), torch.from_numpy(inverse).to(device)


def snake_cross_scan_paths(n: int) -> np.ndarray:
    """LaMamba's continuous cross-scan of an n x n map (spec §5.1): (4, n*n) raster indices, row k the
    pixels that direction k visits in order.

    Step s = a*n + b runs along b within line a, reversing on odd lines (b* = n-1-b), so consecutive steps
    are always neighbours: 0 row-wise from the top-left, 1 row-wise from the bottom-left, 2 column-wise
    from the bottom-left, 3 column-wise from the bottom-right (columns read bottom to top first). For
    even n, direction 1 is direction 0 reversed and 3 is 2 reversed.
    """
    a, b = np.divmod(np.arange(n * n), n)
    b_snake = np.where(a % 2 == 0, b, n - 1 - b)
    rows = (a, n - 1 - a, n - 1 - b_snake, n - 1 - b_snake)
    cols = (b_snake, b_snake, a, n - 1 - a)
    return np.stack([r * n + c for r, c in zip(rows, cols, strict=True)])


@functools.lru_cache(maxsize=64)
def snake_cross_scan_indices(n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(gather, merge)`` flat index tensors for the 4-direction snake scan of an ``n`` x ``n`` map.

    ``x.index_select(-1, gather)`` on raster tokens (..., n*n) gives the four scans side by side (..., 4*n*n);
    ``y.index_select(-1, merge)`` on scanned outputs laid out the same way gives, per direction, its
    output back at raster positions (..., 4*n*n).
    """
    paths = snake_cross_scan_paths(n)
    inverse = np.empty_like(paths)
    np.put_along_axis(inverse, paths, np.arange(n * n)[None].repeat(4, 0), axis=1)
    offsets = np.arange(4)[:, None] * n * n
    return (torch.from_numpy(paths.reshape(-1)).to(device),
            torch.from_numpy((inverse + offsets).reshape(-1)).to(device))

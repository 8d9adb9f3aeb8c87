"""Scan orders: permutations with exact inverses, and the paths spec §4 describes."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from dimsum.ssm.scan_orders import SPATIAL_ORDERS, frequency_path, scan_indices, spatial_path, window_path

ALL_ORDERS = [*SPATIAL_ORDERS, "frequency"]


def _cells(path: np.ndarray, n: int) -> list[tuple[int, int]]:
    return [divmod(int(i), n) for i in path]


@pytest.mark.parametrize("order", ALL_ORDERS)
@pytest.mark.parametrize("n", [4, 8, 16])
def test_every_order_is_a_permutation_with_inverse(order: str, n: int) -> None:
    x = torch.randn(2, n * n, 3)
    for block in range(8):
        perm, inverse = scan_indices(order, block, n, x.device)
        assert sorted(perm.tolist()) == list(range(n * n))
        assert torch.equal(x.index_select(1, perm).index_select(1, inverse), x)
        assert torch.equal(x[:, perm][:, inverse], x)


def test_sweep4_follows_the_spec_on_a_3x3_grid() -> None:
    expected = {
        0: [0, 1, 2, 3, 4, 5, 6, 7, 8],  # row-major
        1: [8, 7, 6, 5, 4, 3, 2, 1, 0],  # row-major reversed
        2: [0, 3, 6, 1, 4, 7, 2, 5, 8],  # column-major
        3: [8, 5, 2, 7, 4, 1, 6, 3, 0],  # column-major reversed
    }
    for block in range(8):
        assert spatial_path("sweep-4", block, 3).tolist() == expected[block % 4]


def test_frequency_window_scan_alternates_row_and_column_major_and_never_reverses() -> None:
    even, odd = frequency_path(0, 8), frequency_path(1, 8)  # window side 8/4 = 2
    assert even[:8].tolist() == [0, 1, 8, 9, 2, 3, 10, 11]  # windows left to right, rows inside
    assert odd[:8].tolist() == [0, 8, 1, 9, 16, 24, 17, 25]  # windows top to bottom, columns inside
    for block in range(4):
        assert frequency_path(block, 16)[0] == 0
        assert frequency_path(block, 16).tolist() == frequency_path(block % 2, 16).tolist()


def test_multi_path_orders_start_at_the_four_corners_in_both_directions() -> None:
    n = 5
    corners = {0, n - 1, n * (n - 1), n * n - 1}
    for order in ("sweep-8", "zigzag-8", "jpeg-8"):
        paths = [spatial_path(order, block, n) for block in range(8)]
        assert len({p.tobytes() for p in paths}) == 8, order
        assert {int(p[0]) for p in paths} == corners, order
        assert spatial_path(order, 8, n).tolist() == paths[0].tolist()  # block i uses path i mod 8
    assert spatial_path("sweep-8", 0, n).tolist() == list(range(n * n))
    assert spatial_path("sweep-8", 1, n).tolist() == np.arange(n * n).reshape(n, n).T.reshape(-1).tolist()


@pytest.mark.parametrize("order", ["zigzag-8", "jpeg-8"])
def test_zigzag_and_jpeg_paths_are_continuous(order: str) -> None:
    n = 6
    for block in range(8):
        cells = _cells(spatial_path(order, block, n), n)
        steps = [max(abs(r1 - r0), abs(c1 - c0)) for (r0, c0), (r1, c1) in itertools.pairwise(cells)]
        assert max(steps) == 1, (order, block)


def test_jpeg_walks_anti_diagonals_alternately() -> None:
    n = 4
    cells = _cells(spatial_path("jpeg-8", 0, n), n)
    diagonals = [r + c for r, c in cells]
    assert diagonals == sorted(diagonals)
    assert cells[:6] == [(0, 0), (0, 1), (1, 0), (2, 0), (1, 1), (0, 2)]


def test_window_and_bi_orders() -> None:
    assert spatial_path("window", 0, 8).tolist() == frequency_path(0, 8).tolist()
    assert spatial_path("bi", 0, 3).tolist() == list(range(9))
    assert spatial_path("bi", 1, 3).tolist() == [0, 3, 6, 1, 4, 7, 2, 5, 8]


def test_bad_orders_and_grids_fail_clearly() -> None:
    with pytest.raises(ValueError, match="unknown scan order 'spiral'"):
        spatial_path("spiral", 0, 4)
    with pytest.raises(ValueError, match="not a multiple of the window side"):
        window_path(6, 4, column_first=False)

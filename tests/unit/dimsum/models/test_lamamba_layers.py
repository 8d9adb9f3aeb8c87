"""LaMamba's layers against brute-force constructions: the snake cross-scan, shifted windows (index, mask,
attention), patch merging/expanding, and SS2D against four separate sequential scans (spec §5-§7)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dimsum.models.lamamba.blocks import PatchExpanding, PatchMerging
from dimsum.nn.window_attention import (
    MASKED,
    WindowAttention,
    relative_position_index,
    shifted_window_mask,
    window_partition,
    window_reverse,
)
from dimsum.ssm.reference import sequential_scan
from dimsum.ssm.scan_orders import snake_cross_scan_indices, snake_cross_scan_paths
from dimsum.ssm.ss2d import SS2D

# ----------------------------------------------------------------------------- snake cross-scan (§5.1)


def test_snake_paths_for_n4_are_the_spec_example() -> None:
    expected = [[0, 1, 2, 3, 7, 6, 5, 4, 8, 9, 10, 11, 15, 14, 13, 12],
                [12, 13, 14, 15, 11, 10, 9, 8, 4, 5, 6, 7, 3, 2, 1, 0],
                [12, 8, 4, 0, 1, 5, 9, 13, 14, 10, 6, 2, 3, 7, 11, 15],
                [15, 11, 7, 3, 2, 6, 10, 14, 13, 9, 5, 1, 0, 4, 8, 12]]
    assert snake_cross_scan_paths(4).tolist() == expected


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 8, 9, 16])
def test_snake_paths_are_continuous_permutations(n: int) -> None:
    for path in snake_cross_scan_paths(n):
        assert sorted(path.tolist()) == list(range(n * n))
        rows, cols = np.divmod(path, n)
        assert (np.abs(np.diff(rows)) + np.abs(np.diff(cols)) == 1).all()  # every step to a neighbour


@pytest.mark.parametrize("n", [2, 4, 6, 8, 16, 32])
def test_for_even_sides_scans_1_and_3_reverse_scans_0_and_2(n: int) -> None:
    paths = snake_cross_scan_paths(n)
    assert (paths[1] == paths[0][::-1]).all() and (paths[3] == paths[2][::-1]).all()


@pytest.mark.parametrize("n", [3, 5])
def test_for_odd_sides_they_do_not(n: int) -> None:
    paths = snake_cross_scan_paths(n)
    assert not (paths[1] == paths[0][::-1]).all() and not (paths[3] == paths[2][::-1]).all()


@pytest.mark.parametrize("n", [2, 4, 6])
def test_merge_indices_invert_the_gather(n: int) -> None:
    gather, merge = snake_cross_scan_indices(n, torch.device("cpu"))
    x = torch.randn(2, 3, n * n)
    scanned = x.index_select(-1, gather)  # (2, 3, 4 L): the four scans side by side
    paths = snake_cross_scan_paths(n)
    for k in range(4):
        assert torch.equal(scanned[..., k * n * n:(k + 1) * n * n], x[..., torch.from_numpy(paths[k])])
    back = scanned.index_select(-1, merge).view(2, 3, 4, n * n)
    assert all(torch.equal(back[:, :, k], x) for k in range(4))


# ----------------------------------------------------------------------------- windows (§6)


def test_relative_position_index_brute_force() -> None:
    w = 3
    index = relative_position_index(w)
    assert index.dtype == torch.int64 and index.shape == (w * w, w * w)
    for t1 in range(w * w):
        for t2 in range(w * w):
            (r1, c1), (r2, c2) = divmod(t1, w), divmod(t2, w)
            assert index[t1, t2] == (r1 - r2 + w - 1) * (2 * w - 1) + (c1 - c2 + w - 1)


def test_window_partition_is_row_major_and_reversible() -> None:
    x = torch.arange(2 * 8 * 8).view(2, 8, 8, 1).float()
    windows = window_partition(x, 4)
    assert windows.shape == (2, 4, 16, 1)
    assert windows[1, 1, 5, 0] == x[1, 1, 4 + 1, 0]  # batch 1, window (0, 1), token (1, 1)
    assert windows[0, 2, 0, 0] == x[0, 4, 0, 0]  # window (1, 0)
    assert torch.equal(window_reverse(windows, 4, 8, 8), x)


@pytest.mark.parametrize(("size", "window", "shift"), [(16, 4, 2), (8, 4, 2), (32, 8, 4), (12, 6, 3)])
def test_shift_mask_brute_force(size: int, window: int, shift: int) -> None:
    """Two tokens of a window of the rolled map may attend iff the roll's wrap-around separates them in
    neither rows nor columns (rolled index >= size - shift came from the other edge)."""
    mask = shifted_window_mask(size, window, shift)
    grid = size // window
    assert mask.dtype == torch.float32 and mask.shape == (grid * grid, window**2, window**2)
    for w in range(grid * grid):
        for t1 in range(window**2):
            for t2 in range(window**2):
                (i1, j1), (i2, j2) = ((w // grid * window + t // window, w % grid * window + t % window)
                                      for t in (t1, t2))
                together = ((i1 >= size - shift) == (i2 >= size - shift)
                            and (j1 >= size - shift) == (j2 >= size - shift))
                assert mask[w, t1, t2] == (0.0 if together else MASKED), (w, t1, t2)


def brute_force_window_attention(attn: WindowAttention, windows, mask):
    """Per window and head: softmax(q k^T / sqrt(hd) + table[index] + mask) v, with explicit loops."""
    B, nW, T, C = windows.shape
    h, hd = attn.heads, C // attn.heads
    qkv = windows @ attn.qkv.weight.T + attn.qkv.bias
    out = torch.zeros_like(windows)
    for b in range(B):
        for w in range(nW):
            for head in range(h):
                q, k, v = (qkv[b, w, :, part * C + head * hd:part * C + (head + 1) * hd]
                           for part in range(3))
                logits = q @ k.T * hd**-0.5
                for t1 in range(T):
                    for t2 in range(T):
                        logits[t1, t2] += attn.rel_pos_bias[attn.rel_pos_index[t1, t2], head]
                if mask is not None:
                    logits = logits + mask[w]
                out[b, w, :, head * hd:(head + 1) * hd] = logits.softmax(-1) @ v
    return out @ attn.proj.weight.T + attn.proj.bias


@pytest.mark.parametrize("shifted", [False, True])
def test_window_attention_matches_brute_force(shifted: bool) -> None:
    torch.manual_seed(0)
    attn = WindowAttention(8, 2, 4).double()
    torch.nn.init.normal_(attn.rel_pos_bias, std=1.0)
    windows = window_partition(torch.randn(2, 8, 8, 8, dtype=torch.float64), 4)
    mask = shifted_window_mask(8, 4, 2).double() if shifted else None
    torch.testing.assert_close(attn(windows, mask), brute_force_window_attention(attn, windows, mask))


def test_window_covering_the_map_is_global_attention_with_a_bias() -> None:
    torch.manual_seed(0)
    attn = WindowAttention(8, 2, 4).double()
    x = torch.randn(3, 4, 4, 8, dtype=torch.float64)
    q, k, v = (attn.qkv(x.view(3, 16, 8)).view(3, 16, 3, 2, 4).permute(2, 0, 3, 1, 4))
    full = F.scaled_dot_product_attention(q, k, v, attn_mask=attn.position_bias())
    expected = attn.proj(full.transpose(1, 2).reshape(3, 16, 8))
    torch.testing.assert_close(attn(window_partition(x, 4)).view(3, 16, 8), expected)


# ----------------------------------------------------------------------------- resampling (§7)


def test_patch_merging_order_and_expanding_layout_brute_force() -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 4, 4, 3)
    merge = PatchMerging(3)
    cat = torch.stack([torch.cat([x[0, 2 * i, 2 * j], x[0, 2 * i + 1, 2 * j], x[0, 2 * i, 2 * j + 1],
                                  x[0, 2 * i + 1, 2 * j + 1]]) for i in range(2) for j in range(2)])
    cat = cat.view(1, 2, 2, 12)
    torch.testing.assert_close(merge(x), merge.reduction(merge.norm(cat)))
    expand = PatchExpanding(4, scale=2)
    y = torch.randn(1, 2, 2, 4)
    e = expand.expand(y)
    expected = torch.empty(1, 4, 4, 2)
    for i in range(2):
        for j in range(2):
            for p1 in range(2):
                for p2 in range(2):
                    expected[0, 2 * i + p1, 2 * j + p2] = e[0, i, j, (2 * p1 + p2) * 2:(2 * p1 + p2 + 1) * 2]
    torch.testing.assert_close(expand(y), expand.norm(expected))


# ----------------------------------------------------------------------------- SS2D (§5)


def ss2d_reference(m: SS2D, u: torch.Tensor) -> torch.Tensor:
    """Each direction on its own: gather by its path, its own projections, a sequential scan, scatter back."""
    batch, n, _, _ = u.shape
    x, z = m.in_proj(u).chunk(2, dim=-1)
    x = F.silu(m.conv(x.permute(0, 3, 1, 2))).flatten(2)
    d, r, s = m.d_inner, m.dt_rank, m.d_state
    y = torch.zeros_like(x)
    for k, path in enumerate(torch.from_numpy(snake_cross_scan_paths(n))):
        xk = x[..., path]
        proj = torch.einsum("cd,bdl->bcl", m.x_proj_weight[k], xk)
        dt, Bk, Ck = proj[:, :r], proj[:, r:r + s], proj[:, r + s:]
        delta = torch.einsum("dr,brl->bdl", m.dt_proj_weight[k], dt)
        ch = slice(k * d, (k + 1) * d)
        yk = sequential_scan(xk, delta, -torch.exp(m.A_log[ch]), Bk, Ck, D=m.D[ch], delta_bias=m.dt_bias[k],
                             delta_softplus=True)
        y[..., path] += yk
    y = m.out_norm(y.transpose(1, 2)).view(batch, n, n, d)
    return m.out_proj(y * F.silu(z))


@pytest.mark.parametrize("d_state", [1, 2])
def test_ss2d_is_four_separate_direction_scans_summed(d_state: int) -> None:
    torch.manual_seed(0)
    m = SS2D(8, d_state=d_state, backend="torch").double()
    with torch.no_grad():
        m.A_log.uniform_(-1, 1)
        m.D.normal_()
    u = torch.randn(2, 6, 6, 8, dtype=torch.float64, requires_grad=True)
    out, ref = m(u), ss2d_reference(m, u)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-10)
    grads = torch.autograd.grad(out.square().sum(), [u, *m.parameters()])
    grads_ref = torch.autograd.grad(ref.square().sum(), [u, *m.parameters()])
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, atol=1e-10, rtol=1e-9)


def test_ss2d_rejects_maps_the_snake_scan_cannot_read() -> None:
    m = SS2D(8)
    with pytest.raises(ValueError, match="even side"):
        m(torch.randn(1, 5, 5, 8))
    with pytest.raises(ValueError, match="square"):
        m(torch.randn(1, 4, 6, 8))

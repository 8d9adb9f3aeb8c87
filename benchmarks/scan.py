"""Speed and accuracy of the torch selective-scan backend against sequential loops.

Two loop baselines: "ref-form" is the loop as mamba-ssm's ``selective_scan_ref`` writes it (the baseline
the performance goal names), and "sequential" is our own tighter loop (exp per step, small autograd graph),
which is kept as the stricter yardstick and as the tests' correctness reference.

All candidates are timed in the same run, interleaved (warm-up, then the median of the repeats), forward
+backward and forward alone (no grad), and compared with a float64 run of the sequential loop. Inputs
follow a freshly initialised Mamba-1 (A = -(1..N), dt from [1e-3, 0.1] through softplus), with z, D,
delta_bias and a random h0. The load average is printed because the machine may be shared.

    python benchmarks/scan.py            # B=2, D=1024, L=256, N=16 (goal: >= 5x vs ref-form, err <= 1e-5)
    python benchmarks/scan.py --quick    # tiny smoke run
    python benchmarks/scan.py --block-elements 262144 524288 1048576   # sweep the torch backend's block size
    python benchmarks/scan.py --one-state  # LaMamba's SS2D call: d_state 1, B/C grouped by 4 directions

``--one-state`` times that call through the torch backend with its d_state = 1 fast path (the state
contractions as products) against the same backend with the general (L, B, d, N) x (L, B, N) matmul
contraction, in the same run.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import statistics
import time

import torch
import torch.nn.functional as F

from dimsum.ssm import recurrence, scan
from dimsum.ssm.reference import sequential_scan
from dimsum.ssm.scan import selective_scan


def make_inputs(batch: int, dim: int, length: int, state: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    dt = torch.exp(torch.rand(dim, generator=g) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    return {
        "u": torch.randn(batch, dim, length, generator=g),
        "delta": 0.1 * torch.randn(batch, dim, length, generator=g),
        "A": -torch.arange(1, state + 1, dtype=torch.float32).repeat(dim, 1),
        "B": torch.randn(batch, state, length, generator=g),
        "C": torch.randn(batch, state, length, generator=g),
        "D": torch.ones(dim),
        "z": torch.randn(batch, dim, length, generator=g),
        "delta_bias": dt + torch.log(-torch.expm1(-dt)),
        "h0": torch.randn(batch, dim, state, generator=g),
    }


def ref_form_scan(u, delta, A, B, C, *, D, z, delta_bias, delta_softplus, h0):
    """The loop as mamba-ssm's selective_scan_ref writes it: exp(delta A) and delta B u are built for all
    steps first and sliced per step, so autograd scatters each step's gradient into full-size buffers."""
    delta = delta + delta_bias[..., None]
    delta = F.softplus(delta) if delta_softplus else delta
    delta_a = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
    delta_b_u = torch.einsum("bdl,bnl,bdl->bdln", delta, B, u)
    h, ys = h0, []
    for i in range(u.shape[2]):
        h = delta_a[:, :, i] * h + delta_b_u[:, :, i]
        ys.append(torch.einsum("bdn,bn->bd", h, C[:, :, i]))
    return (torch.stack(ys, dim=2) + u * D[:, None]) * F.silu(z)


def torch_with_block_elements(elements: int, **kwargs) -> torch.Tensor:
    """The torch backend with another block size (kept until the next call, so that backward uses it too)."""
    recurrence.CPU_BLOCK_ELEMENTS = elements
    return selective_scan(**kwargs, backend="torch")


def forward_backward(fn, inputs: dict[str, torch.Tensor], grad_out: torch.Tensor):
    """y and the gradients of <y, grad_out> w.r.t. every input; the inputs are fresh leaves per call."""
    for v in inputs.values():
        v.grad = None
    y = fn(**inputs, delta_softplus=True)
    y.backward(grad_out)
    return y.detach(), {k: v.grad for k, v in inputs.items()}


def as_leaves(inputs: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.to(dtype, copy=True).requires_grad_() for k, v in inputs.items()}


def max_errors(result, reference) -> tuple[float, float]:
    """Max abs error of y, and the largest max-abs gradient error relative to that gradient's max-abs."""
    (y, grads), (y_ref, grads_ref) = result, reference
    y_err = (y.double() - y_ref).abs().max().item()
    g_err = max(((grads[k].double() - grads_ref[k]).abs().max() / grads_ref[k].abs().max()).item()
                for k in grads)
    return y_err, g_err


def grouped_one_state_inputs(batch: int, groups: int, dim: int, length: int) -> dict[str, torch.Tensor]:
    """SS2D's call: groups * dim channels, one state, B and C (batch, groups, 1, length)."""
    inputs = make_inputs(batch, groups * dim, length, 1)
    g = torch.Generator().manual_seed(2)
    del inputs["h0"], inputs["z"]  # SS2D gates after the merge, and starts from zero
    inputs["B"], inputs["C"] = (torch.randn(batch, groups, 1, length, generator=g) for _ in range(2))
    return inputs


def matmul_state_dot(h: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return (h @ v.unsqueeze(-1)).squeeze(-1)


def with_state_dot(state_dot, **kwargs) -> torch.Tensor:
    """The torch backend with another state contraction (kept until the next call, so backward uses it)."""
    scan._state_dot = state_dot
    return selective_scan(**kwargs, backend="torch")


def one_state_main(args: argparse.Namespace) -> None:
    batch, groups, dim, length = (2, 4, 32, 64) if args.quick else (2, 4, 640, 1024)  # XL stage 0 at 256 px
    repeats = 3 if args.quick else args.repeats
    inputs = grouped_one_state_inputs(batch, groups, dim, length)
    grad_out = torch.randn(batch, groups * dim, length, generator=torch.Generator().manual_seed(1))
    candidates = {"fast path": functools.partial(with_state_dot, scan._state_dot),
                  "general": functools.partial(with_state_dot, matmul_state_dot)}
    print(f"B={batch} G={groups} D={groups * dim} L={length} N=1 fp32, torch {torch.__version__}, "
          f"threads={torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f}")
    leaves = as_leaves(inputs, torch.float32)
    results = {name: forward_backward(fn, leaves, grad_out) for name, fn in candidates.items()}  # warm-up
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            start = time.perf_counter()
            forward_backward(fn, leaves, grad_out)
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t) for name, t in times.items()}
    for name, m in median.items():
        y_err, g_err = max_errors(results[name], results["general"])
        print(f"{name:>10}: fwd+bwd {m * 1e3:8.1f} ms   vs general: max|dy| {y_err:.1e}, "
              f"max rel grad {g_err:.1e}")
    print(f"speed-up fast path vs general: {median['general'] / median['fast path']:.2f}x")
    print(f"load average after the run {os.getloadavg()[0]:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, runs in a second or two")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--block-elements", type=int, nargs="+", default=[],
                        help="time the torch backend with these CPU_BLOCK_ELEMENTS values too")
    parser.add_argument("--one-state", action="store_true",
                        help="d_state 1 with grouped B/C (LaMamba's SS2D): fast path vs general path")
    args = parser.parse_args()
    if args.one_state:
        one_state_main(args)
        return
    batch, dim, length, state = (2, 64, 64, 16) if args.quick else (2, 1024, 256, 16)
    repeats = 3 if args.quick else args.repeats

    inputs = make_inputs(batch, dim, length, state)
    grad_out = torch.randn(batch, dim, length, generator=torch.Generator().manual_seed(1))
    torch_default = functools.partial(torch_with_block_elements, recurrence.CPU_BLOCK_ELEMENTS)
    candidates = {"ref-form": ref_form_scan, "sequential": sequential_scan, "torch": torch_default}
    for elements in args.block_elements:
        candidates[f"torch@{elements}"] = functools.partial(torch_with_block_elements, elements)
    print(f"B={batch} D={dim} L={length} N={state} fp32, torch {torch.__version__}, "
          f"threads={torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f}")

    leaves = as_leaves(inputs, torch.float32)
    results = {name: forward_backward(fn, leaves, grad_out) for name, fn in candidates.items()}  # warm-up
    times: dict[str, dict[str, list[float]]] = {name: {"fwd+bwd": [], "fwd": []} for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            start = time.perf_counter()
            forward_backward(fn, leaves, grad_out)
            times[name]["fwd+bwd"].append(time.perf_counter() - start)
            with torch.no_grad():
                start = time.perf_counter()
                fn(**leaves, delta_softplus=True)
                times[name]["fwd"].append(time.perf_counter() - start)

    reference = forward_backward(sequential_scan, as_leaves(inputs, torch.float64), grad_out.double())
    median = {name: {k: statistics.median(v) for k, v in t.items()} for name, t in times.items()}
    for name, m in median.items():
        y_err, g_err = max_errors(results[name], reference)
        print(f"{name:>12}: fwd+bwd {m['fwd+bwd'] * 1e3:8.1f} ms   fwd {m['fwd'] * 1e3:7.1f} ms"
              f"   max|y - y64| {y_err:.2e}   max rel grad err {g_err:.2e}")
    ours = median["torch"]
    for base in [name for name in candidates if name != "torch"]:
        print(f"speed-up torch vs {base}: fwd+bwd {median[base]['fwd+bwd'] / ours['fwd+bwd']:.1f}x, "
              f"fwd {median[base]['fwd'] / ours['fwd']:.1f}x")
    speedup = median["ref-form"]["fwd+bwd"] / ours["fwd+bwd"]
    y_err, _ = max_errors(results["torch"], reference)
    verdict = "met" if speedup >= 5 and y_err <= 1e-5 else "NOT met"
    print(f"goal (>= 5x fwd+bwd vs ref-form, max abs err <= 1e-5): {speedup:.1f}x, {y_err:.1e}: {verdict}")
    print(f"load average after the run {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()

"""Overhead of the full trainer against a bare PyTorch loop, and checkpoint cost in steps, in one run.

Both sides train the same model (same config, same seed) on the same digits data with the same batch
size, AdamW, gradient clipping and transport loss, in this one process:

* bare:    ``for x, y in tensors: loss.backward(); clip; opt.step(); opt.zero_grad()`` on in-memory batches;
* trainer: ``Trainer.step`` = DeepSpeed ZeRO-2 engine, fp32 EMA of the master weights, the
  LatentLoader reading shards of the same data, non-finite/preemption all-reduce and the hooks: step
  meter, progress line and MLflow metrics (embedded store) every ``--log-every`` steps.

Blocks of steps alternate between the two so machine noise hits both alike; the ratio of median step
times is printed (goal <= 1.15x). Then a checkpoint save is timed and printed as a multiple of one step.

    python benchmarks/trainer.py            # the demo model (configs/demo_cpu.yaml) on digits, batch 32
    python benchmarks/trainer.py --quick    # smoke run

``--activation-memory DiMSUM-XL/2`` instead measures what a training step must keep for backward: the
bytes of every tensor autograd saves during one bf16-autocast forward of one image (a 4x32x32 latent at
the default ``--image-size 256``), deduplicated by storage. It sizes the per-GPU batch in
configs/imagenet_*.yaml. It measures both scan backends: "torch", and "cuda" as the GPU runs it
(zero-state kernel + the h0 term) with the torch zero-state scan standing in for the compiled kernel,
whose saved inputs have the same (B, D, L) sizes. Any registry size works (``LaMamba-Diff-XL
--image-size 512``); ``--backends torch`` skips the emulated cuda path; ``--precision fp32`` measures
a forward without autocast (the released LaMamba-Diff recipe's precision).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from data_pipeline.demo import build_digits_shards, digits_pixels
from dimsum.models import build_model
from dimsum.ssm import scan
from launch.config import load_config
from launch.train.trainer import Trainer

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo_cpu.yaml"


def bare_loop(cfg, batches: list[tuple[torch.Tensor, torch.Tensor]]):
    """A plain PyTorch training step on the same model, returned as a closure over its state."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    transport = cfg.objective.build()
    index = 0

    def step() -> None:
        nonlocal index
        x, y = batches[index % len(batches)]
        index += 1
        loss = transport.loss(model, x, {"y": y}).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()

    return step


def saved_activation_bytes(name: str, batch: int, backend: str, image_size: int = 256,
                           precision: str = "bf16") -> int:
    """Bytes autograd saves for backward in one forward (bf16 autocast, or plain fp32) of ``batch``
    images of ``image_size`` pixels (latents of side image_size / 8), with the scan ``backend``
    ("torch", or "cuda" emulated on CPU)."""
    side = image_size // 8
    overrides = [f"model.name={name}", f"model.input_size={side}", "model.num_classes=1000"]
    cfg = load_config(None, overrides).model
    torch.manual_seed(0)
    model = build_model(cfg)
    x, t, y = torch.randn(batch, cfg.in_channels, side, side), torch.rand(batch), torch.arange(batch)
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if not isinstance(tensor, torch.nn.Parameter):  # fp32 weights are counted as model state
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    path = scan.emulated_kernels() if backend == "cuda" else contextlib.nullcontext()
    with path, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
        model(x, t, y).float().pow(2).mean()
    return sum(storages.values())


def activation_report(name: str, image_size: int = 256, backends: tuple[str, ...] = ("torch", "cuda"),
                      precision: str = "bf16") -> None:
    """Per-image activations = saved(2) - saved(1); the rest (weight copies or views) is per step."""
    per_image = {}
    for backend in backends:
        one = saved_activation_bytes(name, 1, backend, image_size, precision)
        two = saved_activation_bytes(name, 2, backend, image_size, precision)
        per_image[backend], fixed = two - one, 2 * one - two
        print(f"{name} at {image_size} px, {precision}, {backend} scan: "
              f"{per_image[backend] / 2**30:.3f} GiB saved activations per image, "
              f"+ {fixed / 2**30:.3f} GiB per step independent of the batch (bf16 weight casts under "
              f"autocast; in fp32, views of the weights: model state, not extra memory)", flush=True)
    if len(per_image) == 2:
        print(f"cuda / torch: {per_image['cuda'] / per_image['torch']:.3f}x")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few steps, for a smoke run")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--block", type=int, default=5, help="steps per alternating block")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--activation-memory", metavar="MODEL", help="measure activations per image instead")
    parser.add_argument("--image-size", type=int, default=256, help="with --activation-memory: pixels")
    parser.add_argument("--backends", default="torch,cuda", help="with --activation-memory: scan backends")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16",
                        help="with --activation-memory: bf16 autocast (our GPU default) or fp32 (released)")
    args = parser.parse_args()
    if args.activation_memory:
        activation_report(args.activation_memory, args.image_size, tuple(args.backends.split(",")),
                          args.precision)
        return 0
    if args.quick:
        args.block, args.rounds = 2, 2

    tmp = Path(tempfile.mkdtemp(prefix="dimsum-bench-"))
    build_digits_shards(tmp / "shards")
    cfg = load_config(CONFIG, [f"output_root={tmp}", "name=bench", f"data.shards={tmp / 'shards'}",
                               "data.num_workers=1", f"train.global_batch={args.batch}",
                               "train.max_steps=1000000", f"train.log_every={args.log_every}",
                               "grid.every=0"])
    images, labels = digits_pixels()
    batches = [(torch.from_numpy(images[i:i + args.batch]).float(),
                torch.from_numpy(labels[i:i + args.batch]).long())
               for i in range(0, len(images) - args.batch, args.batch)]

    trainer = Trainer(cfg)
    bare = bare_loop(cfg, batches)
    times: dict[str, list[float]] = {"bare": [], "trainer": []}

    for _ in range(2):  # warm-up (allocator, first DeepSpeed step, loader start)
        bare()
        trainer.step()
    for _ in range(args.rounds):
        for name, step in (("bare", bare), ("trainer", trainer.step)):
            for _ in range(args.block):
                began = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - began)
    step_time = statistics.median(times["trainer"])
    began = time.perf_counter()
    assert trainer.checkpointer.save(trainer.state.step)
    save_time = time.perf_counter() - began
    trainer.close()

    bare_t, trainer_t = statistics.median(times["bare"]), step_time
    m = cfg.model
    print(f"\n{m.name} (patch {m.patch_size}) on {m.in_channels}x{m.input_size}x{m.input_size} digits, "
          f"batch {args.batch}, {torch.get_num_threads()} threads, "
          f"{len(times['bare'])} steps each, interleaved in blocks of {args.block}")
    print(f"bare PyTorch loop : {1000 * bare_t:8.1f} ms/step (median)")
    print(f"full trainer      : {1000 * trainer_t:8.1f} ms/step (median; ZeRO-2, EMA, loader, logging)")
    print(f"overhead ratio    : {trainer_t / bare_t:.3f}x  (goal <= 1.15x)")
    print(f"checkpoint save   : {1000 * save_time:8.1f} ms = {save_time / trainer_t:.2f} steps")
    return 0


if __name__ == "__main__":
    sys.exit(main())

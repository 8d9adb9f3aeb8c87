"""``dimsum sample``: images (or latents) from a trained model, plus :func:`generate` for the trainer.

Sample i's noise comes from its own generator seeded with (seed, i). A sample therefore does not depend
on the batch it lands in, on the batch size, or on how many processes share the work: under torchrun
each rank takes a contiguous block of indices (so ranks draw distinct noise deterministically) and rank 0
merges the blocks in index order. Sampling never touches torch's global generator (docs/architecture.md,
determinism contract).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from dimsum.devices import rank_device, resolve_device
from dimsum.diffusion import Objective
from dimsum.errors import UserError
from dimsum.sampling import Sampler, SamplerConfig, guided_prediction
from launch.components import ObjectiveConfig
from launch.config import apply_overrides
from launch.generate import weights
from launch.generate.images import save_grid, save_npz, to_uint8
from launch.train.distributed import init_distributed

AUTOCAST = {"fp32": None, "bf16": torch.bfloat16}


class SampleError(UserError, ValueError):
    """A ``dimsum sample`` option is unusable; the message names the option and the value."""


def sample_seed(seed: int, index: int) -> int:
    """A well-mixed 64-bit seed for sample ``index`` (SeedSequence, so (1, 0) and (0, 1) do not collide)."""
    high, low = np.random.SeedSequence([seed, index]).generate_state(2, dtype=np.uint32)
    return int(high) << 32 | int(low)


class IndexedNoise:
    """Standard normal draws for a batch of sample indices, each from that sample's own generator."""

    def __init__(self, seed: int, indices: Sequence[int], shape: Sequence[int], device: torch.device) -> None:
        self.generators = [torch.Generator().manual_seed(sample_seed(seed, int(i))) for i in indices]
        self.shape, self.device = tuple(shape), device

    def __call__(self) -> torch.Tensor:
        return torch.stack([torch.randn(self.shape, generator=g) for g in self.generators]).to(self.device)


def sampler_config(sampler: str | SamplerConfig, **settings: Any) -> SamplerConfig:
    """A validated SamplerConfig from a method name or a config, with single fields overridden."""
    base = sampler.to_dict() if isinstance(sampler, SamplerConfig) else {"method": sampler}
    return SamplerConfig.from_dict({**base, **settings}, "sampler")


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def class_conditional(model: nn.Module) -> bool:
    """Whether the model is asked for classes (it has a null label for guidance, or several label rows)."""
    return model.null_label is not None or model.cfg.num_classes > 1


@torch.no_grad()
def sample_batches(model: nn.Module, labels: torch.Tensor | None, indices: Sequence[int], *,
                   sampler: SamplerConfig, objective: Objective | None = None, cfg_scale: float = 1.0,
                   seed: int = 0, batch_size: int = 16,
                   precision: str = "fp32") -> Iterator[tuple[Sequence[int], torch.Tensor, int]]:
    """Yield (indices, samples (fp32, on the model device), NFE) per batch; ``labels`` follow ``indices``.
    ``objective`` is what the model was trained with (None: flow matching on ``sampler.path``)."""
    cfg, device = model.cfg, model_device(model)
    shape = (cfg.in_channels, cfg.input_size, cfg.input_size)
    run = Sampler(sampler, objective)
    guided = run.objective.guided_channels(cfg.in_channels)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(indices), batch_size):
            batch = indices[start:start + batch_size]
            y = None if labels is None else labels[start:start + batch_size].to(device)
            noise = IndexedNoise(seed, batch, shape, device)
            prediction = guided_prediction(model, y, cfg_scale, AUTOCAST[precision], guided)
            samples, nfe = run(prediction, noise(), noise=noise)
            yield batch, samples, nfe
    finally:
        model.train(was_training)


def generate(model: nn.Module, labels: torch.Tensor | None, *, num: int | None = None, cfg_scale: float = 1.0,
             sampler: str | SamplerConfig = "dopri5", objective: Objective | None = None, seed: int = 0,
             batch_size: int = 16, precision: str = "fp32", **sampler_settings: Any) -> torch.Tensor:
    """Samples in the model's space (latents, or pixels in [-1, 1]) for ``labels`` (N,), or ``num``
    unconditional ones when ``labels`` is None. ``sampler_settings`` are SamplerConfig fields, e.g.
    ``generate(ema, labels, cfg_scale=4.0, sampler="euler", steps=50, seed=0)``."""
    if labels is None and num is None:
        raise ValueError("generate: pass class labels, or num for an unconditional model")
    n = len(labels) if labels is not None else num
    cfg = sampler_config(sampler, **sampler_settings)
    out = [s.cpu() for _, s, _ in sample_batches(model, labels, range(n), sampler=cfg, objective=objective,
                                                 cfg_scale=cfg_scale, seed=seed, batch_size=batch_size,
                                                 precision=precision)]
    return torch.cat(out)


@torch.no_grad()
def decode(samples: torch.Tensor, vae: nn.Module | None) -> np.ndarray:
    """Model outputs -> uint8 (N, H, W, 3). ``vae=None``: the model works in pixels ([-1, 1])."""
    if vae is None:
        return to_uint8(samples)
    channels = vae.config.latent_channels
    if samples.shape[1] != channels:
        raise SampleError(f"model makes {samples.shape[1]}-channel latents but the VAE expects {channels}")
    param = next(vae.parameters())
    latents = samples.to(param.device, param.dtype) / vae.config.scaling_factor
    return to_uint8(vae.decode(latents).sample)


def resolve_labels(spec: str, count: int | None, model: nn.Module,
                   seed: int) -> tuple[torch.Tensor | None, int]:
    """(labels for every sample or None, count) from "random", "even", or a comma list such as "1,207,360"."""
    cfg = model.cfg
    unconditional = cfg.num_classes == 1 and cfg.label_dropout == 0  # y=None selects the single row
    given = []
    if spec not in ("random", "even"):
        if unconditional:
            raise SampleError(f"--labels: got {spec!r}, but {cfg.name} is unconditional (one label row)")
        try:
            given = [int(v) for v in spec.split(",") if v.strip()]
        except ValueError:
            raise SampleError(f"--labels: got {spec!r}; expected 'random', 'even' or integers like "
                              "1,207,360") from None
        if not given or any(not 0 <= v < cfg.num_classes for v in given):
            raise SampleError(f"--labels: got {spec!r}; {cfg.name} has classes 0..{cfg.num_classes - 1}")
    count = count if count is not None else len(given) or 16
    if count <= 0:
        raise SampleError(f"--count: got {count}; expected a positive integer")
    if unconditional:
        return None, count
    if given:
        return torch.tensor(given).repeat((count + len(given) - 1) // len(given))[:count], count
    if spec == "even":
        return torch.arange(count) % cfg.num_classes, count
    return torch.randint(cfg.num_classes, (count,), generator=torch.Generator().manual_seed(seed)), count


def join_process_group(device: str) -> tuple[int, int, bool]:
    """(rank, world, created): an existing process group, a new one from launcher variables (torchrun,
    srun), or a single process. ``created`` says whether we own the group and must destroy it."""
    created = False
    if dist.is_available() and not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:

        init_distributed(device, with_deepspeed=False)
        created = True
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), created
    return 0, 1, created


# What each family's released checkpoints were trained with: DiMSUM flow matching on the GVP path,
# LaMamba-Diff DiT's Gaussian diffusion with learned sigma.
RELEASED_OBJECTIVES = {"dimsum": ObjectiveConfig(), "lamamba": ObjectiveConfig(kind="ddpm")}


def load_model(args: argparse.Namespace, device: str,
               objective_settings: Mapping[str, Any]) -> tuple[nn.Module, Objective]:
    """The model from ``--weights``/``--released``/``--run`` and the objective it was trained with (from
    the file or run; for released weights, the objective of their paper), with ``objective.*`` settings
    applied on top."""
    if args.weights:
        cfg, state, source = *weights.load_exported(args.weights), str(args.weights)
        objective = weights.exported_objective(args.weights)
    elif args.released:

        cfg, state = weights.load_released_checkpoint(args.released, args.which, args.model,
                                                      apply_overrides({}, args.model_set))
        source, objective = str(args.released), RELEASED_OBJECTIVES[cfg.family]
    else:
        cfg, state, objective = weights.load_run(args.run, args.step, args.which)
        source = str(args.run)
    objective = ObjectiveConfig.from_dict({**objective.to_dict(), **objective_settings}, "objective").build()
    return weights.instantiate(cfg, state, source, device, objective.out_channels(cfg.in_channels)), objective


def sample(args: argparse.Namespace, sampler: SamplerConfig,
           objective_settings: Mapping[str, Any]) -> dict[str, Any] | None:
    """Join the process group (if any) and sample; rank 0 returns what it wrote (``info.json``)."""
    device = resolve_device(args.device, "--device")
    rank, world, created = join_process_group(device)
    device = str(rank_device(device, int(os.environ.get("LOCAL_RANK", "0"))))
    try:
        return sample_on_rank(args, sampler, device, rank, world, objective_settings=objective_settings)
    finally:
        if created:
            dist.destroy_process_group()


def sample_on_rank(args: argparse.Namespace, sampler: SamplerConfig, device: str, rank: int, world: int, *,
                   objective_settings: Mapping[str, Any]) -> dict[str, Any] | None:
    """Load, sample this rank's contiguous block of indices, decode, merge on rank 0, write."""
    model, objective = load_model(args, device, objective_settings)
    broken = next((name for name, p in model.named_parameters() if not torch.isfinite(p).all()), None)
    if broken is not None:  # sampling would "succeed" and write a grid of garbage
        raise SampleError(f"the weights hold non-finite values (first: {broken!r}); they are from a diverged "
                          "run or a damaged file")
    vae = None
    if not args.latents_only and args.vae != "pixels":
        from data_pipeline.vae import load_vae

        vae = load_vae(args.vae, device)  # before sampling: a bad VAE must not waste a sampling run
    if args.vae == "pixels" and model.cfg.in_channels not in (1, 3):
        raise SampleError(f"--vae pixels: the model has {model.cfg.in_channels} channels; pixels need 1 or 3")
    labels, count = resolve_labels(args.labels, args.count, model, args.seed)
    mine = np.array_split(np.arange(count), world)[rank].tolist()
    my_labels = None if labels is None else labels[mine[0]:mine[-1] + 1] if mine else labels[:0]

    outputs, nfes, start = [], [], time.perf_counter()
    bar = tqdm(total=len(mine), unit="img", desc=f"sampling ({sampler.method})", disable=rank != 0)
    batches = sample_batches(model, my_labels, mine, sampler=sampler, objective=objective,
                             cfg_scale=args.cfg_scale, seed=args.seed, batch_size=args.batch_size,
                             precision=args.precision)
    for _, samples, nfe in batches:
        outputs.append(samples.cpu().numpy() if args.latents_only else decode(samples, vae))
        nfes.append(nfe)
        bar.update(len(samples))
        bar.set_postfix(nfe=nfe)
    bar.close()
    seconds = time.perf_counter() - start
    part = np.concatenate(outputs) if outputs else np.zeros(0)  # more ranks than samples
    merged, all_nfes = merge_ranks(part, nfes, args.out, rank, world)
    if rank == 0:
        info = write_outputs(args, merged, labels, sampler=sampler, nfes=all_nfes, seconds=seconds,
                             world=world)
    if world > 1:
        dist.barrier()
    return info if rank == 0 else None


def merge_ranks(part: np.ndarray, nfes: list[int], out: Path, rank: int,
                world: int) -> tuple[np.ndarray | None, list[int]]:
    """Rank 0 gets every rank's block in rank (= index) order via files in ``out`` (no huge collectives)."""
    if world == 1:
        return part, nfes
    parts = out / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    np.savez(parts / f"rank{rank:05d}.npz", samples=part, nfes=np.array(nfes, dtype=np.int64))
    dist.barrier()
    if rank != 0:
        return None, []
    blocks, all_nfes = [], []
    for r in range(world):
        path = parts / f"rank{r:05d}.npz"
        with np.load(path) as data:
            if len(data["samples"]):
                blocks.append(data["samples"])
            all_nfes += data["nfes"].tolist()
        path.unlink()
    parts.rmdir()
    return np.concatenate(blocks), all_nfes


def write_outputs(args: argparse.Namespace, merged: np.ndarray, labels: torch.Tensor | None, *,
                  sampler: SamplerConfig, nfes: list[int], seconds: float, world: int) -> dict[str, Any]:
    """grid.png, the ADM .npz (or latents.npz) and info.json; returns the info."""
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    label_array = None if labels is None else labels.numpy()
    files = []
    if args.latents_only:
        arrays = {"latents": merged} if label_array is None else {"latents": merged, "labels": label_array}
        np.savez(out / "latents.npz", **arrays)
        files.append("latents.npz")
    else:
        if args.grid > 0:
            files.append(save_grid(merged[:args.grid], out / "grid.png").name)
        if len(merged) >= args.npz_min:
            n, h, w, _ = merged.shape
            files.append(save_npz(merged, label_array, out / f"samples_{n}x{h}x{w}x3.npz").name)
    info = {"count": len(merged), "files": files, "seconds": round(seconds, 3),
            "images_per_second": round(len(merged) / seconds, 3) if seconds > 0 else None,
            "world_size": world, "nfe_per_batch": nfes, "mean_nfe": float(np.mean(nfes)) if nfes else 0.0,
            "cfg_scale": args.cfg_scale, "seed": args.seed, "sampler": dataclasses.asdict(sampler)}
    (out / "info.json").write_text(json.dumps(info, indent=2) + "\n")
    return info

"""``dimsum prepare``: images -> SD-VAE latent shards (the format is described in shards.py).

Work split: the source's items are listed, shuffled once with ``--seed`` and cut into shards of
``--shard-size`` items; shard i belongs to rank ``i % world_size``, and the posterior noise is seeded per
shard. What a shard holds therefore does not depend on the number of processes: one process or N
(``--rank/--world-size``, torchrun's RANK/WORLD_SIZE, or SLURM_PROCID/SLURM_NTASKS) write the same data set.

Resume: a shard is written under a temporary name and renamed when complete, then its record (count,
sha256, skipped images) goes to ``.parts/``. A rerun skips every shard whose record and file are present,
so a killed process loses only the shard it was writing. The process that finds all records present
merges them into ``manifest.json``, which is thus the last file written. ``.parts/settings.json`` pins the
settings and the item list, so a rerun with other settings fails instead of mixing two data sets.

``--out`` may also be a brace pattern or ``pipe:`` spec with one location per shard (an upload such as
``pipe:aws s3 cp - s3://bucket/in256/shard-{000000..000127}.tar``): each shard streams through
``webdataset.gopen(spec, "wb")``, its record is written to the local ``--parts`` folder once the command
has succeeded, and the manifest goes next to the shards, last.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from data_pipeline.demo import build_digits_shards
from data_pipeline.locations import ShardDestination
from data_pipeline.manifest import new_manifest, write_json_atomic
from data_pipeline.preprocess import DecodedImages, collate, encode_with_flip
from data_pipeline.shards import shard_name
from data_pipeline.sources import SOURCES, Source, SourceError, open_source
from data_pipeline.vae import VAEError, load_vae
from dimsum.devices import rank_device, resolve_device
from dimsum.errors import UserError


class PrepareError(UserError, RuntimeError):
    """Bad arguments, an output folder holding another data set, or an unreadable image under --strict."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", nargs="?", help="ImageNet-style folder (class subfolders give labels), "
                        "flat image folder (unconditional), or LMDB of encoded images")
    parser.add_argument("--out", required=True, help="output folder for shard-NNNNNN.tar and manifest.json, "
                        "or a brace pattern / pipe: spec with one location per shard, e.g. "
                        "'pipe:aws s3 cp - s3://bucket/in256/shard-{000000..000127}.tar'")
    parser.add_argument("--parts", help="local folder for the resume records when --out is not a folder "
                        "(default: OUT/.parts)")
    parser.add_argument("--vae",
                        help="diffusers AutoencoderKL: local folder or hub id (stabilityai/sd-vae-ft-ema)")
    parser.add_argument("--demo", choices=["digits"],
                        help="write the CPU demo data set (scikit-learn digits, pixel space) instead")
    parser.add_argument("--layout", default="auto", choices=["auto", *SOURCES])
    parser.add_argument("--lmdb-prefix", default="", help="only LMDB keys with this prefix (e.g. '256-')")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--store", default="sample", choices=["sample", "moments"],
                        help="one scaled posterior sample, or posterior mean+logvar (fresh noise per read)")
    parser.add_argument("--shard-size", type=int, default=10_000, help="images per shard")
    parser.add_argument("--block-size", type=int, default=256, help="samples per tar member")
    parser.add_argument("--batch-size", type=int, default=32,
                        help="images per VAE forward (doubled by flips)")
    parser.add_argument("--workers", type=int, default=2, help="image decoding processes")
    parser.add_argument("--seed", type=int, default=0,
                        help="seeds the global shuffle and the posterior noise")
    parser.add_argument("--rank", type=int, help="this process's index (default: RANK or SLURM_PROCID)")
    parser.add_argument("--world-size", type=int,
                        help="number of processes (default: WORLD_SIZE or SLURM_NTASKS)")
    parser.add_argument("--device", default="auto",
                        help="auto (cuda:LOCAL_RANK if available, else cpu), cpu, cuda:N")
    parser.add_argument("--strict", action="store_true",
                        help="fail on an unreadable image instead of skipping it")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    try:
        if ShardDestination.parse(args.out).folder and Path(args.out).is_file():
            raise PrepareError(f"--out: {args.out} is an existing file; expected a folder (or a new path)")
        if args.demo:

            manifest = build_digits_shards(args.out, seed=args.seed)
            print(f"wrote {manifest['num_samples']} digits in {len(manifest['shards'])} shards to {args.out}")
            return 0
        return prepare(args)
    except (PrepareError, SourceError, VAEError) as err:
        print(f"dimsum prepare: error: {err}", file=sys.stderr)
        return 2


def _rank_and_world(args: argparse.Namespace) -> tuple[int, int]:
    if args.rank is not None or args.world_size is not None:
        rank, world = args.rank or 0, args.world_size or 1
    else:
        env = os.environ
        rank = int(env.get("RANK", env.get("SLURM_PROCID", 0)))
        world = int(env.get("WORLD_SIZE", env.get("SLURM_NTASKS", 1)))
    if not 0 <= rank < world:
        raise PrepareError(f"rank {rank} is outside [0, world size {world})")
    return rank, world


def _check_args(args: argparse.Namespace) -> None:
    if not args.source or not args.vae:
        raise PrepareError("need SOURCE and --vae (or --demo digits)")
    if not Path(args.source).expanduser().exists():
        raise PrepareError(f"source {args.source!r} does not exist")
    for name in ("resolution", "shard_size", "block_size", "batch_size"):
        if getattr(args, name) <= 0:
            raise PrepareError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.workers < 0:
        raise PrepareError(f"--workers must be >= 0, got {args.workers}")


def _device(name: str) -> torch.device:
    return rank_device(resolve_device(name, "--device"), int(os.environ.get("LOCAL_RANK", "0")))


def _pin_settings(path: Path, settings: dict) -> None:
    if path.is_file():
        old = json.loads(path.read_text())
        changed = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
        if changed:
            details = "; ".join(f"{k} was {a!r}, now {b!r}" for k, (a, b) in changed.items())
            raise PrepareError(f"{path.parent.parent} holds shards prepared with other settings ({details}); "
                               "use a new --out folder")
        return
    write_json_atomic(path, settings)


def _record_path(parts: Path, shard: int) -> Path:
    return parts / f"{shard_name(shard)}.json"


def _is_done(out: ShardDestination, parts: Path, shard: int) -> bool:
    """The shard's record is written, and (in a folder) its file has the recorded size. A remote shard is
    not probed: its record is written only after its upload command succeeded."""
    record = _record_path(parts, shard)
    if not record.is_file():
        return False
    if out.folder is None:
        return True
    tar = out.folder / shard_name(shard)
    return tar.is_file() and json.loads(record.read_text())["shard"]["bytes"] == tar.stat().st_size


def _shard_seed(seed: int, shard: int) -> int:
    return int(np.random.SeedSequence([seed, shard]).generate_state(1)[0])


def prepare(args: argparse.Namespace) -> int:
    """Encode this rank's unfinished shards, then write the manifest if every shard is done."""
    _check_args(args)
    rank, world = _rank_and_world(args)
    device = _device(args.device)
    vae = load_vae(args.vae, device)  # a wrong path or an offline hub id fails here, before any image is read
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if args.resolution % factor:
        raise PrepareError(f"--resolution {args.resolution} is not a multiple of the VAE's "
                           f"downsampling factor {factor}")
    latent_shape = (vae.config.latent_channels, args.resolution // factor, args.resolution // factor)
    source = open_source(args.source, args.layout, args.lmdb_prefix)
    items_text = "\n".join(f"{item.key}\t{item.label}" for item in source.items)
    settings = {
        "source": str(Path(args.source).expanduser().resolve()), "layout": source.layout,
        "lmdb_prefix": args.lmdb_prefix, "vae": args.vae, "resolution": args.resolution, "store": args.store,
        "shard_size": args.shard_size, "block_size": args.block_size, "seed": args.seed,
        "items": len(source.items), "items_sha256": hashlib.sha256(items_text.encode()).hexdigest(),
    }
    out = ShardDestination.parse(args.out)
    if out.folder is None and not args.parts:
        raise PrepareError(f"--out {args.out} is not a folder: give --parts, a local folder for the resume "
                           "records")
    parts = Path(args.parts) if args.parts else out.folder / ".parts"
    parts.mkdir(parents=True, exist_ok=True)
    _pin_settings(parts / "settings.json", settings if out.folder else {**settings, "out": args.out})

    order = np.random.default_rng(args.seed).permutation(len(source.items))
    plan = [order[i:i + args.shard_size] for i in range(0, len(order), args.shard_size)]
    out.check_count(len(plan))
    todo = [s for s in range(rank, len(plan), world) if not _is_done(out, parts, s)]
    print(f"rank {rank}/{world}: {len(source.items)} images, {len(plan)} shards, "
          f"{len(todo)} to write on {device}", file=sys.stderr)
    _encode_shards(vae, source, plan=plan, todo=todo, out=out, parts=parts, args=args,
                   latent_shape=latent_shape)

    missing = [s for s in range(len(plan)) if not _is_done(out, parts, s)]
    if missing:
        print(f"rank {rank}: done; {len(missing)} shard(s) are not written yet (other ranks, or rerun); "
              "the last process to finish writes manifest.json", file=sys.stderr)
        return 0
    records = [json.loads(_record_path(parts, s).read_text()) for s in range(len(plan))]
    manifest = new_manifest(
        shards=[r["shard"] for r in records], skipped=[x for r in records for x in r["skipped"]],
        latent_shape=latent_shape, store=args.store,
        num_classes=len(source.label_map) if source.label_map else 1, label_map=source.label_map,
        block_size=args.block_size, space="latents", vae=args.vae,
        scaling_factor=float(vae.config.scaling_factor), resolution=args.resolution,
        shard_size=args.shard_size, crop="adm-center", shuffle_seed=args.seed,
        source={"path": settings["source"], "layout": source.layout},
    )
    where = out.write_manifest(manifest)
    print(f"wrote {where}: {manifest['num_samples']} samples in {len(plan)} shards, "
          f"{manifest['skipped']['count']} images skipped; check with: dimsum data verify {args.out}")
    return 0


def _encode_shards(vae: torch.nn.Module, source: Source, *, plan: list[np.ndarray],
                   todo: list[int], out: ShardDestination, parts: Path, args: argparse.Namespace,
                   latent_shape: tuple[int, ...]) -> None:
    keys = [item.key for item in source.items]
    labels = np.array([item.label for item in source.items], dtype=np.int64)
    batches = [(s, plan[s][j:j + args.batch_size].tolist()) for s in todo
               for j in range(0, len(plan[s]), args.batch_size)]
    loader = torch.utils.data.DataLoader(
        DecodedImages(source, keys, args.resolution), batch_sampler=[b for _, b in batches],
        num_workers=args.workers, collate_fn=collate)
    stored_channels = latent_shape[0] * (2 if args.store == "moments" else 1)
    device = next(vae.parameters()).device
    bar = tqdm(total=sum(len(plan[s]) for s in todo), unit="img", disable=args.quiet, dynamic_ncols=True)
    owners = (s for s, _ in batches)
    for shard, group in itertools.groupby(zip(owners, loader, strict=True), key=lambda t: t[0]):
        bar.set_description(f"{shard_name(shard)}")
        generator = torch.Generator(device=device).manual_seed(_shard_seed(args.seed, shard))
        skipped = []

        def skip(i: int, problem: str, shard: int = shard, skipped: list = skipped) -> None:
            if args.strict:
                raise PrepareError(f"{source.where(keys[i])}: {problem}; rerun without --strict to skip it")
            skipped.append({"key": keys[i], "shard": shard_name(shard), "error": problem})
            bar.write(f"skipping {source.where(keys[i])}: {problem}")

        with out.writer(shard, args.block_size) as writer:
            for _, (indices, images, errors) in group:
                for i, err in errors:
                    skip(i, f"unreadable image ({err})")
                bar.update(len(indices) + len(errors))
                if images is None:
                    continue
                latent, flip = encode_with_flip(vae, images, args.store, generator)
                if latent.shape[1:] != (stored_channels, *latent_shape[1:]):
                    raise PrepareError(f"VAE produced latents of shape {latent.shape[1:]}; expected "
                                       f"{(stored_channels, *latent_shape[1:])}")
                finite = np.isfinite(np.stack([latent, flip], 1)).reshape(len(latent), -1).all(axis=1)
                for row in np.flatnonzero(~finite):
                    skip(indices[row], "the VAE produced non-finite latents")
                writer.add(latent[finite], flip[finite], labels[indices][finite],
                           [keys[i] for i, ok in zip(indices, finite, strict=True) if ok])
            record = writer.close()
        write_json_atomic(_record_path(parts, shard), {"shard": record, "skipped": skipped})
    bar.close()

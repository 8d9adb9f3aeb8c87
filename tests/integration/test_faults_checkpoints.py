"""Hostile and damaged run directories through the real CLI (``dimsum train``, ``export``, ``sample``).

A planted pickle never runs (its marker file never appears), each kind of damage to the newest checkpoint
falls back to the previous intact one, loudly, and nothing dimsum did not write is ever deleted. The
reference run is trained once (one rank, checkpoints at steps 2 and 4) and copied for every case.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from launch.train.checkpoint import OURS
from tests.support import forked_cli
from tests.support.trainer_helpers import REPO, base_env, complete_steps, dimsum, ok, overrides

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]
CONFIG = "configs/demo_cpu.yaml"


class Planted:
    """Unpickling this runs ``touch MARKER``: the marker's absence proves nothing unpickled it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return os.system, (f"touch {self.marker}",)


def plant(path: Path, marker: Path) -> None:
    torch.save({"ema": Planted(marker)}, path)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, digits_shards: Path) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("hostile")
    ok(dimsum("train", CONFIG, *overrides(root, digits_shards, "ref", max_steps=4)))
    assert complete_steps(root / "ref") == [2, 4]
    return root / "ref", digits_shards


@pytest.fixture
def run(reference: tuple[Path, Path], tmp_path: Path) -> Path:
    return Path(shutil.copytree(reference[0], tmp_path / "ref"))


def resume(run: Path, shards: Path, **train: object) -> str:
    """Continue ``run`` to step 6 with ``dimsum train``; returns its output."""
    args = overrides(run.parent, shards, run.name, **{"max_steps": 6, **train})
    return ok(dimsum("train", CONFIG, *args))


def test_planted_rank_file_never_runs_on_resume_and_the_run_falls_back(run: Path, reference: tuple,
                                                                       tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    plant(run / "step-0000004" / "dimsum-rank-00000.pt", marker)
    log = resume(run, reference[1])
    assert not marker.exists()
    assert "step-0000004 is damaged: dimsum-rank-00000.pt" in log and "resumed from step-0000002" in log
    assert (run / "step-0000004.damaged" / "dimsum-rank-00000.pt").is_file()  # kept for inspection
    assert complete_steps(run) == [4, 6]


@pytest.mark.parametrize("raw", [False, True])
def test_planted_deepspeed_file_never_runs_on_export(run: Path, tmp_path: Path, raw: bool) -> None:
    marker = tmp_path / "pwned"
    plant(run / "step-0000004" / "mp_rank_00_model_states.pt", marker)
    flags = ["--raw"] if raw else []
    proc = dimsum("export", str(run), "--step", "4", *flags)
    assert proc.returncode == 2 and not marker.exists()
    assert "step-0000004 is damaged: mp_rank_00_model_states.pt" in proc.stderr
    assert "Traceback" not in proc.stderr
    out = ok(dimsum("export", str(run), *flags))  # without --step: the newest intact one, with a warning
    assert "WARNING" in out and "using step-0000002 instead" in out and not marker.exists()
    assert (run / "export" / f"step-0000002-{'raw' if raw else 'ema'}.safetensors").is_file()


def test_planted_extra_shard_never_runs_on_sample(run: Path, tmp_path: Path) -> None:
    """``zero_to_fp32`` globs ``*_optim_states.pt``: an added file would be unpickled by DeepSpeed."""
    marker = tmp_path / "pwned"
    plant(run / "step-0000004" / "zero_pp_rank_1_mp_rank_00_optim_states.pt", marker)
    out = ok(dimsum("sample", "--run", str(run), "--out", str(tmp_path / "samples"), "--vae", "pixels",
                    "--count", "2", "sampler.method=euler", "sampler.steps=2", "--grid", "0"))
    assert not marker.exists()
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt is not one of the files the ranks wrote" in out


def test_planted_file_with_valid_checksums_is_refused_by_the_safe_loader(run: Path, tmp_path: Path) -> None:
    """Checksums only say the writer wrote it; our own files are also read with ``weights_only=True``."""
    marker = tmp_path / "pwned"
    step = run / "step-0000004"
    plant(step / "dimsum-rank-00000.pt", marker)
    for name in ("sha256-rank-00000.json", OURS):  # forge the list as if the writer had made the pickle
        (step / name).unlink()
    ok(dimsum_seal(step))
    proc = dimsum("export", str(run))
    assert proc.returncode == 2 and not marker.exists()
    assert "dimsum-rank-00000.pt: not a dimsum rank file, refused to unpickle it" in proc.stderr


def dimsum_seal(step: Path) -> subprocess.CompletedProcess:
    return forked_cli.run("launch.train.checkpoint", ["seal", str(step)], base_env(), REPO, timeout=120)


def truncate(step: Path) -> str:
    path = step / "mp_rank_00_model_states.pt"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return "mp_rank_00_model_states.pt has"


def empty(step: Path) -> str:
    (step / "dimsum-rank-00000.pt").write_bytes(b"")
    return "dimsum-rank-00000.pt has 0 bytes"


def delete_rank_file(step: Path) -> str:
    (step / "dimsum-rank-00000.pt").unlink()
    return "dimsum-rank-00000.pt is missing"


def garble_marker(step: Path) -> str:
    (step / "COMPLETE").write_text('{"step": 4, "world_si')
    return "COMPLETE marker is unreadable"


def flip_a_bit(step: Path) -> str:
    path = step / "mp_rank_00_model_states.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    return "mp_rank_00_model_states.pt does not match its sha256"


@pytest.mark.parametrize("damage", [truncate, empty, delete_rank_file, garble_marker, flip_a_bit])
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(run: Path, reference: tuple,
                                                                  damage: object) -> None:
    why = damage(run / "step-0000004")
    log = resume(run, reference[1])
    assert f"WARNING: checkpoint {run / 'step-0000004'} is damaged: {why}" in log
    assert "resumed from step-0000002" in log and "finished at step 6" in log
    assert complete_steps(run) == [4, 6] and (run / "step-0000004.damaged").is_dir()


def test_stray_marked_directory_falls_back_and_is_recorded_in_mlflow(run: Path, reference: tuple) -> None:
    stray = run / "step-0000099"
    stray.mkdir()
    (stray / "COMPLETE").write_text(json.dumps({"step": 99, "world_size": 1}) + "\n")
    log = resume(run, reference[1], tracking=True)
    assert "step-0000099 is damaged: written without checksums" in log and "resumed from step-0000004" in log
    assert (run / "step-0000099.damaged" / "COMPLETE").is_file()

    run_id = (run / "mlflow_run_id").read_text().strip()
    tags = MlflowClient(f"sqlite:///{run / 'mlflow.db'}").get_run(run_id).data.tags
    assert "step-0000099 is damaged" in tags["checkpoint_fallback"]


def test_all_damaged_refuses_with_every_reason_and_changes_nothing(run: Path, reference: tuple) -> None:
    empty(run / "step-0000002")
    garble_marker(run / "step-0000004")
    before = sorted(str(p) for p in run.rglob("*"))
    proc = dimsum("train", CONFIG, *overrides(run.parent, reference[1], run.name, max_steps=6))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "no intact checkpoint to resume from" in proc.stderr
    assert "step-0000002 is damaged: dimsum-rank-00000.pt has 0 bytes" in proc.stderr
    assert "step-0000004 is damaged: COMPLETE marker is unreadable" in proc.stderr
    assert sorted(str(p) for p in run.rglob("*")) == before


def test_checkpoint_without_checksums_is_refused_until_sealed(run: Path, reference: tuple) -> None:
    """Today's format (no file lists) is refused with the command that trusts it."""
    for step in ("step-0000002", "step-0000004"):
        for name in ("sha256-rank-00000.json", OURS):
            (run / step / name).unlink()
    proc = dimsum("train", CONFIG, *overrides(run.parent, reference[1], run.name, max_steps=6))
    assert proc.returncode == 2
    assert f"written without checksums (before dimsum verified checkpoints); if you trust this directory, " \
           f"run 'python -m launch.train.checkpoint seal {run / 'step-0000004'}'" in proc.stderr
    ok(dimsum_seal(run / "step-0000004"))
    assert "resumed from step-0000004" in resume(run, reference[1])


def test_deleted_markers_never_start_over_on_top_of_the_old_checkpoints(run: Path, reference: tuple) -> None:
    for step in ("step-0000002", "step-0000004"):
        (run / step / "COMPLETE").unlink()
    proc = dimsum("train", CONFIG, *overrides(run.parent, reference[1], run.name, max_steps=6))
    assert proc.returncode == 2 and "none is complete" in proc.stderr
    assert (run / "step-0000002" / "dimsum-rank-00000.pt").is_file()
    assert (run / "step-0000004" / "dimsum-rank-00000.pt").is_file()


def test_resume_false_in_a_used_directory_is_refused_unless_overwrite(run: Path, reference: tuple) -> None:
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    args = overrides(run.parent, reference[1], run.name, max_steps=2, resume="false")
    proc = dimsum("train", CONFIG, *args)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "train.resume: got False" in proc.stderr and "already holds a run" in proc.stderr
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before
    log = ok(dimsum("train", CONFIG, *args, "train.overwrite=true"))
    assert "fresh start" in log and "saved" in log
    assert complete_steps(run) == [2] and not (run / "step-0000004").exists()


def test_foreign_folders_in_the_run_directory_are_never_deleted(run: Path, reference: tuple) -> None:
    """A stale-looking incomplete step folder (pruning) and one in the way of a save (replacement)."""
    older, in_the_way = run / "step-0000001", run / "step-0000006"
    for folder in (older, in_the_way):
        folder.mkdir()
        (folder / "precious.txt").write_text("not dimsum's")
    proc = dimsum("train", CONFIG, *overrides(run.parent, reference[1], run.name, max_steps=6))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"{in_the_way} is in the way of the checkpoint of step 6 and was not created" in proc.stderr
    assert (in_the_way / "precious.txt").read_text() == "not dimsum's"
    shutil.rmtree(in_the_way)
    log = resume(run, reference[1])
    assert f"leaving {older} alone" in log and (older / "precious.txt").read_text() == "not dimsum's"


@pytest.mark.parametrize("name", [".", "..", "a\\b"])  # "/" was refused before
def test_hostile_names_are_refused_and_delete_nothing(tmp_path: Path, digits_shards: Path, name: str) -> None:
    root = tmp_path / "outputs"
    (root / "other-run").mkdir(parents=True)
    (root / "other-run" / "precious.txt").write_text("keep")
    (tmp_path / "precious.txt").write_text("keep")
    for command in (["demo", "--fresh"], ["train", CONFIG]):
        proc = dimsum(*command, f"output_root={root}", f"name={name}", f"data.shards={digits_shards}")
        assert proc.returncode == 2 and f"name: got {name!r}" in proc.stderr, proc.stderr[-2000:]
    assert (root / "other-run" / "precious.txt").read_text() == "keep"
    assert (tmp_path / "precious.txt").read_text() == "keep"


def test_demo_fresh_deletes_only_a_directory_dimsum_created(tmp_path: Path, digits_shards: Path) -> None:
    folder = tmp_path / "demo_cpu"
    folder.mkdir()
    (folder / "precious.txt").write_text("keep")
    proc = dimsum("demo", "--fresh", f"output_root={tmp_path}", f"data.shards={digits_shards}")
    assert proc.returncode == 2 and "was not created by dimsum" in proc.stderr
    assert (folder / "precious.txt").read_text() == "keep"

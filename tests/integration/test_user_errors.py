"""Every user mistake through the real ``dimsum`` CLI: one line naming what and where, a documented exit
code, no traceback, and a wall-clock bound (a hang is a failure too).

A row is (id, how to build the command line, expected exit code, a substring of the one message line).
``setup`` functions plant the fault in its real form: damaged shards and manifests, real directories,
binary files, YAML alias bombs, NaN weights, symlink loops, a real checkpoint of a real run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image
from safetensors.torch import save_file

from dimsum.models import build_model, model_config
from launch.generate.weights import CONFIG_METADATA_KEY
from launch.train.tracking import saved_run_id
from tests.support import forked_cli
from tests.support.paths import REPO
from tests.support.shard_helpers import (
    declare_member_size,
    declared_shape,
    edit_manifest,
    rewrite_block,
    set_row,
    with_array,
)

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
CONFIG = str(REPO / "configs" / "demo_cpu.yaml")
BOUND_S = 240  # generous for a shared 2-core machine; every row takes seconds
OUR_FRAME = re.compile(r'File ".*/(launch|data_pipeline|dimsum)/')
BOMB = "".join(f"{a}: &{a} [{', '.join([f'*{b}'] * 9)}]\n"  # nine levels of nine aliases: 9**9 leaves
               for b, a in zip("abcdefgh", "bcdefghi", strict=True))


def env() -> dict[str, str]:
    dropped = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "DIMSUM_FAULTS", "MLFLOW_TRACKING_URI")
    return {**{k: v for k, v in os.environ.items() if k not in dropped}, "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}


def dimsum(args: list[str], launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    """``python -m launch.cli ARGS`` forked from the session's warm interpreter, or under ``launcher``."""
    args = [str(a) for a in args]
    if launcher is None:
        return forked_cli.run("launch.cli", args, env(), REPO, BOUND_S)
    return subprocess.run([*launcher, *args], env=env(), capture_output=True, text=True, timeout=BOUND_S,
                          cwd=REPO, check=False)


@dataclasses.dataclass
class World:
    """What a row's setup may use: a private folder, the digits shards and the session's fixtures."""

    tmp: Path
    clean_shards: Path
    fixtures: dict[str, Path]

    def shards(self, edit: Callable[[Path], object] | None = None) -> Path:
        folder = Path(shutil.copytree(self.clean_shards, self.tmp / "shards"))
        if edit is not None:
            edit(folder)
        return folder

    def manifest(self, edit: Callable[[dict], object]) -> Path:
        return self.shards(lambda folder: edit_manifest(folder, edit))

    def train(self, shards: Path | None = None, *overrides: str) -> list[str]:
        return ["train", CONFIG, f"output_root={self.tmp / 'runs'}",
                f"data.shards={shards or self.clean_shards}", "tracking.enabled=false", "data.num_workers=0",
                "train.max_steps=2", "train.global_batch=8", "train.ckpt_every=2", "train.log_every=1",
                "grid.every=0", *overrides]

    def file(self, name: str, content: str | bytes) -> Path:
        path = self.tmp / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return path


@dataclasses.dataclass
class Case:
    id: str
    args: Callable[[World], list[str]]
    code: int
    message: str


def every_shard(damage: Callable[[Path, int], object]) -> Callable[[Path], None]:
    """Damage all four digits shards: which shard a run reads first is drawn at random."""
    return lambda folder: [damage(folder, i) for i in range(4)]


def truncate(path: Path, size: int) -> None:
    path.write_bytes(path.read_bytes()[:size])


def shard_entry(**fields: object) -> Callable[[dict], None]:
    return lambda m: m["shards"][0].update(fields)


def huge_count(manifest: dict) -> None:
    manifest["shards"][0]["samples"] = 2**44
    manifest["num_samples"] = 2**44 + 1297  # the other three shards hold 1297


def verify(edit: Callable[[World], Path]) -> Callable[[World], list[str]]:
    return lambda w: ["data", "verify", edit(w)]


def train_on(edit: Callable[[World], Path], *overrides: str) -> Callable[[World], list[str]]:
    return lambda w: w.train(edit(w), *overrides)


def config_file(text: str | bytes) -> Callable[[World], list[str]]:
    return lambda w: ["train", w.file("experiment.yaml", text)]


MANIFEST_CASES = [
    Case("latent-vs-stored-shape", verify(lambda w: w.manifest(lambda m: m.update(stored_shape=[4, 16, 16]))),
         1, "stored_shape [4, 16, 16] does not match latent_shape [1, 16, 16]"),
    Case("moments-1-channel", verify(lambda w: w.manifest(lambda m: m.update(store="moments"))),
         1, "with store 'moments' (expected [2, 16, 16]"),
    Case("negative-count", verify(lambda w: w.manifest(shard_entry(samples=-500))),
         1, "expected {name, samples >= 0, bytes >= 0, sha256"),
    Case("boolean-count", verify(lambda w: w.manifest(shard_entry(samples=True))),
         1, "expected {name, samples >= 0, bytes >= 0, sha256"),
    Case("json-list", verify(lambda w: w.manifest(lambda m: [m])),
         1, "expected a JSON object at the top level, got a list"),
    Case("num-classes-negative", verify(lambda w: w.manifest(lambda m: m.update(num_classes=-1))),
         1, "field 'num_classes' is -1; expected >= 1"),
    Case("huge-count", verify(lambda w: w.manifest(huge_count)),
         1, "declares 17592186044416 samples, more than its"),
    Case("huge-shape", verify(lambda w: w.manifest(lambda m: m.update(latent_shape=[1, 2**20, 2**20],
                                                                      stored_shape=[1, 2**20, 2**20]))),
         1, "shards[0] (shard-000000.tar) declares 500 samples, more than its"),
    Case("empty-manifest", verify(lambda w: w.manifest(lambda m: m.update(shards=[], num_samples=0))),
         1, "field 'num_samples' is 0; expected >= 1"),
    Case("name-parent", verify(lambda w: w.manifest(shard_entry(name="../../x.tar"))),
         1, "shards[0].name '../../x.tar' is not a plain shard file name"),
    Case("name-absolute", verify(lambda w: w.manifest(shard_entry(name="/etc/passwd"))),
         1, "shards[0].name '/etc/passwd' is not a plain shard file name"),
    Case("train-uses-the-same-check", train_on(lambda w: w.manifest(shard_entry(name="../../x.tar"))),
         2, "shards[0].name '../../x.tar' is not a plain shard file name"),
    Case("npy-header-declares-terabytes", verify(lambda w: w.shards(lambda f: rewrite_block(
        f, 0, 0, declared_shape((64, 1, 10**9, 10**9))))),
         1, "latent.npy is not a readable .npy array without pickle (the header declares shape (64, 1, "),
    Case("tar-member-declares-1TiB", verify(lambda w: w.shards(lambda f: declare_member_size(
        f, 0, "000000-00007.latent.npy", 2**40))),
         1, "member '000000-00007.latent.npy' declares 1099511627776 bytes; the file ends"),
    Case("train-npy-header-declares-terabytes", train_on(lambda w: w.shards(every_shard(
        lambda f, i: rewrite_block(f, i, 0, declared_shape((64, 1, 10**9, 10**9)))))),
         2, "latent.npy is not a readable .npy array without pickle (the header declares shape"),
    Case("train-tar-member-declares-1TiB", train_on(lambda w: w.shards(every_shard(
        lambda f, i: declare_member_size(f, i, f"00000{i}-00000.latent.npy", 2**40)))),
         2, "-00000.latent.npy' declares 1099511627776 bytes"),
    Case("train-bit-flip", train_on(lambda w: w.shards(every_shard(lambda f, i: rewrite_block(
        f, i, 0, with_array("latent.npy", lambda a: a * 0.5), update_manifest=False)))),
         2, "does not match the manifest's"),
    # regression rows: the shard-corruption family
    Case("train-nan-sample", train_on(lambda w: w.shards(every_shard(lambda f, i: rewrite_block(
        f, i, 0, with_array("latent.npy", set_row(np.nan))))), "data.random_flip=false"),
         2, "sample 3 ('digits/"),
    Case("train-truncated-shard", train_on(lambda w: w.shards(every_shard(lambda f, i: truncate(
        f / f"shard-00000{i}.tar", 30000)))),
         2, "truncated or corrupt tar after member"),
    Case("train-missing-shard", train_on(lambda w: w.shards(lambda f: (f / "shard-000001.tar").unlink())),
         2, "1 shard(s) listed in manifest.json are missing, e.g. shard-000001.tar"),
    Case("train-no-manifest", lambda w: w.train(w.tmp), 2, "manifest.json: not found"),
    Case("verify-bad-field", verify(lambda w: w.manifest(lambda m: m.update(num_classes="ten"))),
         1, "field 'num_classes' is 'ten'"),
]

CONFIG_CASES = [
    Case("config-is-a-directory", lambda w: ["train", w.tmp], 2, "expected a YAML file, got a directory"),
    Case("config-is-binary", config_file(bytes(range(256)) * 8), 2, "expected a UTF-8 YAML text file"),
    Case("defaults-include-themselves", config_file("defaults:\n  - experiment\n"), 2, "a defaults cycle"),
    Case("yaml-alias-bomb", config_file("a: &a [x, x, x, x, x, x, x, x, x]\n" + BOMB), 2, "alias bomb"),
    Case("duplicate-section", config_file("train:\n  lr: 0.1\ntrain:\n  max_steps: 3\n"),
         2, "duplicate key 'train' at line 3, column 1"),
    # regression rows: the config-typo family
    Case("unknown-key", lambda w: w.train(None, "train.lrr=0.1"), 2, "train.lrr: got 0.1; unknown key (did"),
    Case("wrong-type", lambda w: w.train(None, "train.global_batch=abc"), 2, "train.global_batch: got 'abc'"),
    Case("missing-config", lambda w: ["train", w.tmp / "nope.yaml"], 2, "expected an existing YAML file"),
    Case("bad-choice", lambda w: w.train(None, "train.path=SBDM"), 2, "train.path: got 'SBDM'; expected one"),
    Case("lr-inf", lambda w: w.train(None, "train.lr=.inf"), 2, "train.lr: got inf; expected a finite"),
    Case("lr-nan", lambda w: w.train(None, "train.lr=.nan"), 2, "train.lr: got nan; expected a finite"),
    Case("lr-inf-as-text", lambda w: w.train(None, "train.lr=inf"), 2, "train.lr: got 'inf'; expected float"),
    Case("negative-seed", lambda w: w.train(None, "seed=-1"), 2, "seed: got -1; expected an integer in [0"),
    Case("output-root-is-a-file", lambda w: w.train(None, f"output_root={w.file('root', 'x')}"),
         2, "output_root: got"),
]

OUTPUT_CASES = [
    Case("sample-out-is-a-file", lambda w: ["sample", "--weights", w.fixtures["nan_weights"], "--out",
                                            w.file("taken", "x"), "--latents-only"],
         1, "--out: "),
    Case("sample-nan-weights", lambda w: ["sample", "--weights", w.fixtures["nan_weights"], "--out",
                                          w.tmp / "s", "--latents-only", "--count", "2"],
         1, "the weights hold non-finite values (first: 'x_embedder."),
    Case("export-out-is-a-directory", lambda w: ["export", w.tmp, "--out", w.tmp], 2, "is a directory;"),
    Case("export-no-checkpoint", lambda w: ["export", w.tmp], 2, "no complete checkpoint"),
    Case("prepare-out-is-a-file", lambda w: ["prepare", "--demo", "digits", "--out", w.file("taken", "x")],
         2, "--out: "),
]


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    cfg = model_config("DiMSUM-debug", input_size=8, num_classes=10)
    model = build_model(cfg)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    first = next(k for k in state if k.startswith("x_embedder.") and state[k].is_floating_point())
    state[first] = torch.full_like(state[first], float("nan"))
    path = tmp_path_factory.mktemp("weights") / "nan.safetensors"
    save_file(state, str(path), metadata={CONFIG_METADATA_KEY: json.dumps(cfg.to_dict())})
    return {"nan_weights": path}


def check(proc: subprocess.CompletedProcess, case: Case, command: str) -> None:
    text = f"exit {proc.returncode}\nstdout: {proc.stdout[-2000:]}\nstderr: {proc.stderr[-4000:]}"
    assert proc.returncode == case.code, text
    assert "Traceback" not in proc.stderr and not OUR_FRAME.search(proc.stderr), text
    lines = [line for line in proc.stderr.splitlines() if case.message in line]
    assert len(lines) == 1, text
    # a problem found in the data by 'data verify' is one line of its report; any other error is THE line
    assert lines[0].startswith(f"dimsum {command}: ") or (command == "data verify" and
                                                          lines[0].startswith("  shard-")), text


def marked(case: Case) -> object:
    """Rows that start training (DeepSpeed, a first pass) take tens of seconds on a shared CPU."""
    slow = case.id.startswith("train-")
    return pytest.param(case, id=case.id, marks=[pytest.mark.slow] if slow else [])


@pytest.mark.parametrize("case", [marked(c) for c in MANIFEST_CASES + CONFIG_CASES + OUTPUT_CASES])
def test_one_line_error(case: Case, tmp_path: Path, digits_shards: Path, fixtures: dict[str, Path]) -> None:
    args = [str(a) for a in case.args(World(tmp_path, digits_shards, fixtures))]
    command = "data verify" if args[:2] == ["data", "verify"] else args[0]
    check(dimsum(args), case, command)



@pytest.mark.slow
def test_training_with_quality_on_other_data_is_refused_before_the_first_step(tmp_path: Path,
                                                                               digits_shards: Path) -> None:
    world = World(tmp_path, digits_shards, {})
    shards = world.manifest(lambda m: m["source"].update(name="imagefolder"))
    message = ("config error: quality.enabled: got True; the digits judge only scores runs on the digits "
               f"demo data ('dimsum prepare --demo digits'); {shards} holds imagefolder pixels data")
    refused = Case("quality-on-other-data", list, 2, message)
    check(dimsum(world.train(shards, "grid.every=2", "quality.enabled=true")), refused, "train")
    assert not list((tmp_path / "runs").glob("*/step-*"))

@pytest.mark.multiprocess
def test_global_batch_that_does_not_divide_by_the_ranks_under_torchrun(tmp_path: Path,
                                                                       digits_shards: Path) -> None:
    """Printed once (by rank 0: every rank reads the same config), no rank traceback. torchrun's agent
    adds its own failure report, which is torchrun's and not ours."""
    proc = dimsum(World(tmp_path, digits_shards, {}).train(None, "train.global_batch=9"),
                  [*TORCHRUN, "-m", "launch.cli"])
    assert proc.returncode != 0 and not OUR_FRAME.search(proc.stderr), proc.stderr[-4000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("dimsum train: ")]
    assert len(lines) == 1 and "train.global_batch: got 9; global_batch=9 must be a multiple of" in lines[0]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory, digits_shards: Path) -> World:
    """A real 2-step run with a checkpoint, to resume with a changed config."""
    world = World(tmp_path_factory.mktemp("run"), digits_shards, {})
    proc = dimsum(world.train())
    assert proc.returncode == 0, proc.stderr[-4000:]
    return world


@pytest.mark.parametrize(("override", "message"), [
    ("model.scan_order=zigzag-8", "model.scan_order: 'sweep-4' -> 'zigzag-8'"),
    ("model.depth=3", "model.depth: 4 -> 3"),
], ids=["scan-order", "depth"])
@pytest.mark.slow
def test_resume_after_a_model_change_names_the_fields(trained_run: World, override: str,
                                                      message: str) -> None:
    case = Case(override, lambda w: w.train(None, override), 2, message)
    check(dimsum(case.args(trained_run)), case, "train")


@pytest.mark.slow
def test_resume_with_other_changes_logs_them(trained_run: World) -> None:
    proc = dimsum(trained_run.train(None, "train.max_steps=3"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "resuming with a changed config: train.max_steps: 2 -> 3" in proc.stdout


def test_unknown_deepspeed_extra_keys_are_named_in_a_warning() -> None:
    proc = dimsum(["config", "show", CONFIG, "deepspeed.extra.zero_optimizaton.stage=2",
                   "deepspeed.extra.steps_per_print=10"])
    assert proc.returncode == 0, proc.stderr
    assert "deepspeed.extra: DeepSpeed does not know the key(s) zero_optimizaton;" in proc.stderr
    assert "steps_per_print" not in proc.stderr


@pytest.mark.slow
def test_skipped_samples_are_counted_per_window_in_mlflow_and_totalled(tmp_path: Path,
                                                                      digits_shards: Path) -> None:
    world = World(tmp_path, digits_shards, {})
    shards = world.shards(every_shard(lambda f, i: rewrite_block(f, i, 0, with_array("latent.npy",
                                                                                     set_row(np.nan)))))
    proc = dimsum(world.train(shards, "data.on_error=skip", "data.random_flip=false", "tracking.enabled=true",
                              "name=skips"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "==> data: 1 bad sample(s) skipped on all ranks in this attempt" in proc.stdout
    assert "Traceback" not in proc.stderr
    run_dir = tmp_path / "runs" / "skips"
    history = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}").get_metric_history(saved_run_id(run_dir),
                                                                                    "data_skipped")
    assert sorted((m.step, m.value) for m in history) == [(1, 1.0), (2, 0.0)]  # one pass read, one NaN row


def test_prepare_reads_a_folder_behind_a_symlink_loop_once(tmp_path: Path, tiny_vae_dir: Path) -> None:
    source = tmp_path / "images"
    source.mkdir()
    Image.fromarray(np.full((64, 64, 3), 128, dtype=np.uint8)).save(source / "one.png")
    (source / "loop").symlink_to(".", target_is_directory=True)
    proc = dimsum(["prepare", source, "--out", tmp_path / "out", "--vae", tiny_vae_dir, "--resolution", "64",
                   "--layout", "flat", "--quiet"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["num_samples"] == 1


def children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.multiprocess
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")
def test_ranks_die_with_a_killed_torchrun_agent(tmp_path: Path) -> None:
    """kill -9 of the agent: its ranks (their own session, so no signal reaches them) must not live on."""
    script = tmp_path / "rank.py"
    script.write_text(f"""import os, time
from launch.train.distributed import die_with_launcher
die_with_launcher()
open(os.path.join({str(tmp_path)!r}, "ready-" + os.environ["RANK"]), "w").close()
time.sleep(300)
""")
    agent = subprocess.Popen([*TORCHRUN, str(script)], env=env(), cwd=REPO, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    ranks: list[int] = []
    try:
        deadline = time.monotonic() + BOUND_S
        while len(list(tmp_path.glob("ready-*"))) < 2:
            assert time.monotonic() < deadline and agent.poll() is None, "the ranks did not start"
            time.sleep(0.2)
        ranks = children(agent.pid)
        assert len(ranks) == 2
        os.kill(agent.pid, signal.SIGKILL)
        agent.wait()
        deadline = time.monotonic() + 30
        while any(alive(r) for r in ranks) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(alive(r) for r in ranks), "ranks kept running after their agent was killed"
    finally:
        for pid in [agent.pid, *ranks]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

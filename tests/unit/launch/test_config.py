"""The typed config layer: composition, overrides, and errors that name the field."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dimsum.config import ConfigError
from dimsum.diffusion import OBJECTIVES
from launch.cli import COMMANDS, main
from launch.components import ObjectiveConfig, option_fields
from launch.config import ExperimentConfig, config_changes, dump_config, load_config, parse_yaml, saved_config
from tests.support.paths import FIXTURES, REPO

CONFIG_DEMO = REPO / "configs" / "demo_cpu.yaml"


@pytest.fixture()
def experiment_yaml(tmp_path: Path) -> Path:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "small.yaml").write_text("name: DiMSUM-debug\ninput_size: 16\n")
    (tmp_path / "base.yaml").write_text("seed: 7\ntrain:\n  lr: 0.001\n  global_batch: 8\n")
    (tmp_path / "exp.yaml").write_text(
        "defaults:\n  - base\n  - model: small\nname: exp\ntrain:\n  global_batch: 16\n"
    )
    return tmp_path / "exp.yaml"


def test_defaults_compose_in_order_and_file_wins(experiment_yaml: Path) -> None:
    cfg = load_config(experiment_yaml)
    assert cfg.seed == 7 and cfg.name == "exp"
    assert cfg.train.lr == 0.001 and cfg.train.global_batch == 16
    assert cfg.model.name == "DiMSUM-debug" and cfg.model.input_size == 16


def test_model_fields_start_from_the_registry_entry(experiment_yaml: Path) -> None:
    cfg = load_config(experiment_yaml, ["model.name=DiMSUM-L/2", "model.depth=4"])
    assert (cfg.model.hidden_size, cfg.model.depth, cfg.model.family) == (1024, 4, "dimsum")


def test_overrides_parse_yaml_scalars(experiment_yaml: Path) -> None:
    cfg = load_config(experiment_yaml, ["train.lr=3e-4", "deepspeed.zero_stage=3", "tracking.uri=null"])
    assert cfg.train.lr == pytest.approx(3e-4) and cfg.deepspeed.zero_stage == 3 and cfg.tracking.uri is None


def test_yaml_numbers_follow_yaml_1_2(experiment_yaml: Path) -> None:
    cfg = load_config(experiment_yaml, ["train.lr=1e-4", "launch.time=24:00:00"])
    assert cfg.train.lr == pytest.approx(1e-4) and cfg.launch.time == "24:00:00"


def test_resolved_config_round_trips(experiment_yaml: Path, tmp_path: Path) -> None:
    cfg = load_config(experiment_yaml, ["model.depth=8"])
    saved = tmp_path / "resolved.yaml"
    saved.write_text(dump_config(cfg))
    assert load_config(saved) == cfg
    assert ExperimentConfig.from_dict(yaml.safe_load(saved.read_text())) == cfg


@pytest.mark.parametrize(
    ("override", "path", "words"),
    [
        ("model.depth=-1", "model.depth", "positive"),
        ("model.nme=x", "model.nme", "did you mean 'name'"),
        ("train.global_batch=abc", "train.global_batch", "expected int"),
        ("train.lr=true", "train.lr", "expected float"),
        ("deepspeed.zero_stage=4", "deepspeed.zero_stage", "one of 1, 2, 3"),
        ("model.name=DiMSUM-XXL", "model.name", "registered model"),
        ("train.keep_last=1", "train.keep_last", ">= 2"),
        ("nosuchsection.x=1", "nosuchsection", "unknown key"),
    ],
)
def test_bad_values_name_the_dotted_field(experiment_yaml: Path, override: str, path: str,
                                          words: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(experiment_yaml, [override])
    assert info.value.path == path
    assert words in str(info.value)


def test_missing_file_and_bad_yaml_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="existing YAML"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="valid YAML"):
        load_config(tmp_path / "bad.yaml")


def dimsum_cli(*args: str, check: bool = False) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "launch.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, check=check)


@pytest.mark.parametrize("override", ["model.depth=-1", "model.nme=x", "train.global_batch=abc"])
def test_cli_rejects_bad_override_with_one_line(experiment_yaml: Path, override: str) -> None:
    proc = dimsum_cli("config", "show", str(experiment_yaml), override)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and override.split("=", maxsplit=1)[0] in lines[0], proc.stderr


def test_cli_shows_and_saves_resolved_config(experiment_yaml: Path, tmp_path: Path) -> None:
    out = tmp_path / "saved.yaml"
    proc = dimsum_cli("config", "show", str(experiment_yaml), "train.max_steps=5", "--save", str(out),
                      check=True)
    assert yaml.safe_load(proc.stdout)["train"]["max_steps"] == 5
    assert load_config(out).train.max_steps == 5


def test_cli_help_lists_every_registered_command(capsys: pytest.CaptureFixture[str]) -> None:
    """The list from a real ``python -m launch.cli``; each command's own help in-process (a process per
    command spent ~3 s each importing its module)."""
    proc = dimsum_cli("--help", check=True)
    assert all(name in proc.stdout for name in COMMANDS)
    for name in COMMANDS:
        with pytest.raises(SystemExit) as exit_:
            main([name, "--help"])
        out = capsys.readouterr()
        assert exit_.value.code == 0 and f"dimsum {name}" in out.out, out.err


def test_yaml_refuses_duplicate_keys_and_alias_bombs_but_keeps_merge_keys() -> None:
    with pytest.raises(yaml.YAMLError, match="duplicate key 'lr'"):
        parse_yaml("train:\n  lr: 1\n  lr: 2\n")
    levels = "".join(f"{a}: &{a} [{', '.join([f'*{b}'] * 9)}]\n" for b, a in zip("abcdefgh", "bcdefghi",
                                                                                 strict=True))
    with pytest.raises(yaml.YAMLError, match="alias bomb"):
        parse_yaml("a: &a [x, x, x, x, x, x, x, x, x]\n" + levels)
    merged = parse_yaml("base: &b {lr: 1, steps: 2}\ntrain:\n  <<: *b\n  lr: 3\n")
    assert merged["train"] == {"lr": 3, "steps": 2}


def test_config_changes_name_every_differing_field() -> None:
    saved = {"model": {"depth": 2, "scan_order": "sweep-4"}, "train": {"lr": 1.0}}
    new = {"model": {"depth": 2, "scan_order": "zigzag-8"}, "train": {"lr": 2.0, "warmup_steps": 5}}
    assert config_changes(saved, new) == ["model.scan_order: 'sweep-4' -> 'zigzag-8'", "train.lr: 1.0 -> 2.0",
                                          "train.warmup_steps: (absent) -> 5"]


def test_objective_and_grid_sections_and_their_deprecated_aliases() -> None:
    cfg = load_config(CONFIG_DEMO, ["objective.kind=ddpm", "grid.sampler.method=ddpm"])
    assert cfg.objective.options() == {"timesteps": 1000} and cfg.grid.sampler.method == "ddpm"
    with pytest.warns(FutureWarning) as warned:
        old = load_config(CONFIG_DEMO, ["train.sample_steps=3", "train.path=Linear"])
    assert sorted(str(w.message) for w in warned) == [
        "config: train.path is deprecated; use objective.path",
        "config: train.sample_steps is deprecated; use grid.sampler.steps"]
    assert (old.grid.sampler.steps, old.grid.sampler.method, old.objective.path) == (3, "euler", "Linear")
    with pytest.warns(FutureWarning), pytest.raises(ConfigError, match=r"^train\.path: got 'SBDM'"):
        load_config(CONFIG_DEMO, ["train.path=SBDM"])
    with pytest.raises(ConfigError, match=r"objective\.path: got 'Linear'; not an option of objective"):
        load_config(CONFIG_DEMO, ["objective.kind=ddpm", "objective.path=Linear"])
    with pytest.raises(ConfigError, match=r"grid\.every: got 3; expected a multiple of train\.ckpt_every"):
        load_config(CONFIG_DEMO, ["grid.every=3"])


def test_a_config_saved_before_the_sections_loads_as_flow_on_its_path() -> None:
    saved = yaml.safe_load((FIXTURES / "pre13b" / "config.yaml").read_text())
    assert "objective" not in saved and "sample_every" in saved["train"]
    cfg = saved_config(saved)
    assert (cfg.objective.kind, cfg.objective.path, cfg.grid.every, cfg.grid.count) == ("flow", "GVP", 0, 80)
    assert cfg.grid.sampler.method == "euler"


class _Sharpened:
    """Stand-in objectives for the options table: one with an option of its own and one ddpm has too."""

    def __init__(self, sharpness: float = 2.0, timesteps: int = 1000) -> None:
        self.sharpness, self.timesteps = sharpness, timesteps


class _OtherTimesteps:
    def __init__(self, timesteps: int = 500) -> None:
        self.timesteps = timesteps


class _NoDefault:
    def __init__(self, sharpness: float) -> None:
        self.sharpness = sharpness


def test_objective_options_are_read_off_the_registered_constructors() -> None:
    fields = [f.name for f in dataclasses.fields(ObjectiveConfig)]
    assert fields == ["kind", "path", "time_sampling", "timesteps"]
    fields = option_fields({**OBJECTIVES, "sharpened": _Sharpened})
    assert [(name, field.default) for name, _, field in fields] == [
        ("path", "GVP"), ("time_sampling", "uniform"), ("timesteps", 1000), ("sharpness", 2.0)]


@pytest.mark.parametrize(("objective", "problem"), [
    (_OtherTimesteps, "option 'timesteps' differs from another objective's"),
    (_NoDefault, "option 'sharpness' needs a type annotation and a default"),
])
def test_an_objective_option_that_cannot_be_a_config_field_is_refused(objective: type, problem: str) -> None:
    with pytest.raises(TypeError, match=f"objective 'bad': {problem}"):
        option_fields({**OBJECTIVES, "bad": objective})

"""The loop's contract with its hooks and its checkpointer: which events fire, in which order, and when a
checkpoint is written; and the checkpoint-state registry's refusal of a foreign EMA shard layout."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from launch.train.checkpoint import MARKER, CheckpointError, CheckpointManager
from launch.train.checkpointer import Checkpointer
from launch.train.state import ShardOffsets
from tests.support.trainer_helpers import CONFIG, REPO, base_env, overrides

RECORDING_RUN = """
import json, sys
from launch.config import load_config
from launch.train.checkpoint import MARKER
from launch.train.hooks import Hook
from launch.train.trainer import Trainer

class Recorder(Hook):
    def __init__(self):
        self.events = []
    def on_fit_start(self, trainer):
        self.events.append(["fit_start", trainer.state.step])
    def on_step_start(self, trainer, step):
        self.events.append(["step_start", step])
    def on_step_end(self, trainer, step):
        self.events.append(["step_end", step, trainer.report.loss == trainer.report.loss])
    def on_save(self, trainer, step):
        self.events.append(["save", step, (trainer.checkpointer.manager.step_dir(step) / MARKER).is_file()])
    def on_fit_end(self, trainer, stopped):
        self.events.append(["fit_end", stopped])

trainer = Trainer(load_config(sys.argv[1], sys.argv[2:]))
recorder = Recorder()
trainer.hooks.append(recorder)
try:
    trainer.fit()
finally:
    trainer.close()
print("EVENTS " + json.dumps(recorder.events))
"""


@pytest.mark.multiprocess
def test_the_loop_calls_every_hook_event_in_order_and_saves_on_its_cadence(tmp_path: Path,
                                                                           digits_shards: Path) -> None:
    args = overrides(tmp_path, digits_shards, "hooks", max_steps=5, ckpt_every=2)
    proc = subprocess.run([sys.executable, "-c", RECORDING_RUN, str(CONFIG), *args], env=base_env(),
                          capture_output=True, text=True, timeout=300, cwd=REPO, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    events = json.loads(proc.stdout.split("EVENTS ", 1)[1])
    expected = [["fit_start", 0]]
    for step in range(1, 6):
        expected += [["step_start", step], ["step_end", step, True]]
        if step in (2, 4, 5):  # every 2 steps, and the last one
            expected.append(["save", step, True])
    assert events == [*expected, ["fit_end", False]]
    assert sorted(p.name for p in (tmp_path / "hooks").glob("step-*")) == ["step-0000004", "step-0000005"]


class FileStates:
    """The registry's save interface over one plain file: enough for the checkpointer's cadence."""

    def save(self, path: Path, rank: int, before_write) -> list[Path]:
        target = path / f"state-{rank}.txt"
        before_write(str(target))
        target.write_text("x")
        return [target]


def test_the_checkpointer_saves_every_n_steps_at_the_last_step_and_when_stopping(tmp_path: Path) -> None:
    written: list[str] = []
    checkpointer = Checkpointer(CheckpointManager(tmp_path, log=lambda _: None), FileStates(), every=3,
                                last_step=7, before_write=lambda step: written.append, log=lambda _: None)
    saved = [step for step in range(1, 8) if checkpointer.after_step(step, stopping=step == 4)]
    assert saved == [3, 4, 6, 7]
    assert [Path(p).parent.name for p in written] == ["step-0000003", "step-0000004", "step-0000006",
                                                        "step-0000007"]
    assert all((tmp_path / f"step-{s:07d}" / MARKER).is_file() for s in (6, 7))
    assert checkpointer.latest().step == 7


def test_a_failed_final_save_is_an_error_and_an_earlier_one_is_not(tmp_path: Path) -> None:
    def disk_full(path: str) -> None:
        raise OSError(28, "No space left on device", path)

    checkpointer = Checkpointer(CheckpointManager(tmp_path, log=lambda _: None), FileStates(), every=2,
                                last_step=4, before_write=lambda step: disk_full, log=lambda _: None)
    assert checkpointer.after_step(2, stopping=False) is False
    with pytest.raises(RuntimeError, match="the final checkpoint \\(step 4\\) could not be written"):
        checkpointer.after_step(4, stopping=False)
    assert not any(tmp_path.glob("step-*"))


def test_an_ema_shard_saved_with_another_partition_is_refused_by_name() -> None:
    offsets = ShardOffsets(lambda: {"blocks.0.weight": 0, "blocks.1.weight": 128}, "run/step-0000004")
    offsets.load_state_dict({"blocks.0.weight": 0, "blocks.1.weight": 128})
    with pytest.raises(CheckpointError, match=r"run/step-0000004: the EMA shard layout .* 'blocks.1.weight'"):
        offsets.load_state_dict({"blocks.0.weight": 0, "blocks.1.weight": 64})

"""CheckpointManager with simulated ranks: each rank is a thread with its own manager, and the injected
collectives are real synchronisation points (torchtitan style), so ordering bugs would deadlock or fail."""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from launch.train import checkpoint
from launch.train.checkpoint import MARKER, OURS, POINTER, CheckpointManager, atomic_write_text, mark_ours


class Group:
    """``world`` simulated ranks sharing a barrier and an all-true vote."""

    def __init__(self, world: int) -> None:
        self.world = world
        self._barrier = threading.Barrier(world, timeout=10)
        self._votes: list[bool] = []
        self._lock = threading.Lock()

    def barrier(self) -> None:
        self._barrier.wait()

    def all_true(self, flag: bool) -> bool:
        with self._lock:
            self._votes.append(flag)
        self._barrier.wait()  # every vote is in
        result = all(self._votes)
        if self._barrier.wait() == 0:  # everyone has read them: one rank clears
            self._votes.clear()
        self._barrier.wait()  # cleared before anyone votes again
        return result

    def managers(self, root: Path, logs: list[str], **kw: object) -> list[CheckpointManager]:
        return [CheckpointManager(root, rank=r, world_size=self.world, barrier=self.barrier,
                                  all_true=self.all_true, log=logs.append, **kw) for r in range(self.world)]


def run_ranks(managers: list[CheckpointManager], fn: Callable[[CheckpointManager], object]) -> list[object]:
    results: list[object] = [None] * len(managers)
    errors: list[BaseException] = []

    def target(i: int) -> None:
        try:
            results[i] = fn(managers[i])
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=target, args=(i,)) for i in range(len(managers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    if errors:
        raise errors[0]
    return results


def shard_writer(content: str = "x", fail_rank: int | None = None) -> Callable[[CheckpointManager], bool]:
    def save_step(step: int) -> Callable[[CheckpointManager], bool]:
        def fn(m: CheckpointManager) -> bool:
            def write(path: Path) -> list[Path]:
                if m.rank == fail_rank:
                    raise OSError(errno.ENOSPC, "No space left on device")
                shard = path / f"shard-{m.rank}.bin"
                shard.write_text(f"{content}{step}")
                return [shard]
            return m.save(step, write)
        return fn
    return save_step


def save(managers: list[CheckpointManager], step: int, fail_rank: int | None = None) -> list[object]:
    return run_ranks(managers, shard_writer(fail_rank=fail_rank)(step))


def test_save_commits_marker_and_pointer_after_every_rank_wrote(tmp_path: Path) -> None:
    logs: list[str] = []
    managers = Group(3).managers(tmp_path, logs)
    assert save(managers, 10) == [True, True, True]
    step = tmp_path / "step-0000010"
    lists = [f"sha256-rank-0000{r}.json" for r in range(3)]
    shards = ["shard-0.bin", "shard-1.bin", "shard-2.bin"]
    assert sorted(p.name for p in step.iterdir()) == [OURS, MARKER, *lists, *shards]
    assert checkpoint.damage(step) is None
    assert (tmp_path / POINTER).read_text() == "step-0000010\n"
    assert managers[1].latest() == checkpoint.Checkpoint(10, step)


def test_failed_write_on_one_rank_fails_the_save_everywhere_and_keeps_the_previous(tmp_path: Path) -> None:
    logs: list[str] = []
    managers = Group(2).managers(tmp_path, logs)
    save(managers, 1)
    assert save(managers, 2, fail_rank=1) == [False, False]
    assert not (tmp_path / "step-0000002").exists()
    assert (tmp_path / POINTER).read_text() == "step-0000001\n"
    assert managers[0].latest().step == 1
    assert any("No space left on device" in line for line in logs)
    assert save(managers, 3) == [True, True]  # training goes on and the next save works


def test_failed_commit_on_rank_zero_is_reported_to_all_ranks(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    managers = Group(2).managers(tmp_path, [])
    save(managers, 1)

    def full_disk(path: Path, text: str) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(checkpoint, "atomic_write_text", full_disk)
    assert save(managers, 2) == [False, False]
    assert not (tmp_path / "step-0000002").exists() and managers[1].latest().step == 1


def test_incomplete_directory_is_reported_ignored_and_replaced(tmp_path: Path) -> None:
    logs: list[str] = []
    managers = Group(2).managers(tmp_path, logs)
    save(managers, 4)
    partial = tmp_path / "step-0000006"
    mark_ours(partial)  # rank 0 creates and marks it, then a rank died before the COMPLETE marker
    (partial / "shard-0.bin").write_text("half")
    assert managers[0].latest().step == 4
    assert any("ignoring incomplete checkpoint" in line and "step-0000006" in line for line in logs)
    assert save(managers, 6) == [True, True]
    assert (partial / "shard-0.bin").read_text() == "x6" and (partial / MARKER).is_file()


def test_keep_last_k_plus_milestones_and_stale_partials_are_pruned(tmp_path: Path) -> None:
    managers = Group(2).managers(tmp_path, [], keep_last=2, milestone_every=4)
    for step in (1, 2, 3):
        save(managers, step)
    mark_ours(tmp_path / "step-0000004")  # stale partial, older than the next complete save
    for step in (5, 6, 7, 8, 9):
        save(managers, step)
    complete, incomplete = managers[0].scan()
    assert [c.step for c in complete] == [8, 9]
    assert incomplete == []


def test_milestones_survive_pruning(tmp_path: Path) -> None:
    managers = Group(1).managers(tmp_path, [], keep_last=2, milestone_every=3)
    for step in range(1, 8):
        save(managers, step)
    assert [c.step for c in managers[0].scan()[0]] == [3, 6, 7]


def test_saving_an_already_complete_step_is_a_no_op(tmp_path: Path) -> None:
    managers = Group(2).managers(tmp_path, [])
    save(managers, 5)
    calls: list[int] = []
    assert run_ranks(managers, lambda m: m.save(5, lambda p: calls.append(m.rank))) == [True, True]
    assert calls == [] and (tmp_path / "step-0000005" / "shard-0.bin").read_text() == "x5"


def test_atomic_write_leaves_no_temp_file(tmp_path: Path) -> None:
    atomic_write_text(tmp_path / "latest", "a\n")
    atomic_write_text(tmp_path / "latest", "b\n")
    assert [p.name for p in tmp_path.iterdir()] == ["latest"] and (tmp_path / "latest").read_text() == "b\n"


def test_keep_last_below_two_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="keep_last must be >= 2"):
        CheckpointManager(tmp_path, keep_last=1)


def test_a_foreign_folder_in_the_way_of_a_save_fails_it_on_every_rank_and_is_kept(tmp_path: Path) -> None:
    managers = Group(2).managers(tmp_path, [])
    foreign = tmp_path / "step-0000003"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(checkpoint.CheckpointError, match="not created by dimsum"):
        save(managers, 3)
    assert (foreign / "notes.txt").read_text() == "mine" and not (foreign / OURS).exists()


def test_pruning_leaves_folders_dimsum_did_not_create(tmp_path: Path) -> None:
    logs: list[str] = []
    managers = Group(1).managers(tmp_path, logs, keep_last=2)
    foreign = tmp_path / "step-0000001"
    foreign.mkdir()
    for step in (2, 3, 4):
        save(managers, step)
    assert foreign.is_dir() and any(f"leaving {foreign} alone" in line for line in logs)
    assert [c.step for c in managers[0].scan()[0]] == [3, 4]


def test_damage_names_the_file_and_refuses_unlisted_or_escaping_entries(tmp_path: Path) -> None:
    managers = Group(2).managers(tmp_path, [])
    save(managers, 1)
    step = tmp_path / "step-0000001"
    assert checkpoint.damage(step) is None
    (step / "extra.pt").write_bytes(b"planted")
    assert checkpoint.damage(step) == "extra.pt is not one of the files the ranks wrote"
    (step / "extra.pt").unlink()
    listing = step / "sha256-rank-00001.json"
    forged = listing.read_text().replace('"shard-1.bin"', '"../shard-1.bin"')
    listing.write_text(forged)
    assert checkpoint.damage(step) == "shard-1.bin is not one of the files the ranks wrote"
    (step / "shard-1.bin").unlink()
    assert checkpoint.damage(step) == "../shard-1.bin is missing"  # never read outside the directory

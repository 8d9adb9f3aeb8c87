"""Reference runs shared across integration modules: each is trained once per session."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.trainer_helpers import RUNS, ZERO2, ok, overrides, torchrun


@pytest.fixture(scope="session")
def zero2_reference_of(tmp_path_factory: pytest.TempPathFactory,
                       digits_shards: Path) -> Callable[[str], Path]:
    """The uninterrupted 8-step, 2-rank ZeRO-2 run of one of :data:`RUNS`, made on first use: the
    kill/resume runs of test_trainer.py and test_remote_shards.py's run over HTTP end bit-identical to it."""
    root = tmp_path_factory.mktemp("references")
    made: dict[str, Path] = {}

    def reference(kind: str) -> Path:
        if kind not in made:
            name = "z2-ref" if kind == "dimsum-flow" else f"z2-ref-{kind}"
            ok(torchrun([*overrides(root, digits_shards, name, max_steps=8), *ZERO2, *RUNS[kind]]))
            assert (root / name / "samples" / "step-0000004.png").is_file()
            assert (root / name / "samples" / "step-0000004.quality.json").is_file()  # the hook was on
            made[kind] = root / name
        return made[kind]

    return reference

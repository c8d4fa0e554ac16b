"""The training tests' shared run: `python train.py stage=1` then `stage=2`, literally, as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from script_runs import TWO_STAGE_OVERRIDES

ROOT = Path(__file__).resolve().parents[2]


def run_train(*overrides: str) -> str:
    """`python train.py OVERRIDES` as a user runs it (Hydra's logging included); stdout and stderr in order."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *overrides], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300,
    )  # bytes: text mode would turn tqdm's carriage returns into newlines
    output = result.stdout.decode()
    assert result.returncode == 0, output[-3000:]
    return output


@dataclass(frozen=True)
class TwoStageRun:
    """The checkpoints folder (tiny-stage1/, tiny-stage2/) and what each stage printed."""

    checkpoints: Path
    output: dict[int, str]


def _two_stage_run(checkpoints: Path) -> TwoStageRun:
    output = {stage: run_train(*TWO_STAGE_OVERRIDES[stage], f"checkpoints_dir={checkpoints}") for stage in (1, 2)}
    return TwoStageRun(checkpoints, output)


@pytest.fixture(scope="session")
def tiny_two_stage_run(tmp_path_factory, worker_id) -> TwoStageRun:
    """Stage 1 then stage 2 on the tiny preset, 6 steps each, a checkpoint every 3, the progress bar redrawn
    every step (stage 2 finds stage 1 by default). Read-only for the tests that use it.

    Built once for the whole session: under pytest-xdist the first worker to need it builds it in the
    folder the workers share, under a file lock, and the other reads it (xdist's documented recipe); one
    session-scoped fixture per worker would run both trainings twice.
    """
    if worker_id == "master":  # no xdist
        return _two_stage_run(tmp_path_factory.mktemp("checkpoints"))
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp().parent / "tiny-two-stage-run"
    outputs = shared / "outputs.json"
    with FileLock(f"{shared}.lock"):
        if not outputs.is_file():
            run = _two_stage_run(shared / "checkpoints")
            outputs.write_text(json.dumps({str(stage): text for stage, text in run.output.items()}))
    return TwoStageRun(shared / "checkpoints", {int(stage): text for stage, text in json.loads(outputs.read_text()).items()})


@pytest.fixture
def two_stage_run(tiny_two_stage_run) -> Path:
    return tiny_two_stage_run.checkpoints

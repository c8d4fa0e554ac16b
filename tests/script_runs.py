"""How the tests run `train.py` and `eval.py`: as a new interpreter (the literal command), or forked from a
process that has already imported the libraries (runs that only need a process of their own: a kill -9, a
rank of two, an exit code and what the script printed).

Importing torch, transformers, Lightning and Hydra takes ~6 s of CPU per interpreter, more than a tiny run
trains; the suite starts dozens of runs. `forked_script` runs the same script under `runpy` with its own
`sys.argv`, Hydra and all, in a child of a multiprocessing fork server that imported them once per test
worker. A fork server, not a plain fork: the server never runs torch ops or starts threads, so its children
start from a clean, single-threaded state (a fork of the pytest worker itself would inherit OpenMP and
execnet threads). Ranks of a data-parallel run get the variables torchrun sets, so Lightning joins them as it
joins torchrun's processes. Lightning's own launcher starts the second rank as `python train.py ...` in a new
interpreter, also from a forked first rank (tests/training/test_sharding.py).

Also: the overrides of the training tests' shared two-stage run (tests/training/conftest.py), for the tests
that repeat it (the kill-and-resume test compares against it).
"""

from __future__ import annotations

import multiprocessing
import os
import runpy
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = ROOT / "train.py"
# Hydra's own logging setup is skipped: the tests read Lightning's and the package's lines as printed.
QUIET_HYDRA = ["hydra/job_logging=none", "hydra/hydra_logging=none"]

_COMMON = ["model=tiny", "trainer.max_steps=6", "checkpoint_every=3", "trainer.log_every_n_steps=1", "progress_every=1"]

# Stage 2 with LoRA dropout, so that repeating it killed midway also shows that a resume restores the random
# state the dropout masks are drawn from.
TWO_STAGE_OVERRIDES = {
    1: ["stage=1", *_COMMON],
    2: ["stage=2", *_COMMON, "stage2.lora.dropout=0.1"],
}


def run_script(script: Path, arguments, cwd: Path = ROOT, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python SCRIPT ARGUMENTS` in a new interpreter, as a user runs it; text output captured."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    return subprocess.run([sys.executable, str(script), *arguments], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@dataclass(frozen=True)
class ForkedRun:
    """Each process's exit code (negative: killed by that signal), stdout and stderr, in rank order."""

    exitcodes: list[int]
    stdouts: list[str]
    stderrs: list[str]

    @property
    def returncode(self) -> int:
        """Rank 0's exit code, as the shell sees a launch."""
        return self.exitcodes[0]

    @property
    def stdout(self) -> str:
        return self.stdouts[0]

    @property
    def stderr(self) -> str:
        return self.stderrs[0]

    @property
    def output(self) -> str:
        """Every rank's stdout then stderr."""
        return "".join(out + err for out, err in zip(self.stdouts, self.stderrs))


def _script_main(script: str, arguments: list[str], environment: dict[str, str], cwd: str, stdout: str, stderr: str) -> None:
    """The fork server's child: stdout and stderr to files (file descriptors, so C-level writes land too),
    this process's variables and folder, then the script as `__main__` (its sys.exit is the exit code)."""
    for descriptor, path in ((1, stdout), (2, stderr)):
        opened = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(opened, descriptor)
        os.close(opened)
    os.environ.update(environment)
    os.chdir(cwd)
    sys.argv = [script, *arguments]
    runpy.run_path(script, run_name="__main__")


def _fork_server():
    """The forkserver context, its server preloaded with what train.py and eval.py import (set before it
    first starts; later calls find it running)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["hydra", "lightning.pytorch", "transformers", "peft", "sklearn.linear_model",
                                    "protein_llava.training.run", "protein_llava.training.console",
                                    "protein_llava.evaluation.runner", "fault_injection"])
    return context


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.is_file() else ""  # absent: the child died before opening it


def forked_script(script: Path, arguments, logs: Path, world_size: int = 1, cwd: Path = ROOT, timeout: int = 300) -> ForkedRun:
    """`python SCRIPT ARGUMENTS` in `world_size` forked processes (the ranks of one torchrun-style launch when
    more than one); rank N's output in `logs`/rank<N>.stdout and .stderr."""
    logs.mkdir(parents=True, exist_ok=True)
    context = _fork_server()
    port = _free_port()
    processes = []
    for rank in range(world_size):
        environment = {}
        if world_size > 1:
            environment = dict(
                MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world_size), RANK=str(rank), LOCAL_RANK=str(rank),
                LOCAL_WORLD_SIZE=str(world_size), GROUP_RANK="0", ROLE_RANK=str(rank), TORCHELASTIC_RUN_ID="tests",
            )
        arguments_of_rank = (str(script), list(arguments), environment, str(cwd), str(logs / f"rank{rank}.stdout"), str(logs / f"rank{rank}.stderr"))
        processes.append(context.Process(target=_script_main, args=arguments_of_rank))
        processes[-1].start()
    for process in processes:
        process.join(timeout)
    for process in processes:
        if process.is_alive():  # a hung collective: never leave a rank behind
            process.kill()
            process.join()
    return ForkedRun(
        [process.exitcode for process in processes],
        [_read(logs / f"rank{rank}.stdout") for rank in range(world_size)],
        [_read(logs / f"rank{rank}.stderr") for rank in range(world_size)],
    )


def forked_call(function, *arguments, timeout: int = 120) -> int:
    """function(*arguments) in a forked process (`function` importable by name there); its exit code."""
    process = _fork_server().Process(target=function, args=arguments)
    process.start()
    process.join(timeout)
    if process.is_alive():
        process.kill()
        process.join()
    return process.exitcode


def forked_train(overrides, logs: Path, world_size: int = 1, timeout: int = 300, check: bool = True) -> ForkedRun:
    """train.py OVERRIDES (Hydra's logging setup skipped) through `forked_script`. check: every rank exited 0."""
    run = forked_script(TRAIN_SCRIPT, [*overrides, *QUIET_HYDRA], logs, world_size=world_size, timeout=timeout)
    if check:
        assert run.exitcodes == [0] * world_size, run.output[-3000:]
    return run

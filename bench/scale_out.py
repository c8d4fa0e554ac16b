"""Step time of one stage-2 run (projector + LoRA) on the demo shape: FSDP over two processes, DDP over two
processes, and one process, with the same global batch. Ratios measured in this one run, on this machine.

    python bench/scale_out.py [--steps 24] [--warmup 4] [--out bench/scale_out.json]

Each engine runs `train.py` as a user does (model=smollm2-demo, SmolLM2-135M + random ESM-2 8M, float32,
global batch 8: 8 on one process, 4 per process on two); a callback (`StepClock`, this file) times the
optimizer steps after the warm-up on rank 0. On a CPU machine the two processes use gloo and share the cores
one process would use alone (OMP_NUM_THREADS=1 each, against all cores for the one process): what this
measures is the engines' overhead on the same work, not a GPU speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import lightning as L

ROOT = Path(__file__).resolve().parents[1]


class StepClock(L.Callback):
    """Seconds per optimizer step after `warmup` steps, written as JSON to `path` by rank 0 at the end."""

    def __init__(self, path: str, warmup: int):
        self.path, self.warmup = path, warmup
        self.started = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.warmup:
            self.started = (time.perf_counter(), trainer.global_step)

    def on_train_end(self, trainer, pl_module):
        if trainer.is_global_zero and self.started is not None:
            start, step = self.started
            steps = trainer.global_step - step
            Path(self.path).write_text(json.dumps({"seconds_per_step": (time.perf_counter() - start) / steps, "steps": steps}))


ENGINES = {
    "one_process": ["data.batch_size=8"],
    "ddp_2": ["trainer=ddp", "trainer.accelerator=cpu", "data.batch_size=4"],
    "fsdp_2": ["trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2", "data.batch_size=4"],
}


def time_engine(name: str, steps: int, warmup: int, folder: Path) -> float:
    clock = folder / f"{name}.json"
    overrides = [
        "stage=2", "model=smollm2-demo", "trainer.precision=32-true", f"trainer.max_steps={steps}", "diagnostics.every=0",
        "checkpoint_every=100000", f"checkpoints_dir={folder}", f"out={folder / name}", *ENGINES[name],
        f"callbacks=[{{_target_: scale_out.StepClock, path: '{clock}', warmup: {warmup}}}]",
        "hydra/job_logging=none", "hydra/hydra_logging=none",
    ]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'bench'}"}
    if name != "one_process":
        env["OMP_NUM_THREADS"] = "1"  # two processes share the cores
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), *overrides], cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{result.stderr[-3000:]}")
    return json.loads(clock.read_text())["seconds_per_step"]


def cpu_model() -> str:
    """The CPU's model name (Linux), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "scale_out.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        # The stage-1 projector stage 2 starts from: one short stage-1 run on the same shape.
        subprocess.run([sys.executable, str(ROOT / "train.py"), "stage=1", "model=smollm2-demo", "trainer.max_steps=1",
                        "stage1.align_steps=0", "diagnostics.every=0", f"checkpoints_dir={folder}",
                        "hydra/job_logging=none", "hydra/hydra_logging=none"], cwd=ROOT, check=True, capture_output=True)
        seconds = {name: time_engine(name, args.steps, args.warmup, folder) for name in ENGINES}
    results = {
        "date": date.today().isoformat(),
        "machine": f"{cpu_model()}, {os.cpu_count()} cores",
        "command": " ".join(["python bench/scale_out.py", *sys.argv[1:]]),
        "seconds_per_step": {k: round(v, 4) for k, v in seconds.items()},
        "fsdp_over_ddp": round(seconds["fsdp_2"] / seconds["ddp_2"], 3),
        "ddp_over_one_process": round(seconds["ddp_2"] / seconds["one_process"], 3),
        "fsdp_over_one_process": round(seconds["fsdp_2"] / seconds["one_process"], 3),
    }
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

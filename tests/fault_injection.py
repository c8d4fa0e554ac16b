"""Lightning callbacks that tests inject through `callbacks=[{_target_: fault_injection....}]`, and a process
that dies halfway through a save."""

import os
import signal

import lightning as L


class KillAfterCheckpoint(L.Callback):
    """SIGKILL this process right after the optimizer step `step`. Lightning runs checkpoint callbacks after
    all others, so a checkpoint due at `step` itself is not written yet: the newest on disk is the one before."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class RecordStartStep(L.Callback):
    """Write the optimizer step training starts from to `path` (0 for a fresh run; N after a resume from step N),
    so a test can tell a resumed run from one that silently started over."""

    def __init__(self, path: str):
        self.path = path

    def on_train_start(self, trainer, pl_module):
        if trainer.is_global_zero:
            with open(self.path, "w") as handle:
                handle.write(str(trainer.global_step))



def die_halfway_through_a_save(target: str) -> None:
    """atomic_write to `target` whose writer is SIGKILLed after half a file: run in a process of its own."""
    from protein_llava.training.checkpointing import atomic_write

    def half_then_die(temporary):
        with open(temporary, "wb") as handle:
            handle.write(b"partial checkpoint bytes")
            handle.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    atomic_write(target, half_then_die)

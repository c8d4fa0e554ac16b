"""Lightning callbacks that tests inject through `callbacks=[{_target_: fault_injection....}]`."""

import os
import signal

import lightning as L


class KillAfterCheckpoint(L.Callback):
    """SIGKILL this process right after the optimizer step `step` (once its checkpoint is on disk)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        # Callbacks run in registration order: ModelCheckpoint (registered first) has already saved.
        if trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)

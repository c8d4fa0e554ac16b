"""Stage 1: align the projector on protein → description pairs; encoder and decoder stay frozen.

Recipe interface (as torchtune's recipes): build the model outside, hand it here; `training_step` is the
decoder's causal-LM loss on the description tokens only (the collator masks the rest).
"""

from __future__ import annotations

import lightning as L

from ..loss import causal_lm_loss
from ..modeling import ProteinLLM
from .optim import NonFiniteGuard, OptimConfig, check_trainable_keys_present, configure_adamw, trainable_state_dict


class Stage1Module(L.LightningModule):
    """Trains only `model.projector`."""

    def __init__(self, model: ProteinLLM, optim: OptimConfig, gradient_checkpointing: bool = False, loss_chunk_size: int | None = None):
        super().__init__()
        self.model = model
        self.optim = optim
        self.loss_chunk_size = loss_chunk_size  # None: the decoder's own loss; N: chunked, see protein_llava.loss
        model.set_trainable(encoder=False, projector=True, llm=False)
        if gradient_checkpointing:
            model.language_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # Frozen weights are rebuilt from the model, not stored in every Lightning checkpoint.
        self.strict_loading = False
        self.guard = NonFiniteGuard(optim.max_nonfinite_in_a_row)

    def training_step(self, batch, batch_idx):
        loss = causal_lm_loss(self.model, batch, self.loss_chunk_size)
        if not self.guard.check_loss(loss):
            return None  # Lightning skips the optimizer step
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        self.log("train/skipped_steps", float(self.guard.skipped), batch_size=batch["input_ids"].shape[0])
        return loss

    def validation_step(self, batch, batch_idx):
        loss = causal_lm_loss(self.model, batch, self.loss_chunk_size)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=batch["input_ids"].shape[0])

    def on_before_optimizer_step(self, optimizer):
        self.guard.check_gradients(self.model)

    def configure_optimizers(self):
        return configure_adamw(self.model.parameters(), self.optim)

    def on_train_start(self):
        # Frozen parts stay in eval mode (no dropout in the encoder or decoder while only the projector learns).
        self.model.protein_encoder.eval()
        self.model.language_model.eval()

    def on_save_checkpoint(self, checkpoint):
        checkpoint["state_dict"] = trainable_state_dict(self, checkpoint["state_dict"])
        checkpoint["nonfinite_skipped"] = self.guard.skipped

    def on_load_checkpoint(self, checkpoint):
        check_trainable_keys_present(self, checkpoint["state_dict"])
        self.guard.skipped = checkpoint.get("nonfinite_skipped", 0)

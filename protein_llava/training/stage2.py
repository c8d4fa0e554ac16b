"""Stage 2: instruction tuning on ProteinLMDataset's SFT data (projector + LoRA on the decoder by default).

The same module trains the text-only arm: there the model is the bare decoder (LoRA-wrapped) and batches
carry no proteins, sequences being inline text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import lightning as L
from torch import nn

from ..loss import causal_lm_loss
from ..modeling import ProteinLLM
from ..quantization import compute_dtype, keep_training_layout
from .optim import NonFiniteGuard, OptimConfig, check_trainable_keys_present, configure_adamw, trainable_state_dict

LLMTraining = Literal["lora", "qlora", "full", "frozen"]


@dataclass(frozen=True)
class LoraSettings:
    """LoRA on the decoder's linear layers.

    Fields:
        r: rank. alpha: scaling numerator (scale = alpha / r). dropout: on the LoRA input.
        target_modules: module names to adapt; "all-linear" adapts every linear layer but the LM head.
    """

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: tuple[str, ...] | str = "all-linear"

    def __post_init__(self):
        if self.r < 1:
            raise ValueError(f"lora.r must be >= 1, got {self.r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")


EncoderTraining = Literal["frozen", "lora", "full"]
# fair-esm's TransformerLayer: attention projections and the feed-forward pair (its LM head stays out).
ESM2_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def apply_stage2_training(
    model: nn.Module, llm: LLMTraining, lora: LoraSettings, encoder: EncoderTraining = "frozen"
) -> nn.Module:
    """Set what trains in stage 2 and wrap the decoder (and, asked, the encoder) with LoRA. Returns the model to train.

    For a ProteinLLM the projector always trains; `encoder` keeps ESM-2 frozen, puts LoRA adapters with the
    same settings on its attention and feed-forward layers, or trains it whole. For a bare decoder
    (text-only arm) the returned model is the peft-wrapped decoder.
    """
    if llm not in ("lora", "qlora", "full", "frozen"):
        raise ValueError(f"stage2.llm must be one of lora, qlora, full, frozen; got {llm!r}")
    if encoder not in ("frozen", "lora", "full"):
        raise ValueError(f"stage2.encoder must be one of frozen, lora, full; got {encoder!r}")
    if isinstance(model, ProteinLLM):
        model.set_trainable(encoder=encoder == "full", projector=True, llm=llm == "full")
        if llm in ("lora", "qlora"):
            model.language_model = _wrap_lora(model.language_model, lora, quantized=llm == "qlora")
        if encoder == "lora":
            model.protein_encoder.esm = _wrap_encoder_lora(model.protein_encoder.esm, lora)
        return model
    if encoder != "frozen":
        raise ValueError(f"stage2.encoder={encoder} needs a multimodal model; the text-only arm has no encoder")
    if llm == "frozen":
        raise ValueError("the text-only arm trains only the decoder: stage2.llm=frozen would train nothing")
    model.requires_grad_(llm == "full")
    return _wrap_lora(model, lora, quantized=llm == "qlora") if llm in ("lora", "qlora") else model


def _wrap_encoder_lora(esm2: nn.Module, lora: LoraSettings) -> nn.Module:
    """fair-esm's ESM2 inside a peft model with LoRA on every layer's linear maps (`ESM2_LORA_TARGETS`)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(ESM2_LORA_TARGETS))
    return get_peft_model(esm2, config)


def _wrap_lora(language_model: nn.Module, lora: LoraSettings, quantized: bool) -> nn.Module:
    """The decoder inside a peft model with LoRA on `lora.target_modules`.

    `quantized` (QLoRA): the decoder is 4-bit; peft's k-bit preparation freezes it and upcasts its norms to
    float32, and the adapters are cast to the 4-bit layers' compute dtype, as in the QLoRA reference code.
    Its weights keep the trainable layout on CPU (see `quantization.keep_training_layout`).
    """
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if quantized:
        keep_training_layout(language_model)
        language_model = prepare_model_for_kbit_training(language_model, use_gradient_checkpointing=False)
    target = lora.target_modules if isinstance(lora.target_modules, str) else list(lora.target_modules)
    config = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=target, task_type="CAUSAL_LM"
    )
    wrapped = get_peft_model(language_model, config)
    if quantized:
        dtype = compute_dtype(wrapped)
        for name, parameter in wrapped.named_parameters():
            if "lora_" in name:
                parameter.data = parameter.data.to(dtype)
    return wrapped


class Stage2Module(L.LightningModule):
    """Instruction tuning: whatever `apply_stage2_training` left trainable learns; loss on replies only."""

    def __init__(self, model: nn.Module, optim: OptimConfig, gradient_checkpointing: bool = False, loss_chunk_size: int | None = None):
        super().__init__()
        self.model = model
        self.optim = optim
        self.loss_chunk_size = loss_chunk_size  # None: the decoder's own loss; N: chunked, see protein_llava.loss
        if gradient_checkpointing:
            decoder = model.language_model if isinstance(model, ProteinLLM) else model
            decoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if hasattr(decoder, "enable_input_require_grads"):
                decoder.enable_input_require_grads()
        self.strict_loading = False
        self.guard = NonFiniteGuard(optim.max_nonfinite_in_a_row)

    def training_step(self, batch, batch_idx):
        loss = causal_lm_loss(self.model, batch, self.loss_chunk_size)
        if not self.guard.check_loss(loss):
            return None
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
        if isinstance(self.model, ProteinLLM) and not any(
            p.requires_grad for p in self.model.protein_encoder.parameters()
        ):
            self.model.protein_encoder.eval()

    def on_save_checkpoint(self, checkpoint):
        checkpoint["state_dict"] = trainable_state_dict(self, checkpoint["state_dict"])
        checkpoint["nonfinite_skipped"] = self.guard.skipped

    def on_load_checkpoint(self, checkpoint):
        check_trainable_keys_present(self, checkpoint["state_dict"])
        self.guard.skipped = checkpoint.get("nonfinite_skipped", 0)

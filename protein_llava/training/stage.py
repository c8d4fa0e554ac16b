"""One LightningModule for both stages, told by a `StageSpec` what trains and what the loss covers.

Recipe interface (as torchtune's recipes): build the model outside, let `apply_stage_spec` freeze it and wrap
LoRA where the spec asks, hand it to `StageModule`. `training_step` is the decoder's causal-LM loss on the
tokens the collator left supervised (`StageSpec.loss_on` picks the tokenizer mode that decides which).

- Stage 1 (`STAGE1`): the projector aligns on protein → description pairs; encoder and decoder frozen.
- Stage 2 (`stage2_spec(...)`): instruction tuning, projector + LoRA on the decoder by default. The same
  spec trains the text-only arm, whose model is the bare decoder (no encoder, no projector).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import lightning as L
import torch
from torch import nn

from ..constants import IGNORE_INDEX
from ..data.collate import SWAPPED_PREFIX
from ..model.loss import chunked_cross_entropy_per_sample
from ..model.modeling import ProteinLLM
from ..quantization import compute_dtype, keep_training_layout
from .checkpointing import random_states, restore_random_states
from .config import LoraSettings
from .optim import NonFiniteGuard, OptimConfig, check_trainable_keys_present, configure_adamw, trainable_state_dict

log = logging.getLogger(__name__)

ENCODER_CHOICES = ("frozen", "lora", "full")
PROJECTOR_CHOICES = ("frozen", "full")
LLM_CHOICES = ("lora", "qlora", "full", "frozen")
LOSS_CHOICES = ("caption", "sft")
# fair-esm's TransformerLayer: attention projections and the feed-forward pair (its LM head stays out).
ESM2_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


@dataclass(frozen=True)
class StageSpec:
    """What one stage trains and what its loss covers.

    Fields:
        name: the stage's config key ("stage1" / "stage2"), used in error messages.
        encoder: ESM-2 frozen, with LoRA adapters on its attention and feed-forward layers, or trained whole.
        projector: frozen or trained (a ProteinLLM's projector; the text-only arm has none).
        llm: the decoder frozen, with LoRA, with LoRA on a 4-bit NF4 copy (QLoRA), or trained whole.
        loss_on: "caption" (the description after the protein, stage 1) or "sft" (every assistant reply).
    """

    name: str
    encoder: str = "frozen"
    projector: str = "full"
    llm: str = "frozen"
    loss_on: str = "sft"

    def __post_init__(self):
        for field_name, choices in (("encoder", ENCODER_CHOICES), ("projector", PROJECTOR_CHOICES),
                                    ("llm", LLM_CHOICES), ("loss_on", LOSS_CHOICES)):
            value = getattr(self, field_name)
            if value not in choices:
                raise ValueError(f"{self.name}.{field_name} must be one of {', '.join(choices)}; got {value!r}")

    def check_model(self, multimodal: bool) -> None:
        """Reject a spec the model cannot follow (the text-only arm has neither encoder nor projector)."""
        if multimodal:
            if (self.encoder, self.projector, self.llm) == ("frozen", "frozen", "frozen"):
                raise ValueError(f"{self.name} freezes encoder, projector and decoder: it would train nothing")
            return
        if self.encoder != "frozen":
            raise ValueError(f"{self.name}.encoder={self.encoder} needs a multimodal model; the text-only arm has no encoder")
        if self.llm == "frozen":
            raise ValueError(f"the text-only arm trains only the decoder: {self.name}.llm=frozen would train nothing")


STAGE1 = StageSpec("stage1", encoder="frozen", projector="full", llm="frozen", loss_on="caption")


def stage2_spec(llm: str = "lora", encoder: str = "frozen", loss_on: str = "sft") -> StageSpec:
    """Stage 2: the projector trains; the decoder and encoder as asked; loss on the replies by default."""
    return StageSpec("stage2", encoder=encoder, projector="full", llm=llm, loss_on=loss_on)


def apply_stage_spec(model: nn.Module, spec: StageSpec, lora: LoraSettings | None = None) -> nn.Module:
    """Freeze `model` as `spec` says and wrap LoRA where it asks. Returns the model to train.

    For a ProteinLLM, the decoder (and, asked, the encoder) is wrapped in place. For a bare decoder (the
    text-only arm) the returned model is the decoder itself or its peft wrapper.
    """
    lora = lora or LoraSettings()
    multimodal = isinstance(model, ProteinLLM)
    spec.check_model(multimodal)
    adapted_llm = spec.llm in ("lora", "qlora")
    if not multimodal:
        model.requires_grad_(spec.llm == "full")
        return _wrap_lora(model, lora, quantized=spec.llm == "qlora") if adapted_llm else model
    model.set_trainable(encoder=spec.encoder == "full", projector=spec.projector == "full", llm=spec.llm == "full")
    if adapted_llm:
        model.language_model = _wrap_lora(model.language_model, lora, quantized=spec.llm == "qlora")
    if spec.encoder == "lora":
        model.protein_encoder.esm = _wrap_encoder_lora(model.protein_encoder.esm, lora)
    return model


def _import_peft():
    """peft, imported without bitsandbytes' CPU notice (see `console.quiet_bitsandbytes_import`)."""
    from .console import quiet_bitsandbytes_import

    with quiet_bitsandbytes_import():
        import peft
    return peft


def _wrap_encoder_lora(esm2: nn.Module, lora: LoraSettings) -> nn.Module:
    """fair-esm's ESM2 inside a peft model with LoRA on every layer's linear maps (`ESM2_LORA_TARGETS`)."""
    peft = _import_peft()
    config = peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(ESM2_LORA_TARGETS))
    return peft.get_peft_model(esm2, config)


def _wrap_lora(language_model: nn.Module, lora: LoraSettings, quantized: bool) -> nn.Module:
    """The decoder inside a peft model with LoRA on `lora.target_modules`.

    `quantized` (QLoRA): the decoder is 4-bit; peft's k-bit preparation freezes it and upcasts its norms to
    float32, and the adapters are cast to the 4-bit layers' compute dtype, as in the QLoRA reference code.
    Its weights keep the trainable layout on CPU (see `quantization.keep_training_layout`).
    """
    peft = _import_peft()
    if quantized:
        keep_training_layout(language_model)
        language_model = peft.prepare_model_for_kbit_training(language_model, use_gradient_checkpointing=False)
    target = lora.target_modules if isinstance(lora.target_modules, str) else list(lora.target_modules)
    config = peft.LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=target, task_type="CAUSAL_LM"
    )
    with warnings.catch_warnings():
        # peft asks the decoder `is_gradient_checkpointing`, a name transformers 5 deprecated; nothing to change here.
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        wrapped = peft.get_peft_model(language_model, config)
    if quantized:
        dtype = compute_dtype(wrapped)
        for name, parameter in wrapped.named_parameters():
            if "lora_" in name:
                parameter.data = parameter.data.to(dtype)
    return wrapped


def _frozen_parts(model: nn.Module) -> list[nn.Module]:
    """The parts of `model` with no trainable parameter (kept in eval mode: no dropout while others learn)."""
    parts = [model.protein_encoder, model.projector, model.language_model] if isinstance(model, ProteinLLM) else [model]
    return [part for part in parts if not any(p.requires_grad for p in part.parameters())]


class StageModule(L.LightningModule):
    """Trains whatever `apply_stage_spec` left trainable; loss on the supervised tokens of each batch.

    Args:
        model: a ProteinLLM or (text-only arm) a bare decoder, already frozen / wrapped by `apply_stage_spec`.
        optim: optimizer and schedule. gradient_checkpointing: recompute the decoder's activations in backward.
        loss_chunk_size: None, the decoder's own loss; N, the chunked loss (`protein_llava.model.loss`).
    """

    def __init__(self, model: nn.Module, optim: OptimConfig, gradient_checkpointing: bool = False,
                 loss_chunk_size: int | None = None, contrast_weight: float = 0.0, contrast_margin: float = 1.0):
        super().__init__()
        if contrast_weight and not isinstance(model, ProteinLLM):
            raise ValueError("the swap-contrast loss needs a multimodal model; the text-only arm reads no protein features")
        self.model = model
        self.optim = optim
        self.loss_chunk_size = loss_chunk_size
        self.contrast_weight, self.contrast_margin = contrast_weight, contrast_margin
        if gradient_checkpointing:
            decoder = model.language_model if isinstance(model, ProteinLLM) else model
            decoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if hasattr(decoder, "enable_input_require_grads"):
                decoder.enable_input_require_grads()
        # Frozen weights are rebuilt from the model, not stored in every Lightning checkpoint.
        self.strict_loading = False
        self.guard = NonFiniteGuard(optim.max_nonfinite_in_a_row)
        self._last_loss = None  # a tensor (no device sync per step), for the run's summary
        self._resumed_random_states = None  # this rank's generators from the checkpoint resumed, until step one
        self._drop_update = False  # data parallel: a rank's loss was non-finite, every rank drops this update

    def loss(self, batch: dict, contrast: bool = True):
        """The causal-LM loss of `batch`; with `contrast_weight` and a swapped copy in the batch (the
        collator's `swapped_*` keys), plus the swap-contrast term."""
        swapped = {k.removeprefix(SWAPPED_PREFIX): v for k, v in batch.items() if k.startswith(SWAPPED_PREFIX)}
        batch = {k: v for k, v in batch.items() if not k.startswith(SWAPPED_PREFIX)}
        if contrast and self.contrast_weight and swapped:
            return self._contrastive_loss(batch, swapped)
        return self._plain_loss(batch)

    def _per_sample_nll(self, batch: dict):
        """(sums, counts): each row's summed answer NLL and its supervised tokens."""
        model = self.model
        embeds = model.embed_inputs(
            batch["input_ids"], batch.get("protein_input_ids"), batch.get("protein_representations"),
            batch.get("protein_representations_mask"),
        )
        hidden = model.language_model.get_decoder()(
            inputs_embeds=embeds, attention_mask=batch.get("attention_mask"), position_ids=batch.get("position_ids"),
            use_cache=False,
        ).last_hidden_state
        head = model.language_model.get_output_embeddings()
        return chunked_cross_entropy_per_sample(hidden, head, batch["labels"], self.loss_chunk_size or 1024)

    def _contrastive_loss(self, batch: dict, swapped: dict):
        """Mean answer NLL + contrast_weight × mean over rows with a protein of
        max(0, margin − (NLL with a swapped protein − NLL with its own)), NLLs summed over each row's answer
        (mDPO's conditional term): the answer must be likelier with the record's own protein than with
        another's. Summed, not per token: the protein decides one or two tokens of a templated answer, and
        a per-token mean would dilute a margin of a few nats by the answer's length."""
        sums, counts = self._per_sample_nll(batch)
        swapped_sums, swapped_counts = self._per_sample_nll(swapped)
        loss = sums.sum() / counts.sum().clamp(min=1)
        has_protein = (batch["input_ids"] == self.model.config.protein_token_id).any(1) & (counts > 0)
        gap = swapped_sums - sums  # (B,) nats per answer
        violation = torch.relu(self.contrast_margin - gap[has_protein]).mean() if has_protein.any() else loss * 0.0
        size = batch["input_ids"].shape[0]
        self.log("train/nll", loss.detach(), batch_size=size)
        self.log("train/swap_gap", gap[has_protein].detach().mean() if has_protein.any() else 0.0, batch_size=size)
        return loss + self.contrast_weight * violation

    def _plain_loss(self, batch: dict):
        if self.loss_chunk_size is None:
            return self.model(**batch, use_cache=False).loss
        if isinstance(self.model, ProteinLLM):
            return self.model(**batch, use_cache=False, loss_chunk_size=self.loss_chunk_size).loss
        from ..model.loss import chunked_causal_lm_forward

        batch = dict(batch)
        return chunked_causal_lm_forward(self.model, batch.pop("labels"), self.loss_chunk_size, **batch).loss

    @property
    def last_train_loss(self) -> float | None:
        """The loss of the last step this process trained (whatever log_every_n_steps is)."""
        return None if self._last_loss is None else float(self._last_loss)

    def training_step(self, batch, batch_idx):
        loss = self.loss(batch)
        share, finite_everywhere = self._data_parallel_step(batch, loss)
        if not self.guard.check_loss(loss if finite_everywhere else loss.new_tensor(float("nan"))):
            if share is None:
                return None  # one process: Lightning skips the optimizer step
            # Lightning refuses a skipped training_step in distributed training, and a rank that skipped its
            # backward would leave the others waiting in the gradient reduction: every rank runs a backward
            # of nothing, and the update is dropped before the optimizer sees it (on_before_optimizer_step).
            # The batch still counts as an optimizer step.
            self._drop_update = True
            return loss.nan_to_num(0.0, 0.0, 0.0) * 0.0
        size = batch["input_ids"].shape[0]
        if share is None:
            self._last_loss = loss.detach()
            self.log("train/loss", loss, prog_bar=True, batch_size=size)
        else:
            # Summed over the ranks, the token-weighted means give the mean over the step's tokens.
            self._last_loss = self.trainer.strategy.reduce(loss.detach() * share, reduce_op="sum")
            self.log("train/loss", self._last_loss, prog_bar=True, batch_size=size)
            loss = loss * (share * self.trainer.world_size)
        self.log("train/skipped_steps", float(self.guard.skipped), batch_size=size)
        return loss

    def _data_parallel_step(self, batch, loss) -> tuple[torch.Tensor | None, bool]:
        """(this rank's share of the step's supervised tokens, whether the loss is finite on every rank); on
        one process (None, True).

        The share: data-parallel engines (DDP, FSDP) average the ranks' gradients. Each rank's loss is a mean
        over its own answer tokens, so a plain average would weight a token on a rank with few answer tokens
        more than one on a busy rank. Scaling each rank's loss by (its tokens / all tokens) × world size makes
        the average the gradient of the mean over all the step's tokens: what one process computes on the
        whole global batch. (With contrast_weight > 0 under DDP the contrast term is scaled alike: a per-row
        hinge, it has no token count to weight by.) One process: unchanged, to the bit.

        The flag: if one rank's loss is non-finite, every rank drops the step's update (training_step says
        how), so the ranks never part ways. One all-reduce carries both."""
        if self._trainer is None or self.trainer.world_size == 1:
            return None, True
        # The decoder's loss shifts labels by one: the first position is never a target.
        tokens = (batch["labels"][:, 1:] != IGNORE_INDEX).sum().to(torch.float32)
        nonfinite = (~torch.isfinite(loss.detach())).to(torch.float32)
        totals = self.trainer.strategy.reduce(torch.stack([tokens, nonfinite]), reduce_op="sum")
        return tokens / totals[0].clamp(min=1), bool(totals[1] == 0)

    def validation_step(self, batch, batch_idx):
        loss = self.loss(batch, contrast=False)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=batch["input_ids"].shape[0])

    def on_before_optimizer_step(self, optimizer):
        if self._drop_update:  # a non-finite loss on some rank, counted in training_step
            self._drop_update = False
            for parameter in self.model.parameters():
                parameter.grad = None
            return
        self.guard.check_gradients(self.model)

    def configure_optimizers(self):
        projector = self.model.projector if isinstance(self.model, ProteinLLM) else None
        summary = projector.summary_projection if projector is not None else None
        return configure_adamw(
            self.model.parameters(),
            self.optim,
            projector_parameters=projector.parameters() if projector is not None else (),
            summary_parameters=summary.parameters() if summary is not None else (),
        )

    def configure_model(self):
        """Under trainer=fsdp (Lightning's ModelParallelStrategy gives a device mesh), shard the model with
        FSDP2 (`sharding.shard_stage_model`). Every other strategy leaves the model as it is."""
        if self.device_mesh is None:
            return
        from .sharding import is_sharded, shard_stage_model

        if is_sharded(self.model):
            return
        if self.contrast_weight:
            raise ValueError(
                "stage contrast_weight > 0 runs the decoder outside the model's own forward, which FSDP does not "
                "see; use trainer=ddp (or one device) for the swap-contrast loss"
            )
        shard_stage_model(self.model, self.device_mesh["data_parallel"])

    def on_fit_start(self):
        # Lightning keeps each module's mode as it finds it, and from_pretrained hands over eval-mode
        # decoders: whatever trains goes to train mode, and the frozen parts stay in eval mode.
        self.model.train()
        for part in _frozen_parts(self.model):
            part.eval()

    def on_save_checkpoint(self, checkpoint):
        checkpoint["state_dict"] = trainable_state_dict(self, checkpoint["state_dict"])
        checkpoint["nonfinite_skipped"] = self.guard.skipped
        # Every rank's generators (one process writes the file): LoRA dropout draws its masks from them, and
        # a resume that reseeds instead is not the run it continues (Lightning saves no random state).
        states = random_states()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, states)
            checkpoint["random_states"] = gathered
        else:
            checkpoint["random_states"] = [states]

    def on_load_checkpoint(self, checkpoint):
        # A sharded (FSDP) checkpoint hands its tensors over in the strategy's loader, which refuses a
        # missing trainable tensor itself; only a single-file checkpoint carries its state_dict here.
        if "state_dict" in checkpoint:
            check_trainable_keys_present(self, checkpoint["state_dict"])
        self.guard.skipped = checkpoint.get("nonfinite_skipped", 0)
        states = checkpoint.get("random_states")
        if states is not None and len(states) != self.trainer.world_size:
            # Resuming on another number of processes is legitimate (a cluster hands out what it has); only
            # exactness is lost, and the log says so.
            log.warning(
                "this checkpoint was written by %d process(es) and is resumed by %d: the random state (dropout "
                "masks) restarts from the seed, so the run continues but not bit-identically",
                len(states), self.trainer.world_size,
            )
        elif states is not None:
            # Set just before the first resumed step, not now: creating the data iterator draws a seed from
            # the global generator, which the interrupted run did once at the start of its epoch. (A checkpoint
            # on an epoch's last batch is the exception: there the interrupted run drew the next epoch's seed
            # from the saved state, and the resumed run draws it from the seed.)
            self._resumed_random_states = states[self.trainer.global_rank]

    def on_train_batch_start(self, batch, batch_idx):
        if self._resumed_random_states is not None:
            restore_random_states(self._resumed_random_states)
            self._resumed_random_states = None

"""ProteinLLM: ESM-2 encoder → projector → splice into the decoder's input embeddings → causal LM."""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration import ProteinLLMConfig
from .encoder import ProteinEncoder
from .projector import ProteinProjector

TRAINABLE_PARTS = ("encoder", "projector", "llm")


class ProteinLLMPreTrainedModel(PreTrainedModel):
    config_class = ProteinLLMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _no_split_modules = ["TransformerLayer"]
    _skip_keys_device_placement = ["cache"]

    def _init_weights(self, module):
        # Only the projector is ours to initialise: fair-esm's modules keep fair-esm's own init and the
        # decoder (a PreTrainedModel) initialises itself. transformers calls this for every submodule.
        projector = getattr(self, "projector", None)
        if projector is None or not any(module is part for part in projector.modules()):
            return
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.RMSNorm):
            # The output norm's gain starts at the decoder's token-embedding RMS (ProjectorConfig.output_scale).
            nn.init.constant_(module.weight, self.config.projector_config.output_scale or 1.0)


class ProteinLLM(ProteinLLMPreTrainedModel, GenerationMixin):
    """A causal LM that reads proteins.

    Each protein in the text is a run of `<protein>` placeholder tokens (the processor decides how many,
    through `num_protein_tokens`); their embeddings are replaced by the projected ESM-2 features. With no
    proteins, the model is exactly its decoder.
    """

    # fair-esm's RobertaLMHead shares the token-embedding matrix.
    _tied_weights_keys = {"protein_encoder.esm.lm_head.weight": "protein_encoder.esm.embed_tokens.weight"}

    def __init__(self, config: ProteinLLMConfig, language_model: PreTrainedModel | None = None):
        super().__init__(config)
        self.protein_encoder = ProteinEncoder(config.encoder_config)
        self.projector = ProteinProjector(
            config.projector_config, config.encoder_config.embed_dim, config.text_config.hidden_size
        )
        self.language_model = (
            language_model if language_model is not None else AutoModelForCausalLM.from_config(config.text_config)
        )
        self.post_init()

    # --- the decoder's embeddings, so resize / tie / peft see through the composite
    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_output_embeddings(value)

    # --- what trains
    def set_trainable(self, encoder: bool, projector: bool, llm: bool) -> None:
        """Freeze or unfreeze each part; the training stages call this in one place."""
        for module, trainable in ((self.protein_encoder, encoder), (self.projector, projector), (self.language_model, llm)):
            module.requires_grad_(trainable)

    def trainable_parts(self) -> dict[str, bool]:
        """{"encoder" | "projector" | "llm": whether any of its parameters trains}."""
        parts = dict(zip(TRAINABLE_PARTS, (self.protein_encoder, self.projector, self.language_model)))
        return {name: any(p.requires_grad for p in module.parameters()) for name, module in parts.items()}

    @classmethod
    def from_pretrained(cls, *args, quantization_config=None, **kwargs):
        """transformers' from_pretrained. A bitsandbytes `quantization_config` (e.g. `quantization.nf4_config()`)
        quantises the decoder only: ESM-2, the projector and the LM head stay in full precision."""
        if quantization_config is not None:
            from ..quantization import decoder_only

            kwargs["quantization_config"] = decoder_only(quantization_config)
        return super().from_pretrained(*args, **kwargs)

    # --- adapters and saving
    def load_language_adapter(self, adapter_path: str, merge: bool = False) -> None:
        """Put a peft LoRA adapter (trained on this decoder) on the decoder; `merge=True` folds it in."""
        from peft import PeftModel

        self.language_model = PeftModel.from_pretrained(self.language_model, adapter_path)
        if merge:
            self.merge_language_adapter()

    def merge_language_adapter(self) -> None:
        """Fold a loaded LoRA adapter into the decoder's weights (a plain decoder again, no peft wrapper)."""
        if not hasattr(self.language_model, "merge_and_unload"):
            raise ValueError("the decoder carries no adapter to merge")
        self.language_model = self.language_model.merge_and_unload()

    def save_pretrained(self, save_directory, *args, model_card: dict | None = None, **kwargs):
        """transformers' save_pretrained, plus a generated model card (README.md) with the usage snippet."""
        if hasattr(self.language_model, "peft_config"):
            raise ValueError(
                "the decoder carries a LoRA adapter: merge_language_adapter() first, or save the adapter with "
                "model.language_model.save_pretrained(DIR)"
            )
        super().save_pretrained(save_directory, *args, **kwargs)
        from ..model_card import write_model_card

        write_model_card(save_directory, self.config, **(model_card or {}))

    # --- proteins → embeddings
    def get_protein_features(
        self,
        protein_input_ids: torch.Tensor | None = None,
        protein_representations: torch.Tensor | None = None,
        protein_representations_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Projected protein tokens, all proteins concatenated in order: (sum of tokens, hidden).

        Give either ESM token ids (N, T) or precomputed encoder representations (N, T-2, D) with their mask
        (the frozen-encoder cache does the latter).
        """
        if protein_representations is None:
            protein_representations, protein_representations_mask = self.protein_encoder(protein_input_ids)
        elif protein_representations_mask is None:
            raise ValueError("protein_representations needs protein_representations_mask beside it")
        projector_dtype = next(self.projector.parameters()).dtype
        tokens, token_mask = self.projector(protein_representations.to(projector_dtype), protein_representations_mask)
        return tokens[token_mask]  # (sum of tokens, hidden), row-major: protein by protein

    def embed_inputs(
        self,
        input_ids: torch.Tensor,
        protein_input_ids: torch.Tensor | None = None,
        protein_representations: torch.Tensor | None = None,
        protein_representations_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Decoder input embeddings with every `<protein>` placeholder replaced by a protein feature row."""
        placeholder_mask = input_ids == self.config.protein_token_id
        # The placeholder id may lie outside the decoder's vocabulary: look up a valid id, then overwrite.
        inputs_embeds = self.get_input_embeddings()(input_ids.masked_fill(placeholder_mask, 0))
        num_placeholders = int(placeholder_mask.sum())
        has_proteins = protein_input_ids is not None or protein_representations is not None
        if not has_proteins or (protein_input_ids is not None and protein_input_ids.shape[0] == 0):
            if num_placeholders:
                raise ValueError(
                    f"input_ids hold {num_placeholders} <protein> placeholder tokens but 0 protein feature rows "
                    "were given (pass protein_input_ids from the processor)"
                )
            return inputs_embeds
        features = self.get_protein_features(protein_input_ids, protein_representations, protein_representations_mask)
        if features.shape[0] != num_placeholders:
            raise ValueError(
                f"input_ids hold {num_placeholders} <protein> placeholder tokens but the proteins give "
                f"{features.shape[0]} feature rows; build inputs with ProteinLLMProcessor so the counts agree"
            )
        features = features.to(inputs_embeds.device, inputs_embeds.dtype)
        return inputs_embeds.masked_scatter(placeholder_mask.unsqueeze(-1), features)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        protein_input_ids: torch.LongTensor | None = None,
        protein_representations: torch.Tensor | None = None,
        protein_representations_mask: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        loss_chunk_size: int | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """The decoder's forward on the spliced embeddings.

        loss_chunk_size: with `labels`, compute the loss over supervised positions only, this many at a time,
            and return no logits (`protein_llava.model.loss`); None: the decoder's own logits and loss.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_inputs(
                input_ids, protein_input_ids, protein_representations, protein_representations_mask
            )
        if loss_chunk_size is not None and labels is not None:
            from .loss import chunked_causal_lm_forward

            return chunked_causal_lm_forward(
                self.language_model, labels, loss_chunk_size,
                inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids, **kwargs,
            )
        return self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )

    def prepare_inputs_for_generation(self, *args, is_first_iteration: bool | None = False, **kwargs):
        model_inputs = super().prepare_inputs_for_generation(*args, is_first_iteration=is_first_iteration, **kwargs)
        # Proteins are spliced in at prefill; later steps feed only new text tokens through the cache.
        if not is_first_iteration and model_inputs.get("cache") is not None:
            for key in ("protein_input_ids", "protein_representations", "protein_representations_mask"):
                model_inputs.pop(key, None)
        return model_inputs

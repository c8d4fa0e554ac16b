"""Fully sharded data parallel (FSDP2): torch's `fully_shard` through Lightning's `ModelParallelStrategy`.

`trainer=fsdp` picks `FSDP2Strategy`; `StageModule.configure_model` calls `shard_stage_model` once the device
mesh exists. Units (each all-gathered for its own forward and backward, then freed):
- every decoder layer, and every encoder layer when the encoder trains (LoRA or full);
- the root: whatever is left (embeddings, final norm, LM head, projector), so tied embeddings stay in one unit.

A frozen encoder is not sharded (`ignored_params`): it has no gradients or optimizer state to split, so
sharding would save only its weights (1.3 GB for ESM-2 650M in bf16) and cost an all-gather per forward and
per protein; every rank keeps a full copy instead.

Checkpoints are sharded (one file per rank, torch.distributed.checkpoint) and hold the trainable tensors only,
as the single-process checkpoints do; `FSDP2Strategy.load_checkpoint` restores just those.
"""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from ..model.modeling import ProteinLLM
from .checkpointing import SHARDED_CHECKPOINT_DONE


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ModelParallelStrategy as plain FSDP2: one data-parallel mesh dimension over every process of
    every node, no tensor parallelism (Lightning's own default makes the nodes the data-parallel dimension and
    a node's processes the tensor-parallel one). Checkpoints are always sharded: each rank writes its own shard
    of a checkpoint folder, and no rank ever holds the full optimizer state.
    """

    def __init__(self, **kwargs):
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1, save_distributed_checkpoint=True, **kwargs)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def load_checkpoint(self, checkpoint_path, weights_only=None):
        """Restore a sharded checkpoint written by this strategy: the trainable tensors and the optimizer state.

        Lightning's own loader asks the checkpoint for every tensor of the model; ours holds the trainable ones
        only (`StageModule.on_save_checkpoint`), the frozen weights being rebuilt from the model's source."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict,
        )

        path = Path(self.broadcast(checkpoint_path))
        if not path.is_dir():
            raise ValueError(f"trainer=fsdp resumes from a sharded checkpoint folder; {path} is a file (written by another engine)")
        module = self.model
        trainable = {name for name, p in module.named_parameters() if p.requires_grad}
        state = {k: v for k, v in get_model_state_dict(module).items() if k in trainable}
        dcp.load({"state_dict": state}, checkpoint_id=path)  # raises on a trainable tensor the checkpoint lacks
        set_model_state_dict(module, state, options=StateDictOptions(strict=False))
        for index, optimizer in enumerate(self.optimizers):
            key = f"optimizer_{index}"
            optimizer_state = {key: get_optimizer_state_dict(module, optimizer)}
            dcp.load(optimizer_state, checkpoint_id=path)
            set_optimizer_state_dict(module, optimizer, optim_state_dict=optimizer_state[key])
        return torch.load(path / SHARDED_CHECKPOINT_DONE, weights_only=weights_only)


def _decoder_layers(decoder: nn.Module) -> nn.ModuleList:
    """The transformer layers of a transformers causal LM (peft-wrapped or not)."""
    layers = getattr(decoder.get_decoder(), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"FSDP needs the decoder's layers as `get_decoder().layers`; {type(decoder).__name__} has none")
    return layers


def _encoder_layers(esm2: nn.Module) -> nn.ModuleList:
    """fair-esm ESM2's layers, through a peft wrapper (stage2.encoder=lora) or not."""
    base = esm2.get_base_model() if hasattr(esm2, "get_base_model") else esm2
    return base.layers


def shard_stage_model(model: nn.Module, mesh) -> nn.Module:
    """Apply FSDP2 to a model `apply_stage_spec` prepared (a ProteinLLM or a bare decoder); returns it sharded
    in place. Units as the module docstring says."""
    from torch.distributed.fsdp import fully_shard

    if any(getattr(p, "quant_state", None) is not None or type(p).__name__ == "Params4bit" for p in model.parameters()):
        raise ValueError(
            "trainer=fsdp does not shard a 4-bit (QLoRA) decoder: bitsandbytes' packed weights need their own "
            "storage settings under FSDP; train QLoRA on one device, or LoRA / full with trainer=fsdp"
        )
    multimodal = isinstance(model, ProteinLLM)
    decoder = model.language_model if multimodal else model
    for layer in _decoder_layers(decoder):
        fully_shard(layer, mesh=mesh)
    ignored = None
    if multimodal:
        encoder = model.protein_encoder
        if any(p.requires_grad for p in encoder.parameters()):
            for layer in _encoder_layers(encoder.esm):
                fully_shard(layer, mesh=mesh)
        else:
            ignored = set(encoder.parameters())
    fully_shard(model, mesh=mesh, ignored_params=ignored)
    return model


def gather_full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every rank calls this (a collective): the model's full, unsharded state dict on CPU, on rank 0 only
    (other ranks get an empty dict)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)

"""An evaluation arm: one model under evaluation, loaded as a `LoadedModel` named for the report.

The multimodal arm is a saved ProteinLLM (config.json `"model_type": "protein_llava"`): its processor
turns each `<seq> ... </seq>` into encoder input. Any other causal-LM folder, or "smollm2" (the bare
SmolLM2-135M-Instruct decoder), is a text-only arm: the same prompt, sequences read inline as text.
"""

from __future__ import annotations

from pathlib import Path

from ..loading import DTYPES, SMOLLM2, LoadedModel, is_protein_llm_folder, load_model


def check_model_source(source: str | None, role: str) -> None:
    """Fail fast, before anything heavy loads, if `source` is neither "smollm2" nor a model folder."""
    if source is None or source == SMOLLM2:
        return
    path = Path(source)
    if not path.is_dir():
        raise FileNotFoundError(f"{role} folder {source} does not exist (give a saved model folder or '{SMOLLM2}')")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{role} folder {source} has no config.json; is it a saved transformers model?")


def load_arm(
    name: str, source: str, dtype: str = "float32", device: str = "auto", attn_implementation: str = "sdpa"
) -> LoadedModel:
    """Load the model at `source` (a folder or "smollm2") as an arm named `name`, in eval mode.

    sdpa by default, whatever the folder was trained with: loglik scoring needs custom attention masks,
    which flash-attention kernels do not take.
    """
    check_model_source(source, name)
    return load_model(source, dtype, device, attn_implementation=attn_implementation, name=name)


__all__ = ["DTYPES", "SMOLLM2", "check_model_source", "is_protein_llm_folder", "load_arm"]

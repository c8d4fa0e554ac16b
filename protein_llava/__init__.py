"""protein_llava: a LLaVA-style protein LLM (fair-esm ESM-2 → projector → any transformers causal LM).

Importing the package registers `ProteinLLMConfig` / `ProteinLLM` / `ProteinLLMProcessor` with the Auto
classes, so `AutoModelForCausalLM.from_pretrained(folder)` loads a saved ProteinLLM. Inference needs
neither Lightning nor Hydra.
"""

from transformers import AutoConfig, AutoModelForCausalLM, AutoProcessor

from .builders import build_preset, build_protein_llm, build_smollm2_demo, build_tiny
from .model.configuration import (
    PRESET_NAMES,
    ProjectorConfig,
    ProteinEncoderConfig,
    ProteinLLMConfig,
    num_protein_tokens,
)
from .model.modeling import ProteinLLM
from .model.processing import ProteinLLMProcessor
from .sequences import ProteinSequenceError, SequenceReason

__version__ = "0.1.0"

AutoConfig.register(ProteinLLMConfig.model_type, ProteinLLMConfig, exist_ok=True)
AutoConfig.register(ProteinEncoderConfig.model_type, ProteinEncoderConfig, exist_ok=True)
AutoConfig.register(ProjectorConfig.model_type, ProjectorConfig, exist_ok=True)
AutoModelForCausalLM.register(ProteinLLMConfig, ProteinLLM, exist_ok=True)
AutoProcessor.register(ProteinLLMConfig, ProteinLLMProcessor, exist_ok=True)

__all__ = [
    "PRESET_NAMES",
    "ProjectorConfig",
    "ProteinEncoderConfig",
    "ProteinLLM",
    "ProteinLLMConfig",
    "ProteinLLMProcessor",
    "ProteinSequenceError",
    "SequenceReason",
    "build_preset",
    "build_protein_llm",
    "build_smollm2_demo",
    "build_tiny",
    "num_protein_tokens",
]

"""The model card (README.md) written beside a saved ProteinLLM: architecture, training, results, usage."""

from __future__ import annotations

from pathlib import Path

USAGE = '''```python
from protein_llava import ProteinLLM, ProteinLLMProcessor
model = ProteinLLM.from_pretrained("{repo}")          # one self-contained folder
processor = ProteinLLMProcessor.from_pretrained("{repo}")
inputs = processor(text=["<seq> M K T A Y I A K Q R </seq> What is the function of this protein?",
                         "Which residue carries a thiol group?"], return_tensors="pt")
out = model.generate(**inputs, max_new_tokens=64)
print(processor.batch_decode(out, skip_special_tokens=True))
```'''


def render_model_card(config, repo: str = "path/or/hub-id", training: dict | None = None, results: dict | None = None) -> str:
    """Markdown for a ProteinLLM folder. `training` / `results` are optional dicts shown as tables."""
    encoder, projector, text = config.encoder_config, config.projector_config, config.text_config
    decoder_name = getattr(text, "_name_or_path", "") or text.model_type
    lines = [
        "---",
        "library_name: transformers",
        "tags: [protein, multimodal, esm2, llava, protein_llava]",
        "---",
        "",
        "# ProteinLLM (protein_llava)",
        "",
        "A LLaVA-style protein language model: fair-esm ESM-2 reads the protein, a projector maps its per-residue",
        "features into the decoder's embedding space, and a causal LM answers in text.",
        "",
        "## Architecture",
        "",
        "| part | details |",
        "|---|---|",
        f"| protein encoder | ESM-2, {encoder.num_layers} layers, width {encoder.embed_dim}, {encoder.attention_heads} heads; "
        f"representations of layer {encoder.resolved_repr_layer}; weights: {encoder.weights or 'as trained in this folder'} |",
        f"| projector | {projector.projector_type}, token reduction {projector.token_reduction}"
        + (f" (stride {projector.pool_stride})" if projector.token_reduction == "mean_pool" else "")
        + (f" ({projector.num_latents} latents)" if projector.token_reduction == "resampler" else "")
        + " |",
        f"| decoder | {decoder_name} ({text.model_type}, {text.num_hidden_layers} layers, width {text.hidden_size}, "
        f"vocabulary {text.vocab_size}) |",
        f"| protein placeholder | `{config.protein_token}` (id {config.protein_token_id}) |",
        f"| longest protein | {encoder.max_residues} residues |",
        "",
    ]
    if training:
        lines += ["## Training", "", "| | |", "|---|---|"]
        lines += [f"| {key} | {value} |" for key, value in training.items()]
        lines.append("")
    if results:
        lines += ["## Evaluation", "", "| | |", "|---|---|"]
        lines += [f"| {key} | {value} |" for key, value in results.items()]
        lines.append("")
    lines += [
        "## Usage",
        "",
        "Proteins go inline as `<seq> M K T ... </seq>` (ProteinLMDataset's form) or through `proteins=[[...]]`.",
        "",
        USAGE.format(repo=repo),
        "",
        "## Data licence",
        "",
        "Models trained on ProteinLMDataset (tsynbio/ProteinLMDataset) inherit its licence terms; see its",
        "dataset card. UniProt-derived text is CC BY 4.0 (UniProt Consortium).",
        "",
    ]
    return "\n".join(lines)


def write_model_card(folder: str | Path, config, **kwargs) -> Path:
    path = Path(folder) / "README.md"
    path.write_text(render_model_card(config, **kwargs))
    return path

"""The model core, pure PyTorch + transformers (no Lightning, no Hydra, nothing of the data pipeline):
`configuration.py` (ProteinLLMConfig and its sub-configs; the named presets in `presets/*.json`),
`encoder.py` (fair-esm's ESM-2), `projector.py`, `modeling.py` (ProteinLLM: encoder → projector → decoder,
the head and the chunked loss), `processing.py` (ProteinLLMProcessor: text + proteins → model inputs) and
`loss.py`. `protein_llava` re-exports the public names.
"""

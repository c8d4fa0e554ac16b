"""Using a trained model: `predict` (FASTA → JSONL), `chat` (the conversation and its history), `serving` (the
HTTP server with the OpenAI API) and `webdemo` (the Gradio app); generation itself is `loading.LoadedModel`.
Nothing here imports Lightning or Hydra."""

"""Using a trained model: `predict` (FASTA → JSONL, the chat history; generation is `loading.LoadedModel`), `serving` (the HTTP server with the
OpenAI API) and `webdemo` (the Gradio app). Nothing here imports Lightning or Hydra."""

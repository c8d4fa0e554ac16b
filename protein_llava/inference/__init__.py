"""Using a trained model: `predict` (the Answerer, FASTA → JSONL, chat), `serving` (the HTTP server with the
OpenAI API) and `webdemo` (the Gradio app). Nothing here imports Lightning or Hydra."""

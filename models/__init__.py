"""Where models and text come from: GGUF files, HF llama-family dirs, and the embedded default."""

"""Export: the quant-type registry, ggml's own quantizers, and GGUF written by llama.cpp's quantizer."""

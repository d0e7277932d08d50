"""Evaluation through llama.cpp: perplexity, KLD against a reference, and `windq bench`."""

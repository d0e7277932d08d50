"""`windq eval`: perplexity of a GGUF on a text (and KLD against a reference), computed by llama.cpp
the way llama-perplexity does (`export/scoring.py`)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from windq.export.scoring import EvalResult, check_ctx, evaluate_chunks
from windq.models.gguf_model import check_gguf
from windq.models.tokenizer import token_chunks


def evaluate(
    model_path: str | Path,
    text: str,
    *,
    text_name: str = "text",
    ctx: int = 512,
    max_chunks: int | None = None,
    ref_path: str | Path | None = None,
    threads: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> EvalResult:
    """PPL of `model_path` on `text`; with `ref_path`, also KLD and top-1 agreement against it."""
    check_ctx(ctx)
    check_gguf(model_path)
    # as llama-perplexity: at least two contexts of text
    chunks = token_chunks(model_path, text, ctx, max_chunks=max_chunks, min_chunks=2, text_name=text_name)
    return evaluate_chunks([model_path], chunks, text_name=text_name, ref_path=ref_path, threads=threads, progress=progress)[0]

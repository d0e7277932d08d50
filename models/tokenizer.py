"""Tokenization by llama.cpp from a GGUF's own vocabulary, so every stage sees the same tokens."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from windq import llamacpp
from windq.errors import InputError


# Tokens past a prefix's cut may differ from the whole text's; this many are dropped at the cut.
_MARGIN = 64


class Tokenizer:
    def __init__(self, path: str | Path, llm=None):
        lc = llamacpp.llama_cpp()
        if llm is None:
            llm = llamacpp.load_llama(path, vocab_only=True)
            self._owned = llm
        else:
            self._owned = None
        self.llm = llm
        self.bos = llm.token_bos()
        # llama-perplexity and llama-imatrix put BOS first in every chunk only when the vocabulary adds one
        self.add_bos = bool(lc.llama_vocab_get_add_bos(llm._model.vocab))

    def tokenize(self, text: str, max_tokens: int | None = None) -> np.ndarray:
        """As llama-perplexity: add_special=true (BOS if the vocabulary adds one), parse_special=false.

        With `max_tokens`, only a prefix of the text long enough for that many tokens is tokenized
        (a whole Wikipedia dump through a byte-level SentencePiece vocabulary takes minutes). The
        prefix overshoots by a margin, so the tokens returned are those of the whole text.
        """
        if max_tokens is None:
            return self._tokenize(text)
        n_chars = 8 * max_tokens + 4096
        while True:
            tokens = self._tokenize(text[:n_chars])
            if n_chars >= len(text) or len(tokens) >= max_tokens + _MARGIN:
                return tokens[:max_tokens]
            n_chars *= 2

    def _tokenize(self, text: str) -> np.ndarray:
        return np.asarray(self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=False), dtype=np.int64)

    def close(self) -> None:
        if self._owned is not None:
            self._owned.close()


def token_chunks(
    path: str | Path, text: str, ctx: int, *, max_chunks: int | None = None, min_chunks: int = 1, text_name: str = "text"
) -> np.ndarray:
    """`text` as (n, ctx) token chunks, cut as llama-imatrix and llama-perplexity cut them: tokenized
    once by the GGUF's own vocabulary, BOS first if it adds one, whole chunks only, and each chunk's
    first token set to BOS where the vocabulary uses one (every chunk runs from an empty cache).
    Calibration, evaluation and the bench all cut their tokens here."""
    tok = Tokenizer(path)
    try:
        tokens = tok.tokenize(text, max_tokens=None if max_chunks is None else max(max_chunks, min_chunks) * ctx)
    finally:
        tok.close()
    n = len(tokens) // ctx if max_chunks is None else min(max_chunks, len(tokens) // ctx)
    if n < min_chunks:
        raise InputError(
            f"{text_name}: too short, {len(tokens)} tokens where {min_chunks} × {ctx} are needed; give more text or a smaller --ctx"
        )
    chunks = tokens[: n * ctx].reshape(n, ctx).copy()
    if tok.add_bos:
        chunks[:, 0] = tok.bos
    return chunks

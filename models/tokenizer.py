"""Tokenization by llama.cpp from a GGUF's own vocabulary, so every stage sees the same tokens."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from windq.errors import InputError
from windq.export import llama


# Tokens past a prefix's cut may differ from the whole text's; this many are dropped at the cut.
_MARGIN = 64


class Tokenizer:
    def __init__(self, path: str | Path, llm=None):
        lc = llama.llama_cpp()
        if llm is None:
            try:
                llm = llama.load_llama(path, vocab_only=True)
            except Exception as e:
                raise InputError(f"{path}: llama.cpp could not load the vocabulary ({llama.last_error()})") from e
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

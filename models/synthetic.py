"""A tiny llama model with random weights, written as an F32 GGUF, for fast tests.

Every width is a multiple of 256, so every type windq offers is legal on every tensor. The
tokenizer is a byte-level SentencePiece vocabulary (3 specials + 256 byte tokens): llama.cpp
tokenizes any UTF-8 text with it, one token per byte.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np


@dataclass(frozen=True)
class SyntheticConfig:
    n_layer: int = 2
    n_embd: int = 256
    n_ff: int = 512
    n_head: int = 4
    n_head_kv: int = 2
    n_ctx: int = 2048
    rms_eps: float = 1e-5
    seed: int = 0

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


def _vocab() -> tuple[list[str], list[int]]:
    T = gguf.TokenType
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [T.UNKNOWN, T.CONTROL, T.CONTROL] + [T.BYTE] * 256
    return tokens, [int(t) for t in types]


def _name(kind: gguf.MODEL_TENSOR, layer: int | None = None) -> str:
    base = gguf.TENSOR_NAMES[kind]
    return (base.format(bid=layer) if layer is not None else base) + ".weight"


def write_synthetic_gguf(path: str | Path, cfg: SyntheticConfig = SyntheticConfig()) -> Path:
    path = Path(path)
    rng = np.random.default_rng(cfg.seed)
    tokens, types = _vocab()
    n_vocab = len(tokens)
    M = gguf.MODEL_TENSOR

    def linear(rows: int, cols: int) -> np.ndarray:
        # numpy shape is (rows, row length), the reverse of ggml's ne order.
        # A few large input channels, as real activations/weights have, make types differ more.
        w = rng.standard_normal((rows, cols)) / np.sqrt(cols)
        w[:, rng.choice(cols, size=max(1, cols // 64), replace=False)] *= 8
        return w.astype(np.float32)

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("windq-synthetic-llama")
    w.add_block_count(cfg.n_layer)
    w.add_context_length(cfg.n_ctx)
    w.add_embedding_length(cfg.n_embd)
    w.add_feed_forward_length(cfg.n_ff)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.n_head_kv)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(cfg.rms_eps)
    w.add_vocab_size(n_vocab)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * n_vocab)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)

    w.add_tensor(_name(M.TOKEN_EMBD), linear(n_vocab, cfg.n_embd))
    kv = cfg.n_head_kv * cfg.head_dim
    for i in range(cfg.n_layer):
        w.add_tensor(_name(M.ATTN_NORM, i), np.ones(cfg.n_embd, dtype=np.float32))
        w.add_tensor(_name(M.ATTN_Q, i), linear(cfg.n_embd, cfg.n_embd))
        w.add_tensor(_name(M.ATTN_K, i), linear(kv, cfg.n_embd))
        w.add_tensor(_name(M.ATTN_V, i), linear(kv, cfg.n_embd))
        w.add_tensor(_name(M.ATTN_OUT, i), linear(cfg.n_embd, cfg.n_embd))
        w.add_tensor(_name(M.FFN_NORM, i), np.ones(cfg.n_embd, dtype=np.float32))
        w.add_tensor(_name(M.FFN_GATE, i), linear(cfg.n_ff, cfg.n_embd))
        w.add_tensor(_name(M.FFN_UP, i), linear(cfg.n_ff, cfg.n_embd))
        w.add_tensor(_name(M.FFN_DOWN, i), linear(cfg.n_embd, cfg.n_ff))
    w.add_tensor(_name(M.OUTPUT_NORM), np.ones(cfg.n_embd, dtype=np.float32))
    w.add_tensor(_name(M.OUTPUT), linear(n_vocab, cfg.n_embd))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path

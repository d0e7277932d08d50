"""Tiny models with random weights, written as F32 GGUFs, for fast tests: one per architecture
windq calibrates (`FLAVOURS`), each laid out as llama.cpp's own converter writes that family.

Every width is a multiple of 256, so every type windq offers is legal on every tensor. The
tokenizer is a byte-level SentencePiece vocabulary (3 specials + 256 byte tokens): llama.cpp
tokenizes any UTF-8 text with it, one token per byte, whatever the architecture.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from windq.errors import InputError


@dataclass(frozen=True)
class Flavour:
    """What sets one family's GGUF apart from llama's, as llama.cpp's converter writes it."""

    arch: gguf.MODEL_ARCH  # general.architecture: the graph llama.cpp runs
    name: str  # general.name
    qkv_bias: bool = False  # q, k and v projections carry biases (1-D F32 tensors, never quantized)
    head_dim: int | None = None  # a head width stated apart from n_embd / n_head (key_length, value_length)
    rope_freq_base: float = 10000.0


FLAVOURS = {
    "llama": Flavour(gguf.MODEL_ARCH.LLAMA, "windq-synthetic-llama"),
    # Qwen2: its own architecture, biases on q, k and v, and NEOX-style rotary, for which the
    # converter leaves Q and K rows as they are (llama's are permuted).
    "qwen2": Flavour(gguf.MODEL_ARCH.QWEN2, "windq-synthetic-qwen2", qkv_bias=True, rope_freq_base=1e6),
    # Mistral: llama.cpp's converter writes MistralForCausalLM as architecture llama; transformers
    # tells it apart by general.name alone (exactly "mistral"), the trap windq's loader must get
    # past. A head width apart from n_embd / n_head is the layout of Mistral Nemo and Small.
    "mistral": Flavour(gguf.MODEL_ARCH.LLAMA, "mistral", head_dim=128, rope_freq_base=1e6),
}


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
    architecture: str = "llama"  # a key of FLAVOURS
    tied: bool = False  # no output.weight: the head is token_embd, in llama.cpp and in transformers

    @property
    def flavour(self) -> Flavour:
        if self.architecture not in FLAVOURS:
            raise InputError(f"no synthetic model for architecture {self.architecture!r} (there are: {', '.join(FLAVOURS)})")
        return FLAVOURS[self.architecture]

    @property
    def head_dim(self) -> int:
        return self.flavour.head_dim or self.n_embd // self.n_head


def _vocab() -> tuple[list[str], list[int]]:
    T = gguf.TokenType
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [T.UNKNOWN, T.CONTROL, T.CONTROL] + [T.BYTE] * 256
    return tokens, [int(t) for t in types]


def _name(kind: gguf.MODEL_TENSOR, layer: int | None = None, suffix: str = ".weight") -> str:
    base = gguf.TENSOR_NAMES[kind]
    return (base.format(bid=layer) if layer is not None else base) + suffix


def write_synthetic_gguf(path: str | Path, cfg: SyntheticConfig = SyntheticConfig()) -> Path:
    path = Path(path)
    flavour = cfg.flavour
    rng = np.random.default_rng(cfg.seed)
    tokens, types = _vocab()
    n_vocab = len(tokens)
    M = gguf.MODEL_TENSOR
    kinds = set(gguf.MODEL_TENSORS[flavour.arch])

    def linear(rows: int, cols: int) -> np.ndarray:
        # numpy shape is (rows, row length), the reverse of ggml's ne order.
        # A few large input channels, as real activations/weights have, make types differ more.
        w = rng.standard_normal((rows, cols)) / np.sqrt(cols)
        w[:, rng.choice(cols, size=max(1, cols // 64), replace=False)] *= 8
        return w.astype(np.float32)

    def add(kind: gguf.MODEL_TENSOR, data: np.ndarray, layer: int | None = None, suffix: str = ".weight") -> None:
        if kind not in kinds:  # gguf-py's own list of what this architecture holds
            raise InputError(f"gguf-py has no {kind.name} in {gguf.MODEL_ARCH_NAMES[flavour.arch]}")
        w.add_tensor(_name(kind, layer, suffix), data)

    w = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[flavour.arch])
    w.add_name(flavour.name)
    w.add_block_count(cfg.n_layer)
    w.add_context_length(cfg.n_ctx)
    w.add_embedding_length(cfg.n_embd)
    w.add_feed_forward_length(cfg.n_ff)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.n_head_kv)
    if flavour.head_dim is not None:
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(flavour.rope_freq_base)
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

    add(M.TOKEN_EMBD, linear(n_vocab, cfg.n_embd))
    q, kv = cfg.n_head * cfg.head_dim, cfg.n_head_kv * cfg.head_dim
    for i in range(cfg.n_layer):
        add(M.ATTN_NORM, np.ones(cfg.n_embd, dtype=np.float32), i)
        add(M.ATTN_Q, linear(q, cfg.n_embd), i)
        add(M.ATTN_K, linear(kv, cfg.n_embd), i)
        add(M.ATTN_V, linear(kv, cfg.n_embd), i)
        if flavour.qkv_bias:
            # large enough that a loader which dropped them would change every logit
            for kind, rows in ((M.ATTN_Q, q), (M.ATTN_K, kv), (M.ATTN_V, kv)):
                add(kind, rng.standard_normal(rows).astype(np.float32), i, ".bias")
        add(M.ATTN_OUT, linear(cfg.n_embd, q), i)
        add(M.FFN_NORM, np.ones(cfg.n_embd, dtype=np.float32), i)
        add(M.FFN_GATE, linear(cfg.n_ff, cfg.n_embd), i)
        add(M.FFN_UP, linear(cfg.n_ff, cfg.n_embd), i)
        add(M.FFN_DOWN, linear(cfg.n_embd, cfg.n_ff), i)
    add(M.OUTPUT_NORM, np.ones(cfg.n_embd, dtype=np.float32))
    if not cfg.tied:
        add(M.OUTPUT, linear(n_vocab, cfg.n_embd))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path

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
    """What sets one family's GGUF apart from llama's, as llama.cpp's converter writes it. Which
    norms a layer holds is not here: it is gguf-py's list of the architecture's tensors
    (`MODEL_TENSORS`: per-head Q/K norms for qwen3 and gemma3, post-attention and post-FFN norms for
    gemma2 and gemma3)."""

    arch: gguf.MODEL_ARCH  # general.architecture: the graph llama.cpp runs
    name: str  # general.name
    qkv_bias: bool = False  # q, k and v projections carry biases (1-D F32 tensors, never quantized)
    head_dim: int | None = None  # a head width stated apart from n_embd / n_head (key_length, value_length)
    rope_freq_base: float = 10000.0
    n_layer: int = 2  # layers unless the config says otherwise: enough to hold every kind of layer
    tied: bool = False  # the converter never writes output.weight (Gemma: the head is the embedding)
    sliding_window: int | None = None  # attention.sliding_window, for the layers llama.cpp makes local
    attn_softcap: float | None = None  # attn_logit_softcapping
    final_softcap: float | None = None  # final_logit_softcapping
    fused: bool = False  # one attn_qkv (Q, K, V rows stacked) and one ffn_up (gate rows, then up rows)
    pad_token: int | None = None  # tokenizer.ggml.padding_token_id, as the converter writes a tokenizer's
    experts: tuple[int, int] | None = None  # MoE: (experts, experts used per token), each n_ff wide


FLAVOURS = {
    "llama": Flavour(gguf.MODEL_ARCH.LLAMA, "windq-synthetic-llama"),
    # Qwen2: its own architecture, biases on q, k and v, and NEOX-style rotary, for which the
    # converter leaves Q and K rows as they are (llama's are permuted).
    "qwen2": Flavour(gguf.MODEL_ARCH.QWEN2, "windq-synthetic-qwen2", qkv_bias=True, rope_freq_base=1e6),
    # Mistral: llama.cpp's converter writes MistralForCausalLM as architecture llama; transformers
    # tells it apart by general.name alone (exactly "mistral"), the trap windq's loader must get
    # past. A head width apart from n_embd / n_head is the layout of Mistral Nemo and Small.
    "mistral": Flavour(gguf.MODEL_ARCH.LLAMA, "mistral", head_dim=128, rope_freq_base=1e6),
    # Qwen3: an RMSNorm over each head of Q and of K before the rotation, no biases, NEOX rotary;
    # head width 128 as in every Qwen3 (0.6B to 32B), apart from n_embd / n_head.
    "qwen3": Flavour(gguf.MODEL_ARCH.QWEN3, "windq-synthetic-qwen3", head_dim=128, rope_freq_base=1e6),
    # Gemma 3: per-head Q/K norms, post-attention and post-FFN norms, GELU, embeddings scaled by
    # √n_embd, a tied head, the head width stated (64 here, where every real Gemma but 27B has 256:
    # transformers' default, which windq must not rely on); five local (sliding-window, rotary base
    # 10000) layers to one global layer (the file's rotary base), so six layers hold both kinds. A
    # window of 16 makes the 64-token logit check see it.
    "gemma3": Flavour(
        gguf.MODEL_ARCH.GEMMA3, "windq-synthetic-gemma3", head_dim=64, rope_freq_base=1e6, n_layer=6, tied=True,
        sliding_window=16,
    ),  # fmt: skip
    # Gemma 2: post norms and a tied head as Gemma 3's, no Q/K norms, local and global layers
    # alternating, and tanh soft-capping of attention scores and logits. The caps are smaller
    # than the real 50 and 30, so that they bite on a tiny model and a loader that took its own
    # defaults instead of the file's would show.
    "gemma2": Flavour(
        gguf.MODEL_ARCH.GEMMA2, "windq-synthetic-gemma2", head_dim=64, tied=True, sliding_window=16,
        attn_softcap=10.0, final_softcap=5.0,
    ),  # fmt: skip
    # Phi-3: Q, K and V in one attn_qkv and gate and up in one ffn_up, as in transformers' Phi3
    # (qkv_proj, gate_up_proj), NEOX rotary. The converter writes the sliding window, which
    # llama.cpp ignores for phi3 (and transformers' GGUF table does not read): 16 here, so the
    # 64-token logit check would see either side start honouring it. The pad token is written as
    # Phi-3's GGUFs have one (32000): without it transformers takes 32000, beyond this vocabulary.
    # Not named "phi3": llama.cpp then looks for Phi-3's <|endoftext|> in the vocabulary.
    "phi3": Flavour(gguf.MODEL_ARCH.PHI3, "windq-synthetic-phi", fused=True, sliding_window=16, pad_token=0),
    # Qwen3-MoE (Qwen3-30B-A3B's layout): Qwen3's attention, and in every layer a router
    # (ffn_gate_inp, never quantized) over experts held as 3-D tensors (each expert n_ff wide).
    "qwen3moe": Flavour(gguf.MODEL_ARCH.QWEN3MOE, "windq-synthetic-qwen3moe", head_dim=128, rope_freq_base=1e6, experts=(4, 2)),
}


@dataclass(frozen=True)
class SyntheticConfig:
    n_layer: int | None = None  # None: the flavour's
    n_embd: int = 256
    n_ff: int = 512
    n_head: int = 4
    n_head_kv: int = 2
    n_ctx: int = 2048
    rms_eps: float = 1e-5
    seed: int = 0
    architecture: str = "llama"  # a key of FLAVOURS
    tied: bool = False  # no output.weight: the head is token_embd, in llama.cpp and in transformers
    f16: bool = False  # weight matrices as F16 (norms, biases and the router stay F32, as llama.cpp's converter writes them)

    @property
    def flavour(self) -> Flavour:
        if self.architecture not in FLAVOURS:
            raise InputError(f"no synthetic model for architecture {self.architecture!r} (there are: {', '.join(FLAVOURS)})")
        return FLAVOURS[self.architecture]

    @property
    def layers(self) -> int:
        return self.n_layer or self.flavour.n_layer

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
        return w.astype(np.float16 if cfg.f16 else np.float32)

    def add(kind: gguf.MODEL_TENSOR, data: np.ndarray, layer: int | None = None, suffix: str = ".weight") -> None:
        if kind not in kinds:  # gguf-py's own list of what this architecture holds
            raise InputError(f"gguf-py has no {kind.name} in {gguf.MODEL_ARCH_NAMES[flavour.arch]}")
        w.add_tensor(_name(kind, layer, suffix), data)

    def norm(n: int) -> np.ndarray:
        # the scale llama.cpp multiplies by: Gemma's converter has already added the 1 that
        # transformers' Gemma RMSNorm adds at run time (its tensor processor takes it off again)
        return rng.uniform(0.5, 1.5, n).astype(np.float32)

    w = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[flavour.arch])
    w.add_name(flavour.name)
    w.add_block_count(cfg.layers)
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
    if flavour.sliding_window is not None:
        w.add_sliding_window(flavour.sliding_window)
    if flavour.attn_softcap is not None:
        w.add_attn_logit_softcapping(flavour.attn_softcap)
    if flavour.final_softcap is not None:
        w.add_final_logit_softcapping(flavour.final_softcap)
    w.add_vocab_size(n_vocab)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if cfg.f16 else gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * n_vocab)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    if flavour.pad_token is not None:
        w.add_pad_token_id(flavour.pad_token)
    if flavour.experts:
        w.add_expert_count(flavour.experts[0])
        w.add_expert_used_count(flavour.experts[1])
        w.add_expert_feed_forward_length(cfg.n_ff)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)

    add(M.TOKEN_EMBD, linear(n_vocab, cfg.n_embd))
    q, kv = cfg.n_head * cfg.head_dim, cfg.n_head_kv * cfg.head_dim
    ffn_norm = M.FFN_NORM if M.FFN_NORM in kinds else M.FFN_PRE_NORM  # one name, blk.N.ffn_norm; gemma's is "pre"
    for i in range(cfg.layers):
        add(M.ATTN_NORM, np.ones(cfg.n_embd, dtype=np.float32), i)
        if flavour.fused:
            add(M.ATTN_QKV, linear(q + 2 * kv, cfg.n_embd), i)
        else:
            add(M.ATTN_Q, linear(q, cfg.n_embd), i)
            add(M.ATTN_K, linear(kv, cfg.n_embd), i)
            add(M.ATTN_V, linear(kv, cfg.n_embd), i)
        if flavour.qkv_bias:
            # large enough that a loader which dropped them would change every logit
            for kind, rows in ((M.ATTN_Q, q), (M.ATTN_K, kv), (M.ATTN_V, kv)):
                add(kind, rng.standard_normal(rows).astype(np.float32), i, ".bias")
        if M.ATTN_Q_NORM in kinds:  # one scale per channel of a head, shared by all heads
            add(M.ATTN_Q_NORM, norm(cfg.head_dim), i)
            add(M.ATTN_K_NORM, norm(cfg.head_dim), i)
        add(M.ATTN_OUT, linear(cfg.n_embd, q), i)
        if M.ATTN_POST_NORM in kinds:
            add(M.ATTN_POST_NORM, norm(cfg.n_embd), i)
        add(ffn_norm, np.ones(cfg.n_embd, dtype=np.float32), i)
        if flavour.fused:
            add(M.FFN_UP, linear(2 * cfg.n_ff, cfg.n_embd), i)
        elif not flavour.experts:
            add(M.FFN_GATE, linear(cfg.n_ff, cfg.n_embd), i)
            add(M.FFN_UP, linear(cfg.n_ff, cfg.n_embd), i)
        if flavour.experts:
            n_expert = flavour.experts[0]
            add(M.FFN_GATE_INP, rng.standard_normal((n_expert, cfg.n_embd)).astype(np.float32), i)  # the router
            # 3-D, one matrix per expert (numpy order: expert, row, column)
            add(M.FFN_GATE_EXP, np.stack([linear(cfg.n_ff, cfg.n_embd) for _ in range(n_expert)]), i)
            add(M.FFN_UP_EXP, np.stack([linear(cfg.n_ff, cfg.n_embd) for _ in range(n_expert)]), i)
            add(M.FFN_DOWN_EXP, np.stack([linear(cfg.n_embd, cfg.n_ff) for _ in range(n_expert)]), i)
            continue
        add(M.FFN_DOWN, linear(cfg.n_embd, cfg.n_ff), i)
        if M.FFN_POST_NORM in kinds:
            add(M.FFN_POST_NORM, norm(cfg.n_embd), i)
    add(M.OUTPUT_NORM, np.ones(cfg.n_embd, dtype=np.float32))
    if not (cfg.tied or flavour.tied):
        add(M.OUTPUT, linear(n_vocab, cfg.n_embd))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path

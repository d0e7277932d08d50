"""An HF llama-family checkpoint (LlamaForCausalLM, MistralForCausalLM) as a GGUF stock llama.cpp runs.

Names come from gguf's `TensorNameMap`, the vocabulary from gguf's vocab helpers; nothing here
keeps its own name table. Two things need care:

- Q and K rows. HF's rotary embedding rotates the two halves of each head (rotate_half); ggml's
  llama rope rotates adjacent pairs. Reordering each head's rows from [first half, second half] to
  interleaved makes both compute the same scores.
- The pre-tokenizer. llama.cpp splits text with a regex chosen by the `tokenizer.ggml.pre` name,
  and the wrong one silently changes tokens. Instead of guessing from a hash table, every name
  llama.cpp accepts from `PRE_TOKENIZERS` is tried and the first whose llama.cpp tokenization of a
  probe text equals the HF tokenizer's is kept; if none does, conversion is refused.

Weights are written as F32 (or F16 for 2-D weights), ready for `windq export`.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import gguf
import numpy as np

from windq.errors import InputError, UnsupportedModelError
from windq.files import atomic_output

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
# llama.cpp pre-tokenizer names used by llama-family BPE vocabularies, most specific first
PRE_TOKENIZERS = ("smollm", "llama-bpe", "gpt2", "qwen2", "deepseek-llm", "starcoder", "tekken", "olmo", "dbrx", "default")
OUTTYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16}

# What the tokenization check runs on: contractions, digit runs, code, whitespace runs, non-Latin scripts.
PROBE_TEXT = (
    "Hello world! It's 2024-11-23; we'll pay $1,234.56 (about 3.14159e3) for 12345 items.\n"
    "  Indented   text\twith\ttabs\n\n\nand blank lines.  \n"
    "def f(x):\n    return x**2 + 0x1F  # comment\n"
    "I'm, you're, they've, she'd, we'LL, DON'T\n"
    "Ünïcödé façade naïve; Ελληνικά; русский текст; 中文字符测试; 日本語のテキスト; 한국어; العربية\n"
    "emoji 🦙🚀 and symbols ©®™ — “quotes” … ‘single’\n"
)


@dataclass(frozen=True)
class ConvertReport:
    path: Path
    architecture: str
    n_tensors: int
    n_weights: int
    vocab: str  # "gpt2 (pre smollm)" or "llama"
    outtype: str


@dataclass(frozen=True)
class _Hparams:
    n_embd: int
    n_ff: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ctx: int
    n_vocab: int
    rope_theta: float
    rms_eps: float
    tied: bool


def _hparams(cfg: dict, where: Path) -> _Hparams:
    archs = cfg.get("architectures") or []
    if not any(a in ARCHITECTURES for a in archs):
        raise UnsupportedModelError(f"{where}: architecture {archs or cfg.get('model_type')!r} is not supported; windq converts {', '.join(ARCHITECTURES)}")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", None):
        raise UnsupportedModelError(f"{where}: rope scaling {rope_type!r} is not supported (only plain RoPE)")
    if cfg.get("partial_rotary_factor", 1.0) != 1.0:
        raise UnsupportedModelError(f"{where}: partial rotary embeddings are not supported")
    if cfg.get("hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"{where}: activation {cfg['hidden_act']!r} is not supported (llama uses silu)")
    n_head = int(cfg["num_attention_heads"])
    return _Hparams(
        n_embd=int(cfg["hidden_size"]), n_ff=int(cfg["intermediate_size"]), n_layer=int(cfg["num_hidden_layers"]),
        n_head=n_head, n_head_kv=int(cfg.get("num_key_value_heads") or n_head),
        head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // n_head),
        n_ctx=int(cfg.get("max_position_embeddings", 4096)), n_vocab=int(cfg["vocab_size"]),
        rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
        rms_eps=float(cfg.get("rms_norm_eps", 1e-6)), tied=bool(cfg.get("tie_word_embeddings", False)),
    )  # fmt: skip


def rope_interleave(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's half-split rotary row order → ggml's adjacent-pair order, head by head."""
    rows, cols = w.shape
    return w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _load_weights(hf_dir: Path) -> dict[str, np.ndarray]:
    files = sorted(hf_dir.glob("*.safetensors"))
    if files:
        from safetensors import safe_open

        out = {}
        for f in files:
            # through torch: numpy has no bfloat16, the usual dtype of released checkpoints
            with safe_open(str(f), framework="pt") as st:
                for k in st.keys():
                    out[k] = st.get_tensor(k).float().numpy()
        return out
    bins = sorted(hf_dir.glob("pytorch_model*.bin"))
    if bins:
        import torch

        out = {}
        for f in bins:
            out.update({k: v.float().numpy() for k, v in torch.load(f, map_location="cpu", weights_only=True).items()})
        return out
    raise InputError(f"{hf_dir}: no *.safetensors or pytorch_model*.bin weights")


# vocabulary ------------------------------------------------------------------------------


def _vocab(hf_dir: Path, n_vocab: int) -> tuple[str, list[bytes], list[float], list[int]]:
    """Tokenizer model name, tokens, scores and token types, padded to the model's vocab size."""
    try:
        v = gguf.vocab.BpeVocab(hf_dir)
        model = "gpt2"
    except (FileNotFoundError, ValueError, KeyError):
        try:
            v = gguf.vocab.LlamaHfVocab(hf_dir)
            model = "llama"
        except (FileNotFoundError, ValueError, KeyError, TypeError) as e:
            raise UnsupportedModelError(f"{hf_dir}: no byte-level BPE or SentencePiece-style tokenizer.json ({e})") from e
    special = _special_added_ids(hf_dir)
    tokens, scores, types = [], [], []
    for i, (text, score, ttype) in enumerate(v.all_tokens()):
        tokens.append(text.encode("utf-8") if isinstance(text, str) else text)
        scores.append(float(score))
        if i in special and ttype in (gguf.TokenType.NORMAL, gguf.TokenType.USER_DEFINED):
            ttype = gguf.TokenType.CONTROL  # llama.cpp renders control tokens only when asked
        types.append(int(ttype))
    if len(tokens) > n_vocab:
        raise UnsupportedModelError(f"{hf_dir}: tokenizer has {len(tokens)} tokens, the model's embedding only {n_vocab}")
    for i in range(len(tokens), n_vocab):  # embedding rows no token uses
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(int(gguf.TokenType.UNUSED))
    return model, tokens, scores, types


def _special_added_ids(hf_dir: Path) -> set[int]:
    path = hf_dir / "tokenizer.json"
    if not path.is_file():
        return set()
    added = json.loads(path.read_text(encoding="utf-8")).get("added_tokens") or []
    return {int(t["id"]) for t in added if t.get("special")}


def _hf_tokenize(hf_dir: Path, text: str) -> list[int]:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(hf_dir / "tokenizer.json")).encode(text, add_special_tokens=False).ids


def _llama_tokenize(vocab_gguf: Path, text: str) -> list[int] | None:
    """llama.cpp's tokens for `text` from a vocabulary-only GGUF; None if llama.cpp does not know
    the file's pre-tokenizer name. Any other load failure is raised as it is."""
    from windq import llamacpp

    try:
        llm = llamacpp.load_llama(vocab_gguf, vocab_only=True)
    except InputError as e:
        if "pre-tokenizer" in str(e):  # llama.cpp: "unknown pre-tokenizer type: 'NAME'"
            return None
        raise
    try:
        return llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
    finally:
        llm.close()


def _matching_pre(hf_dir: Path, candidates, write_vocab: Callable[[Path, str | None], None]) -> str | None:
    """The first candidate pre-tokenizer with which llama.cpp tokenizes the probe text exactly as the
    HF tokenizer does; `write_vocab(path, candidate)` writes a vocabulary-only GGUF to try."""
    want = _hf_tokenize(hf_dir, PROBE_TEXT)
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "vocab.gguf"
        for candidate in candidates:
            write_vocab(probe, candidate)
            if _llama_tokenize(probe, PROBE_TEXT) == want:
                return candidate
    raise UnsupportedModelError(
        f"{hf_dir}: no llama.cpp pre-tokenizer ({', '.join(c or 'none' for c in candidates)}) tokenizes like this "
        "tokenizer.json; refusing to write a model that would see other tokens"
    )


# writing ---------------------------------------------------------------------------------


def _write(path: Path, hp: _Hparams, name: str, vocab: tuple, pre: str | None, special, tensors: dict[str, np.ndarray], ftype) -> None:
    model, tokens, scores, types = vocab
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(name)
    w.add_context_length(hp.n_ctx)
    w.add_embedding_length(hp.n_embd)
    w.add_block_count(hp.n_layer)
    w.add_feed_forward_length(hp.n_ff)
    w.add_head_count(hp.n_head)
    w.add_head_count_kv(hp.n_head_kv)
    if hp.head_dim != hp.n_embd // hp.n_head:
        w.add_key_length(hp.head_dim)
        w.add_value_length(hp.head_dim)
    w.add_rope_dimension_count(hp.head_dim)
    w.add_rope_freq_base(hp.rope_theta)
    w.add_layer_norm_rms_eps(hp.rms_eps)
    w.add_vocab_size(hp.n_vocab)
    w.add_file_type(int(ftype))
    w.add_tokenizer_model(model)
    if pre is not None:
        w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    if model == "llama":
        w.add_token_scores(scores)
    special.add_to_gguf(w, quiet=True)
    for tname, t in tensors.items():
        w.add_tensor(tname, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def convert_hf(
    hf_dir: str | Path, out: str | Path, *, outtype: str = "f32", progress: Callable[[int, int], None] | None = None
) -> ConvertReport:
    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise InputError(f"{hf_dir}: not an HF model directory (no config.json)")
    if outtype not in OUTTYPES:
        raise InputError(f"--outtype {outtype}: use one of {', '.join(OUTTYPES)}")
    cfg = json.loads((hf_dir / "config.json").read_text(encoding="utf-8"))
    hp = _hparams(cfg, hf_dir)
    vocab = _vocab(hf_dir, hp.n_vocab)
    special = gguf.vocab.SpecialVocab(hf_dir, load_merges=vocab[0] == "gpt2", n_vocab=hp.n_vocab)
    name = cfg.get("_name_or_path") or cfg.get("_model_name_or_path") or hf_dir.name

    # SentencePiece-style vocabularies have no pre-tokenizer: only check that llama.cpp agrees
    candidates = PRE_TOKENIZERS if vocab[0] == "gpt2" else (None,)
    pre = _matching_pre(hf_dir, candidates, lambda path, c: _write(path, hp, name, vocab, c, special, {}, OUTTYPES[outtype]))

    weights = _load_weights(hf_dir)
    names = gguf.TensorNameMap(gguf.MODEL_ARCH.LLAMA, hp.n_layer)
    tensors: dict[str, np.ndarray] = {}
    for i, (hf_name, w) in enumerate(sorted(weights.items())):
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue  # recomputed by llama.cpp from rope_freq_base
        if hf_name == "lm_head.weight" and hp.tied:
            continue
        gname = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise UnsupportedModelError(f"{hf_dir}: tensor {hf_name} has no llama GGUF name")
        if hf_name.endswith("q_proj.weight"):
            w = rope_interleave(w, hp.n_head)
        elif hf_name.endswith("k_proj.weight"):
            w = rope_interleave(w, hp.n_head_kv)
        # llama.cpp keeps 1-D tensors (norms) in F32 whatever the file type
        dtype = np.float16 if outtype == "f16" and w.ndim > 1 else np.float32
        tensors[gname] = np.ascontiguousarray(w, dtype=dtype)
        if progress:
            progress(i + 1, len(weights))
    if "token_embd.weight" not in tensors:
        raise InputError(f"{hf_dir}: no embedding tensor (model.embed_tokens.weight)")

    out = Path(out)
    with atomic_output(out) as tmp:
        _write(tmp, hp, name, vocab, pre, special, tensors, OUTTYPES[outtype])
    return ConvertReport(
        out, cfg["architectures"][0], len(tensors), sum(t.size for t in tensors.values()),
        vocab[0] if pre is None else f"{vocab[0]} (pre {pre})", outtype,
    )  # fmt: skip

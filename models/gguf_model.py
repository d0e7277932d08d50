"""A read-only view of a GGUF model: its tensors, their ggml types and shapes, and its identity."""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from windq.errors import InputError
from windq.keys import Keys
from windq import ggml


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # ggml order: row length first
    type_id: int
    nbytes: int

    @property
    def n_per_row(self) -> int:
        return self.shape[0]

    @property
    def n_mat(self) -> int:
        """Matrices stacked in the tensor: an MoE tensor's experts (ggml's third dimension), else 1."""
        n = 1
        for d in self.shape[2:]:
            n *= d
        return n

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def type_name(self) -> str:
        return gguf.GGMLQuantizationType(self.type_id).name


# Tensor kinds are gguf-py's MODEL_TENSOR, named by its TENSOR_NAMES ("blk.{bid}.attn_q"); the
# first kind listed wins where two share a name.
_KIND_BY_NAME: dict[str, gguf.MODEL_TENSOR] = {}
for _kind, _name in gguf.TENSOR_NAMES.items():
    _KIND_BY_NAME.setdefault(_name, _kind)
_BLOCK = re.compile(r"^blk\.\d+\.")

# The weights of one decoder layer, in the order reports and observations list them.
LAYER_KINDS = (
    gguf.MODEL_TENSOR.ATTN_Q, gguf.MODEL_TENSOR.ATTN_K, gguf.MODEL_TENSOR.ATTN_V, gguf.MODEL_TENSOR.ATTN_OUT,
    gguf.MODEL_TENSOR.FFN_GATE, gguf.MODEL_TENSOR.FFN_UP, gguf.MODEL_TENSOR.FFN_DOWN,
)  # fmt: skip


def tensor_kind(name: str) -> gguf.MODEL_TENSOR | None:
    """gguf's kind of a GGUF tensor name (`blk.3.attn_output.weight` → ATTN_OUT), None if unknown."""
    base = name.removesuffix(".weight").removesuffix(".bias")
    return _KIND_BY_NAME.get(_BLOCK.sub("blk.{bid}.", base))


def kind_name(kind: gguf.MODEL_TENSOR) -> str:
    """The short name of a kind as it appears in tensor names (`attn_output`)."""
    return gguf.TENSOR_NAMES[kind].removeprefix("blk.{bid}.")


# llama.cpp's rule (tensor_allows_quantization in src/llama-quant.cpp, as llama-cpp-python 0.3.36
# vendors it): a tensor of 2 or 3 dimensions whose name ends in "weight" is quantized, except these,
# which it copies as they are. Norms include the per-head Q/K norms of Qwen3 and Gemma 3 and Gemma's
# post-attention and post-FFN norms (all 1-D as well); its extra list for one architecture
# (GLM5-next) is left out, as windq does not run it.
_KEPT_IF_NAME_HAS = (
    "_norm.weight",  # norms
    "ffn_gate_inp.weight",  # MoE routers
    "ffn_gate_tid2eid.weight",  # a token-id → expert-id table
    "altup", "laurel", "per_layer_model_proj",  # Gemma 3n's small tensors
    "ssm_conv1d", "shortconv.conv.weight",  # Mamba's and LFM2's small convolutions
    "indexer.k_proj.weight", "indexer.q_proj.weight",  # MiniMax's indexer
)  # fmt: skip
_KEPT_NAMES = tuple(gguf.TENSOR_NAMES[k] + ".weight" for k in (gguf.MODEL_TENSOR.POS_EMBD, gguf.MODEL_TENSOR.TOKEN_TYPES))


def is_quantizable(t: TensorInfo) -> bool:
    """The tensors llama.cpp's quantizer may change (tensor_allows_quantization in llama-quant.cpp).

    Only these appear in a plan; the rest (norms, 1-D tensors) are copied as they are and counted
    in the bits as they are.
    """
    # ggml_n_dims: trailing dimensions of 1 do not count, so an (n, 1) tensor is 1-D to llama.cpp
    n_dims = max((i + 1 for i, d in enumerate(t.shape) if d > 1), default=1)
    if n_dims < 2 or not t.name.endswith("weight") or t.name in _KEPT_NAMES:
        return False
    return not any(part in t.name for part in _KEPT_IF_NAME_HAS)


def check_gguf(path: str | Path) -> Path:
    """One clear error for a missing file or a non-GGUF, before llama.cpp or gguf-py sees it.

    Cheap on purpose: parsing the whole header with gguf-py takes seconds on a 49k-token vocabulary.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise InputError(f"{path}: not a GGUF file (it does not start with the GGUF magic)")
    return path


class GGUFModel:
    """Opens a GGUF once; tensors are memory-mapped by gguf-py."""

    def __init__(self, path: str | Path):
        self.path = check_gguf(path)
        try:
            self.reader = gguf.GGUFReader(self.path)
        except Exception as e:  # gguf-py raises bare ValueError/struct errors on damaged files
            raise InputError(f"{self.path}: unreadable GGUF ({e})") from e
        self._tensors = {
            t.name: TensorInfo(t.name, tuple(int(d) for d in t.shape), int(t.tensor_type), int(t.n_bytes))
            for t in self.reader.tensors
        }

    # metadata -------------------------------------------------------------
    def field(self, key: str, default=None):
        f = self.reader.get_field(key)
        return default if f is None else f.contents()

    @property
    def architecture(self) -> str:
        return self.field(gguf.Keys.General.ARCHITECTURE, "unknown")

    def arch_field(self, key_template: str, default=None):
        return self.field(key_template.format(arch=self.architecture), default)

    # tensors --------------------------------------------------------------
    @property
    def tensors(self) -> dict[str, TensorInfo]:
        return self._tensors

    def quantizable(self) -> list[TensorInfo]:
        return [t for t in self._tensors.values() if is_quantizable(t)]

    @property
    def n_weights(self) -> int:
        """Every element of every tensor: the denominator of bits per weight."""
        return sum(t.n_elements for t in self._tensors.values())

    @property
    def n_real_weights(self) -> int:
        """Weights that are not alignment padding: what bits per weight are counted over."""
        return int(self.field(Keys.Align.REAL_WEIGHTS, self.n_weights))

    @property
    def is_aligned(self) -> bool:
        return self.reader.get_field(Keys.Align.REAL_WEIGHTS) is not None

    @functools.cached_property
    def _source_types(self) -> dict[str, str]:
        entries = self.field(Keys.Twin.SOURCE_TYPES) or []
        return dict(e.split("=", 1) for e in entries)

    def source_type(self, name: str) -> str:
        """The ggml type `name` had in the model this file was made from: its own type, or for an
        aligned twin (all F32) the type in the unaligned source, which a plan can reproduce exactly."""
        return self._source_types.get(name, self._tensors[name].type_name)

    def zero_padded(self, name: str) -> bool:
        """Whether a tensor's padding zeros must survive quantization exactly. Only token_embd's do:
        its padded columns become the residual stream's padded channels, which RMSNorm averages over.
        Every other padded column multiplies activations that are exactly zero, and padded rows are
        whole zero blocks, which every ggml type keeps at zero."""
        return self.is_aligned and name == "token_embd.weight"

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self._tensors.values())

    def raw(self, name: str) -> np.ndarray:
        for t in self.reader.tensors:
            if t.name == name:
                return np.asarray(t.data)
        raise InputError(f"{self.path}: no tensor {name}")

    def dequantized(self, name: str) -> np.ndarray:
        """A tensor as float32, shape (rows, n_per_row), decoded by libggml."""
        info = self._tensors[name]
        rows = info.n_elements // info.n_per_row
        return ggml.dequantize(info.type_id, self.raw(name), (rows, info.n_per_row))

    @functools.cached_property
    def sha256(self) -> str:
        return file_sha256(self.path)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()

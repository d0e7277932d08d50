"""Width alignment: an exact transform that gives a llama-family model widths ggml's 256-blocks fit.

SmolLM2-135M is 576 wide, so K and IQ types (256 weights per block along a row) cannot be written
for most of its tensors. Zero-padding makes them legal without changing what the model computes:

- hidden width E → E' (next multiple of `to`): token_embd/output columns, q/k/v/gate/up input
  columns and o/down output rows get exact zeros, so padded hidden channels are always 0;
- attention: whole dummy heads are added so n_head·head_dim is a multiple of `to`, and one dummy
  KV head per added group, so llama.cpp's grouping (q head h reads kv head h // group) still pairs
  every real q head with its real kv head. Dummy q/k/v rows and o columns are zero: a dummy head's
  scores are 0, its softmax averages zero values, and its output column weights are zero anyway;
- feed-forward width F → F' likewise (gate/up rows, down columns): silu(0)·0 = 0;
- RMSNorm averages over the width, so padding shrinks mean(x²) by E/E'. Scaling the norm weight by
  sqrt(E/E') and epsilon by E/E' gives exactly the old output: x/sqrt(r·(m+ε))·g·sqrt(r) with r = E/E'.

Weights are written as F32 (the source's exact dequantization), ready for `windq export`. The file
records how many weights are real (`windq.align.real_weights`), and bits per weight count only those.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from windq.errors import UnsupportedModelError
from windq.keys import Keys
from windq.models.gguf_model import GGUFModel, tensor_kind
from windq.models.twin import write_twin

K = gguf.MODEL_TENSOR

SUPPORTED = ("llama",)


@dataclass(frozen=True)
class Geometry:
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int

    @property
    def group(self) -> int:
        return self.n_head // self.n_head_kv


@dataclass(frozen=True)
class AlignReport:
    path: Path
    before: Geometry
    after: Geometry
    real_weights: int
    stored_weights: int


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


def geometry(model: GGUFModel) -> Geometry:
    if model.architecture not in SUPPORTED:
        raise UnsupportedModelError(
            f"{model.path.name}: alignment is supported for {', '.join(SUPPORTED)} models, not {model.architecture!r}"
        )
    f = model.arch_field
    n_embd, n_head = int(f("{arch}.embedding_length")), int(f("{arch}.attention.head_count"))
    head_dim = int(f("{arch}.attention.key_length", n_embd // n_head))
    if int(f("{arch}.attention.value_length", head_dim)) != head_dim:
        raise UnsupportedModelError(f"{model.path.name}: key and value head sizes differ; alignment does not handle it")
    return Geometry(n_embd, n_head, int(f("{arch}.attention.head_count_kv", n_head)), head_dim, int(f("{arch}.feed_forward_length")))


def aligned_geometry(g: Geometry, to: int) -> Geometry:
    n_head = g.n_head
    # whole heads until the q width is a multiple of `to`, in steps that keep the grouping
    while (n_head * g.head_dim) % to or n_head % g.group:
        n_head += 1
    return Geometry(_round_up(g.n_embd, to), n_head, n_head // g.group, g.head_dim, _round_up(g.n_ff, to))


def _pad(w: np.ndarray, rows: int, cols: int) -> np.ndarray:
    out = np.zeros((rows, cols), dtype=np.float32)
    out[: w.shape[0], : w.shape[1]] = w
    return out


def align_gguf(model: GGUFModel, out: str | Path, to: int = 256) -> AlignReport:
    if to <= 0 or to % 32:
        raise UnsupportedModelError(f"--to {to}: use a positive multiple of 32 (256 for K and IQ types)")
    g = geometry(model)
    a = aligned_geometry(g, to)
    r = g.n_embd / a.n_embd
    eps = float(model.arch_field("{arch}.attention.layer_norm_rms_epsilon"))
    arch = model.architecture

    tensors: dict[str, np.ndarray] = {}
    for name, info in model.tensors.items():
        kind = tensor_kind(name)
        w = model.dequantized(name) if len(info.shape) > 1 else np.asarray(model.raw(name), dtype=np.float32)
        if kind in (K.ATTN_NORM, K.FFN_NORM, K.OUTPUT_NORM):
            v = np.zeros(a.n_embd, dtype=np.float32)
            v[: g.n_embd] = w.reshape(-1) * np.float32(math.sqrt(r))
            tensors[name] = v
        elif kind in (K.TOKEN_EMBD, K.OUTPUT):
            tensors[name] = _pad(w, w.shape[0], a.n_embd)
        elif kind == K.ATTN_Q:
            tensors[name] = _pad(w, a.n_head * a.head_dim, a.n_embd)
        elif kind in (K.ATTN_K, K.ATTN_V):
            tensors[name] = _pad(w, a.n_head_kv * a.head_dim, a.n_embd)
        elif kind == K.ATTN_OUT:
            tensors[name] = _pad(w, a.n_embd, a.n_head * a.head_dim)
        elif kind in (K.FFN_GATE, K.FFN_UP):
            tensors[name] = _pad(w, a.n_ff, a.n_embd)
        elif kind == K.FFN_DOWN:
            tensors[name] = _pad(w, a.n_embd, a.n_ff)
        else:
            raise UnsupportedModelError(f"{model.path.name}: tensor {name} has no alignment rule (only dense llama layers)")

    new_kv = {
        f"{arch}.embedding_length": (a.n_embd, gguf.GGUFValueType.UINT32),
        f"{arch}.feed_forward_length": (a.n_ff, gguf.GGUFValueType.UINT32),
        f"{arch}.attention.head_count": (a.n_head, gguf.GGUFValueType.UINT32),
        f"{arch}.attention.head_count_kv": (a.n_head_kv, gguf.GGUFValueType.UINT32),
        f"{arch}.attention.key_length": (a.head_dim, gguf.GGUFValueType.UINT32),
        f"{arch}.attention.value_length": (a.head_dim, gguf.GGUFValueType.UINT32),
        f"{arch}.attention.layer_norm_rms_epsilon": (eps * r, gguf.GGUFValueType.FLOAT32),
        gguf.Keys.General.FILE_TYPE: (int(gguf.LlamaFileType.ALL_F32), gguf.GGUFValueType.UINT32),
        Keys.Align.REAL_WEIGHTS: (model.n_real_weights, gguf.GGUFValueType.UINT64),
        Keys.Align.ORIGINAL_WIDTH: (g.n_embd, gguf.GGUFValueType.UINT32),
    }
    out = write_twin(model, out, tensors, changed=new_kv)
    stored = sum(t.size for t in tensors.values())
    return AlignReport(out, g, a, model.n_real_weights, stored)


def pad_columns(v: np.ndarray, aligned: GGUFModel, tensor: str) -> np.ndarray:
    """A per-input-column statistic of `tensor` in the unaligned model, for the aligned one:
    padded columns carry no activation, so they get zeros."""
    p = np.zeros(aligned.tensors[tensor].n_per_row, dtype=np.float32)
    p[: len(v)] = v
    return p


def pad_imatrix(data: dict[str, np.ndarray], aligned: GGUFModel) -> dict[str, np.ndarray]:
    """An imatrix of the unaligned model, for the aligned one."""
    return {name: pad_columns(v, aligned, name) for name, v in data.items()}

"""FFN split: an exact rewrite of a llama-family GGUF in which every feed-forward block is two
neuron groups, so that the two groups can be stored in two different ggml types.

A SwiGLU block is a sum over its neurons: neuron j owns row j of ffn_gate and ffn_up and column j
of ffn_down, so its neurons can be permuted, and cut into two groups whose outputs add, without
changing the function. A GGUF tensor has one type, so to give the groups two types they must be
two tensors that stock llama.cpp adds up. Its `granitemoe` architecture does exactly that (read in
the llama.cpp source llama-cpp-python 0.3.36 vendors, src/models/granite.cpp, build_layer_ffn):

    ffn_out = build_moe_ffn(x, router, up_exps, gate_exps, down_exps, …, SOFTMAX gating, norm_w)
            + build_ffn(x, up_shexp, gate_shexp, down_shexp, SILU, PAR)

- the shared expert (`ffn_*_shexp`) is an ordinary SwiGLU block: the first group;
- with one routed expert (expert_count = expert_used_count = 1) the softmax over one logit is
  exactly 1, weight normalisation divides by that 1, and expert_weights_scale is not read by
  granitemoe (0: no scaling), so the routed expert's output enters unscaled: the second group.
  The router's weights are never used for anything else; they are written as zeros;
- everything else is the llama graph: RMS norms, rotary embedding of type NORM (llama's, so the
  GGUF's permuted Q/K rows are read the same way), attention scale 1/sqrt(head_dim) when
  attention.scale is absent, no residual or embedding scale when those keys are absent, and the
  logits divided by logit_scale, a required key, written as 1.0.

llama.cpp reads the routed and shared widths as one value each for the whole model
(feed_forward_length, expert_shared_feed_forward_length), so every layer is split at the same
point; which neurons fall on each side is free per layer (`order`). Weights are written as F32,
the source's exact dequantization, ready for `windq export`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import gguf
import numpy as np

from windq.errors import InputError, UnsupportedModelError
from windq.keys import Keys
from windq.models.gguf_model import GGUFModel, tensor_kind
from windq.models.twin import write_twin

K = gguf.MODEL_TENSOR
SUPPORTED = ("llama",)
TARGET = gguf.MODEL_ARCH.GRANITE_MOE

# source FFN kind → (target kind of the first, salient group; of the second group)
_SPLIT = {
    K.FFN_GATE: (K.FFN_GATE_SHEXP, K.FFN_GATE_EXP),
    K.FFN_UP: (K.FFN_UP_SHEXP, K.FFN_UP_EXP),
    K.FFN_DOWN: (K.FFN_DOWN_SHEXP, K.FFN_DOWN_EXP),
}
_ROUTED = {routed for _, routed in _SPLIT.values()}


@dataclass(frozen=True)
class SplitReport:
    path: Path
    n_ff: int  # the source's feed-forward width
    salient: int  # neurons in the first group (the shared expert), in every layer


@dataclass(frozen=True)
class Part:
    """A tensor of the split model as a slice of a source tensor: the source's rows `rows` (or all)
    and columns `cols` (or all), in that order."""

    source: str
    rows: np.ndarray | None
    cols: np.ndarray | None

    def take(self, w: np.ndarray) -> np.ndarray:
        if self.rows is not None:
            w = w[self.rows, :]
        if self.cols is not None:
            w = w[:, self.cols]
        return np.ascontiguousarray(w)


def _name(kind: gguf.MODEL_TENSOR, layer: int) -> str:
    return gguf.TENSOR_NAMES[kind].format(bid=layer) + ".weight"


def _layer(name: str) -> int:
    return int(name.split(".")[1])


def split_parts(source_ffn: list[str], salient: int, order: Mapping[int, np.ndarray]) -> dict[str, Part]:
    """Every FFN tensor of the split model, from the source FFN tensors `source_ffn`: gate and up
    rows, and down columns, are neurons; the first `salient` of each layer's order form the shared
    expert, the rest the routed one."""
    parts: dict[str, Part] = {}
    for name in source_ffn:
        kind, layer = tensor_kind(name), _layer(name)
        first, second = order[layer][:salient], order[layer][salient:]
        shared, routed = _SPLIT[kind]
        if kind == K.FFN_DOWN:  # a neuron is a column: its input
            parts[_name(shared, layer)], parts[_name(routed, layer)] = Part(name, None, first), Part(name, None, second)
        else:  # a neuron is a row
            parts[_name(shared, layer)], parts[_name(routed, layer)] = Part(name, first, None), Part(name, second, None)
    return parts


def read_split(model: GGUFModel) -> tuple[int, dict[int, np.ndarray]]:
    """(salient width, per-layer neuron order) recorded in a split model."""
    salient = model.field(Keys.Split.SALIENT)
    if salient is None:
        raise InputError(f"{model.path.name}: not a model written by `windq split` (no {Keys.Split.SALIENT})")
    n_layer = int(model.arch_field("{arch}.block_count"))
    return int(salient), {i: np.asarray(model.field(Keys.Split.NEURONS.format(layer=i)), dtype=np.int64) for i in range(n_layer)}


def source_parts(model: GGUFModel) -> dict[str, Part]:
    """The split model's FFN tensors as slices of the source's, from what the file records."""
    salient, order = read_split(model)
    n_layer = len(order)
    source_ffn = [_name(k, i) for i in range(n_layer) for k in _SPLIT]
    return split_parts(source_ffn, salient, order)


def split_ffn_gguf(model: GGUFModel, out: str | Path, salient: int, order: Mapping[int, np.ndarray] | None = None) -> SplitReport:
    """Write `model` as granitemoe: in layer i, neurons order[i][:salient] form the first group (in
    that order), the rest the second. `order` defaults to the neurons' own order."""
    if model.architecture not in SUPPORTED:
        raise UnsupportedModelError(f"{model.path.name}: the FFN split is for {', '.join(SUPPORTED)} models, not {model.architecture!r}")
    arch = model.architecture
    n_ff = int(model.arch_field("{arch}.feed_forward_length"))
    n_layer = int(model.arch_field("{arch}.block_count"))
    if not 0 < salient < n_ff:
        raise InputError(f"salient width {salient}: must be between 1 and {n_ff - 1} (the FFN is {n_ff} wide)")
    order = {i: np.asarray((order or {}).get(i, np.arange(n_ff)), dtype=np.int64) for i in range(n_layer)}
    for i, p in order.items():
        if not np.array_equal(np.sort(p), np.arange(n_ff)):
            raise InputError(f"layer {i}: the neuron order is not a permutation of 0..{n_ff - 1}")

    ffn = [n for n in model.tensors if tensor_kind(n) in _SPLIT]
    parts = split_parts(ffn, salient, order)
    tensors: dict[str, np.ndarray] = {}
    for name, info in model.tensors.items():
        kind = tensor_kind(name)
        if kind in _SPLIT:
            continue
        if kind is None or kind not in gguf.MODEL_TENSORS[TARGET]:
            raise UnsupportedModelError(f"{model.path.name}: tensor {name} has no place in llama.cpp's {gguf.MODEL_ARCH_NAMES[TARGET]}")
        tensors[name] = model.dequantized(name) if len(info.shape) > 1 else np.asarray(model.raw(name), dtype=np.float32)
        if kind == K.FFN_NORM:  # the router of one expert sits beside it: never used, so zeros
            tensors[_name(K.FFN_GATE_INP, _layer(name))] = np.zeros((1, info.shape[0]), dtype=np.float32)
    for source in ffn:
        w = model.dequantized(source)  # once for both of its parts
        for name, part in parts.items():
            if part.source == source:
                cut = part.take(w)
                tensors[name] = cut[None] if tensor_kind(name) in _ROUTED else cut  # the routed expert: (1, rows, cols)

    target = gguf.MODEL_ARCH_NAMES[TARGET]
    new_kv = {
        f"{target}.feed_forward_length": (n_ff - salient, gguf.GGUFValueType.UINT32),
        f"{target}.expert_shared_feed_forward_length": (salient, gguf.GGUFValueType.UINT32),
        f"{target}.expert_count": (1, gguf.GGUFValueType.UINT32),
        f"{target}.expert_used_count": (1, gguf.GGUFValueType.UINT32),
        f"{target}.logit_scale": (1.0, gguf.GGUFValueType.FLOAT32),
        gguf.Keys.General.FILE_TYPE: (int(gguf.LlamaFileType.ALL_F32), gguf.GGUFValueType.UINT32),
        Keys.Split.SALIENT: (salient, gguf.GGUFValueType.UINT32),
    }
    neurons = {Keys.Split.NEURONS.format(layer=i): [int(j) for j in order[i]] for i in range(n_layer)}
    out = write_twin(model, out, tensors, changed=new_kv, source_of={n: p.source for n, p in parts.items()}, arrays=neurons, arch=target)
    return SplitReport(out, n_ff, salient)


def neuron_order(model: GGUFModel, imatrix: Mapping[str, np.ndarray]) -> dict[int, np.ndarray]:
    """Per layer, the FFN's neurons from most to least salient: neuron j's expected squared
    contribution to the block's output, E[h_j²]·‖W_down[:, j]‖², with E[h_j²] the imatrix of
    ffn_down's input column j (the activation that multiplies that column). Ties keep index order."""
    order: dict[int, np.ndarray] = {}
    for name in model.tensors:
        if tensor_kind(name) != K.FFN_DOWN:
            continue
        if name not in imatrix:
            raise InputError(f"the imatrix has no {name}: neurons cannot be ranked without it")
        w = model.dequantized(name)  # (n_embd, n_ff): a neuron is a column
        saliency = np.asarray(imatrix[name], dtype=np.float64) * np.einsum("ij,ij->j", w, w, dtype=np.float64)
        order[_layer(name)] = np.argsort(-saliency, kind="stable")
    return order

"""Calibration: run the model in torch on calibration text and collect, for every linear weight,
the statistics of the activations that multiply it.

The importance matrix is Σ x_j² per input column j (what llama-imatrix collects), saved in the
GGUF imatrix format. Alongside it windq keeps per-column mean |x| and max |x| (features for the
planner), the calibration tokens themselves, and two things the planner's predictor of real loss
needs:
- the Fisher information of every weight, as row and column marginals (`fisher_marginals`): how
  much the model's output distribution moves when that weight moves, which the imatrix (inputs
  only) cannot see;
- judge chunks: held-in tokens cut after the imatrix's, never used for the imatrix or the Fisher,
  on which the planner measures the real KL of its candidate plans.

Statistics are keyed by GGUF tensor name. The torch model is transformers' own GGUF load, and
what windq needs to know of an architecture is data (`ARCHITECTURES`), the rest taken from the
libraries that define it: tensor names from gguf-py's TensorNameMap, through transformers' map of
GGUF names to parameters (the one its loader filled the model with), and the weight transforms
from transformers' per-architecture GGUF tensor processors. Text is tokenized by llama.cpp from the
GGUF's own vocabulary, so calibration and evaluation see the same tokens.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping

import numpy as np

from windq import __version__
from windq.errors import CalibrationError, UnsupportedModelError
from windq.files import atomic_output, atomic_write_text, load_array, load_arrays
from windq.keys import CalibrationFiles
from windq.models.gguf_model import GGUFModel, tensor_kind
from windq.models.sources import Text
from windq.models.tokenizer import token_chunks
from windq.pipeline.imatrix import Imatrix, save_imatrix


@dataclass(frozen=True)
class Architecture:
    """A GGUF architecture windq runs in torch: llama.cpp's name for it (general.architecture, which
    alone decides the graph llama.cpp runs) and the transformers model_type whose forward is that
    graph. Anything else about it comes from gguf-py and transformers."""

    gguf_name: str
    model_type: str
    families: tuple[str, ...]  # the checkpoints llama.cpp's converter writes under this name

    def describe(self) -> str:
        return f"{self.gguf_name} ({', '.join(self.families)})"


# Each one is tested end to end on a synthetic model (tests/test_architectures.py), down to a KL of
# exactly 0 between the torch model and the fake-quantized one for the source plan. Mistral has no
# GGUF architecture of its own: llama.cpp's converter writes MistralForCausalLM as llama.
ARCHITECTURES = {
    a.gguf_name: a
    for a in (
        Architecture("llama", "llama", ("Llama", "Mistral")),
        Architecture("qwen2", "qwen2", ("Qwen2", "Qwen2.5")),
        Architecture("qwen3", "qwen3", ("Qwen3",)),
        Architecture("gemma3", "gemma3_text", ("Gemma 3",)),
        Architecture("gemma2", "gemma2", ("Gemma 2",)),
        Architecture("phi3", "phi3", ("Phi-3", "Phi-4")),
        # routed experts (3-D tensors, one imatrix per expert), no shared expert: Qwen3-30B-A3B's layout
        Architecture("qwen3moe", "qwen3_moe", ("Qwen3-MoE",)),
    )
}
SUPPORTED_ARCHITECTURES = tuple(ARCHITECTURES)


def architecture(model: GGUFModel) -> Architecture:
    """The model's entry in ARCHITECTURES; any other architecture is refused, never guessed at."""
    arch = ARCHITECTURES.get(model.architecture)
    if arch is None:
        raise UnsupportedModelError(
            f"{model.path.name}: architecture {model.architecture!r} is not supported for calibration "
            f"(supported: {'; '.join(a.describe() for a in ARCHITECTURES.values())})"
        )
    return arch


@dataclass(frozen=True)
class CalibrationConfig:
    tokens: int = 16384  # calibration tokens to run (rounded down to whole chunks)
    ctx: int = 512  # tokens per chunk, each chunk from an empty cache as llama-imatrix does
    fisher_chunks: int = 2  # chunks (of the imatrix's) the Fisher is estimated on: a backward pass each
    judge_chunks: int = 8  # chunks after the imatrix's, kept for measuring plans' real KL
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    # one module's weights in memory at a time, read from the GGUF as it runs (pipeline/streaming.py):
    # the same statistics, for a model whose float32 weights do not fit
    stream: bool = False


@dataclass
class ActivationStats:
    """Running per-column statistics of one weight's inputs."""

    sum_sq: np.ndarray
    sum_abs: np.ndarray
    max_abs: np.ndarray
    count: int = 0

    @classmethod
    def empty(cls, n: int) -> "ActivationStats":
        return cls(np.zeros(n, np.float64), np.zeros(n, np.float64), np.zeros(n, np.float32))

    def add(self, x: np.ndarray) -> None:
        x = x.reshape(-1, x.shape[-1])
        self.sum_sq += np.einsum("ij,ij->j", x, x, dtype=np.float64)
        ax = np.abs(x)
        self.sum_abs += ax.sum(axis=0, dtype=np.float64)
        np.maximum(self.max_abs, ax.max(axis=0), out=self.max_abs)
        self.count += x.shape[0]


@dataclass
class ExpertStats:
    """ActivationStats of each expert of an MoE tensor: llama-imatrix keeps every expert's sums and
    count apart (each over the tokens routed to it), and llama.cpp quantizes each expert's rows with
    its own. The planner's per-column features pool them."""

    experts: list[ActivationStats]

    @classmethod
    def empty(cls, n_experts: int, n: int) -> "ExpertStats":
        return cls([ActivationStats.empty(n) for _ in range(n_experts)])

    @property
    def sum_sq(self) -> np.ndarray:  # expert after expert, as the imatrix holds them
        return np.concatenate([e.sum_sq for e in self.experts])

    @property
    def count(self) -> np.ndarray:
        return np.array([e.count for e in self.experts], dtype=np.int64)

    @property
    def sum_abs(self) -> np.ndarray:
        return np.sum([e.sum_abs for e in self.experts], axis=0)

    @property
    def max_abs(self) -> np.ndarray:
        return np.max([e.max_abs for e in self.experts], axis=0)


@dataclass
class Calibration:
    stats: dict[str, ActivationStats | ExpertStats]
    tokens: np.ndarray  # the calibration tokens, in chunks of ctx
    meta: dict
    fisher: dict[str, "FisherStats"] = field(default_factory=dict)
    judge: np.ndarray | None = None  # held-in chunks the imatrix and Fisher never saw

    @property
    def imatrix(self) -> Imatrix:
        return Imatrix(
            sums={k: s.sum_sq for k, s in self.stats.items()},
            counts={k: s.count for k, s in self.stats.items()},
            datasets=[self.meta["text"]],
            chunk_count=self.meta["chunks"],
            chunk_size=self.meta["ctx"],
        )


# GGUF keys (under the architecture's prefix) that llama.cpp's graph reads and transformers' GGUF
# config table does not, for some architectures, each with the transformers config attribute it
# sets where that config has one. Without them transformers takes its own defaults, which are the
# real checkpoints' values only by luck (Qwen3's head width of 128, Gemma's 256, Gemma 2's caps of
# 50 and 30). llama.cpp scales Gemma's queries by 1/√key_length, as transformers does by
# 1/√query_pre_attn_scalar; at 27B it uses √(n_embd / n_head) instead, chosen by the layer count,
# which no key says and windq does not copy (Gemma 2/3 27B untested).
LLAMA_CPP_CONFIG = (
    ("attention.key_length", "head_dim"),
    ("attention.key_length", "query_pre_attn_scalar"),
    ("attn_logit_softcapping", "attn_logit_softcapping"),
    ("final_logit_softcapping", "final_logit_softcapping"),
    ("expert_feed_forward_length", "moe_intermediate_size"),  # Qwen3-MoE's expert width (its default 768)
)


def check_rope(model: GGUFModel) -> None:
    """Refuses the rotary variants llama.cpp runs from GGUF keys that transformers' GGUF loader does
    not read: scaled RoPE (linear, YaRN, LongRoPE: Gemma 3 4B and up, Qwen2.5 files written with
    YaRN) and rotation of only part of each head (Phi-4-mini). transformers would run plain RoPE
    over whole heads, in silence."""
    import gguf

    f = model.arch_field
    kind, factor = f(gguf.Keys.Rope.SCALING_TYPE), f(gguf.Keys.Rope.SCALING_FACTOR)
    if (kind or "none") != "none" or factor not in (None, 0.0, 1.0):
        raise UnsupportedModelError(
            f"{model.path.name}: rope scaling ({kind or 'unnamed'}, factor {factor}) is not supported: "
            "transformers' GGUF loader does not read it"
        )
    head = f("{arch}.attention.key_length") or f("{arch}.embedding_length") // f("{arch}.attention.head_count")
    n_rot = f(gguf.Keys.Rope.DIMENSION_COUNT)
    if n_rot is not None and n_rot != head:
        raise UnsupportedModelError(
            f"{model.path.name}: rotary embedding on {n_rot} of {head} channels per head is not supported: "
            "transformers' GGUF loader does not read it"
        )


def torch_config(model: GGUFModel, model_type: str):
    """transformers' config of the GGUF, as a `model_type` model, with what llama.cpp reads from
    the file that transformers' GGUF table does not (LLAMA_CPP_CONFIG)."""
    from transformers import AutoConfig

    where, name = str(model.path.parent), model.path.name
    with quiet_transformers(), this_gguf_read_once(model):
        config = AutoConfig.from_pretrained(where, gguf_file=name)
    if config.model_type != model_type:
        # transformers also reads general.name: a llama GGUF named "mistral" becomes a
        # MistralForCausalLM, with a 4096-token sliding window that llama.cpp's llama graph does
        # not have, and a weight map that gguf-py (no "mistral" architecture) cannot build.
        # llama.cpp picks its graph by general.architecture alone, and so does windq.
        kept = {k: v for k, v in config.to_dict().items() if k not in ("model_type", "architectures")}
        config = AutoConfig.for_model(model_type, **kept)
    for key, attr in LLAMA_CPP_CONFIG:
        value = model.arch_field("{arch}." + key)
        if value is not None and hasattr(config, attr):
            setattr(config, attr, value)
    if hasattr(config, "head_dim") and model.arch_field("{arch}.attention.key_length") is None:
        # llama.cpp's head width when the file states none; transformers' default may differ (Qwen3's is 128)
        config.head_dim = config.hidden_size // config.num_attention_heads
    return config


def load_torch_model(model: GGUFModel):
    """The GGUF as a float32 transformers model (dequantized by gguf-py inside transformers), checked
    to hold every tensor of the file and nothing that is not in it."""
    arch = architecture(model)
    check_rope(model)
    import torch
    from transformers import AutoModelForCausalLM

    config = torch_config(model, arch.model_type)
    with quiet_transformers(), cached_tensor_name_maps(), this_gguf_read_once(model):
        m = AutoModelForCausalLM.from_pretrained(
            str(model.path.parent), gguf_file=model.path.name, config=config, dtype=torch.float32
        )
    m.eval()
    parameter_slots(model, m)  # refuses a file and a model that do not hold the same weights
    return m


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers silent for the block (library code must not print), then as it was: its log
    level, its progress-bar switch, and the GGUF loader's own tqdm (which ignores that switch, so
    it is swapped for a pass-through)."""
    import transformers.modeling_gguf_pytorch_utils as gguf_loader
    from transformers.utils import logging as hf_logging

    level, bars, loader_tqdm = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled(), gguf_loader.tqdm
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    gguf_loader.tqdm = lambda it, **_: it
    try:
        yield
    finally:
        gguf_loader.tqdm = loader_tqdm
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


@contextmanager
def cached_tensor_name_maps() -> Iterator[None]:
    """gguf-py's `get_tensor_name_map` memoized for the block, then as it was. transformers' GGUF
    loader asks for the map once per module it walks (1,588 times for the 135M default, 4 walks),
    and every call builds gguf-py's whole table of tensor names anew: profiled, 27 of the 30 s
    that loading the default into torch took. The map is only read, so one per (architecture,
    depth) serves every call."""
    import gguf

    original = gguf.get_tensor_name_map
    gguf.get_tensor_name_map = functools.cache(original)
    try:
        yield
    finally:
        gguf.get_tensor_name_map = original


@contextmanager
def this_gguf_read_once(model: GGUFModel) -> Iterator[None]:
    """gguf-py's reader of `model`'s file, already open, handed to transformers for the block
    instead of a new one. transformers' GGUF loader opens the file anew for the config and again
    for the weights, and gguf-py parses the metadata element by element: 8 s a time for the
    default model's 49,152-token vocabulary and merges (profiled: the two readers, 17 of the 34 s
    of loading it). The reader is only read from; other paths get a reader of their own."""
    import gguf

    original = gguf.GGUFReader

    def reader(path, *args, **kwargs):
        if not args and not kwargs and Path(path).resolve() == model.path.resolve():
            return model.reader
        return original(path, *args, **kwargs)

    gguf.GGUFReader = reader
    try:
        yield
    finally:
        gguf.GGUFReader = original


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op thread count set for the block, then restored."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def weight_processor(model: GGUFModel, torch_model):
    """transformers' tensor processor for the model's architecture, the one its GGUF loader ran:
    `.process(weights, name).weights` turns a GGUF tensor into the torch parameter (llama's undoes
    llama.cpp's rotary permutation of Q and K rows; Gemma's takes off the 1 that llama.cpp's
    converter added to every norm, never to a planned tensor; qwen2's and qwen3's, the default one,
    change nothing)."""
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    # keyed by general.architecture, as transformers' loader keys it; its config is the model's
    return TENSOR_PROCESSORS.get(model.architecture, TensorProcessor)(config=torch_model.config.to_dict())


@dataclass(frozen=True, eq=False)  # compared by identity: its field is a tensor
class Slot:
    """Where a GGUF tensor lives in transformers' model: a whole parameter, or a part of one
    (transformers' MoE models hold a layer's gate and up experts in one parameter)."""

    param: object  # torch.nn.Parameter
    part: tuple[int, int, int] | None = None  # (dim, start, length) of the parameter the tensor fills

    def of(self, t):
        """The tensor's part of `t` (the parameter, or its data or gradient), a view."""
        return t if self.part is None else t.narrow(*self.part)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.of(self.param).shape)


def parameter_slots(model: GGUFModel, torch_model) -> dict[str, Slot]:
    """Every GGUF tensor → where it lives in the torch model, through transformers' own map of GGUF
    names to parameters (gguf-py's TensorNameMap for the model's type).

    transformers' loader skips a GGUF tensor it has no place for and leaves a parameter the file
    lacks at its initial value, both in silence; here either is refused. A tied output head is the
    embedding's own parameter, so it maps to token_embd. Where transformers' tensor processor fills
    a parameter itself (MoE experts, keyed without ".weight"), the part each tensor fills is read
    off the processor by running it on a small probe, as its row order is (`hf_row_order`)."""
    from transformers.modeling_gguf_pytorch_utils import get_gguf_hf_weights_map

    processor = weight_processor(model, torch_model)
    with cached_tensor_name_maps():
        hf_names = get_gguf_hf_weights_map(torch_model, processor)
    params = dict(torch_model.named_parameters())
    out: dict[str, Slot] = {}
    parts: dict[str, list] = {}  # parameter → the parts of it the file's tensors fill
    for tensor in model.tensors:
        hf, part = hf_names.get(tensor), None
        if hf is None and tensor.endswith(".weight") and tensor.removesuffix(".weight") in hf_names:
            hf = hf_names[tensor.removesuffix(".weight")]
            if hf in params:
                part = _part_filled(model, processor, tensor, hf, tuple(params[hf].shape))
        if hf is None or hf not in params:
            raise UnsupportedModelError(
                f"{model.path.name}: tensor {tensor} has no place in transformers' {type(torch_model).__name__}, "
                f"which would run without it; this {model.architecture} variant is not supported"
            )
        out[tensor] = Slot(params[hf], part)
        parts.setdefault(hf, []).append(part)
    missing = [n for n in params if n not in parts]
    if missing:
        raise UnsupportedModelError(
            f"{model.path.name}: transformers' {type(torch_model).__name__} has {missing[0]} ({len(missing)} such), "
            f"which no tensor of the file fills; this {model.architecture} variant is not supported"
        )
    for name, got in parts.items():
        if not _tiles(got, params[name].shape):
            raise UnsupportedModelError(
                f"{model.path.name}: {len(got)} tensors of the file fill transformers' {name} other than once each; "
                f"this {model.architecture} variant is not supported"
            )
    return out


def _tiles(parts: list, shape) -> bool:
    """Whether the parts fill a parameter of `shape` exactly once: one whole, or slices of one
    dimension end to end."""
    if parts == [None]:
        return True
    if None in parts or len({dim for dim, _, _ in parts}) != 1:
        return False
    end = 0
    for _, start, length in sorted(parts, key=lambda p: p[1]):
        if start != end:
            return False
        end += length
    return end == shape[parts[0][0]]


def _part_filled(model: GGUFModel, processor, tensor: str, hf: str, shape: tuple[int, ...]) -> tuple[int, int, int] | None:
    """The part of parameter `hf` (of `shape`) that transformers' processor fills with `tensor`:
    None for all of it, else (dim, start, length). The processor is run on a probe of the tensor's
    rank, 2 wide in every dimension, numbered; where the numbers land, scaled to the real shape,
    is the part. A processor that does anything but place the tensor whole is refused."""
    import torch

    n_dims = len(model.tensors[tensor].shape)
    probe = np.arange(1, 2**n_dims + 1, dtype=np.float32).reshape((2,) * n_dims)
    parsed: dict = {"tensors": {}}
    processor.process(probe, tensor, tensor_key_mapping={tensor.removesuffix(".weight"): hf}, parsed_parameters=parsed)
    got = parsed["tensors"].get(hf)
    if got is not None and got.shape == probe.shape and torch.equal(got, torch.from_numpy(probe)):
        return None
    if got is not None and got.dim() == n_dims:
        for dim in range(n_dims):
            scale, rest = divmod(shape[dim], got.shape[dim])
            for start in range(0, got.shape[dim] - 1, 2):
                if not rest and torch.equal(got.narrow(dim, start, 2), torch.from_numpy(probe)):
                    return dim, start * scale, 2 * scale
    raise UnsupportedModelError(f"transformers' {type(processor).__name__} does more than place {tensor} in {hf}")


def module_to_tensor(model: GGUFModel, torch_model, slots: Mapping[str, Slot] | None = None) -> dict[str, str]:
    """HF nn.Linear module name → the GGUF weight it multiplies by (token_embd for a tied head: its
    inputs are what that matrix sees on its way out). `slots`: parameter_slots', if at hand."""
    import torch

    slots = parameter_slots(model, torch_model) if slots is None else slots
    by_param = {id(s.param): t for t, s in slots.items() if s.part is None}
    return {
        name: by_param[id(mod.weight)] for name, mod in torch_model.named_modules() if isinstance(mod, torch.nn.Linear)
    }


def tensor_params(model: GGUFModel, torch_model) -> dict[str, Slot]:
    """GGUF weight name → where the torch model holds it, for every tensor a plan may change."""
    planned = {t.name for t in model.quantizable()}
    return {t: s for t, s in parameter_slots(model, torch_model).items() if t in planned}


def hf_row_order(processor, tensor: str, rows: int) -> np.ndarray:
    """[k]: the GGUF row that HF's row k of `tensor` is (only llama's Q and K are permuted)."""
    index = np.arange(rows, dtype=np.float32)[:, None]
    order = np.asarray(processor.process(index, tensor).weights).reshape(-1)
    if order.shape != (rows,) or not np.array_equal(np.sort(order), np.arange(rows)):
        # a processor that changes values, not only the order of rows, has no row order to undo
        raise UnsupportedModelError(f"transformers' {type(processor).__name__} does not only reorder the rows of {tensor}")
    return order.astype(np.int64)


@dataclass
class FisherStats:
    """Row and column sums of one weight's diagonal Fisher information, F_ij = E[(∂L/∂W_ij)²] per
    sequence, L the log-likelihood of labels sampled from the model itself (so E is the true Fisher,
    whose quadratic form is the second-order KL). Rows in GGUF order."""

    rows: np.ndarray
    cols: np.ndarray


def fisher_marginals(
    model: GGUFModel, torch_model, tokens: np.ndarray, *, seed: int = 0, progress: Callable[[int, int], None] | None = None
) -> dict[str, FisherStats]:
    """The diagonal Fisher of every planned weight, per sequence, averaged over `tokens`' chunks,
    kept as row and column marginals (F ≈ r cᵀ / Σr: the full diagonal is as big as the model).

    KL(p ‖ p_δ) ≈ ½ δᵀ F δ for a small weight perturbation δ; for a sequence of T tokens this is the
    KL summed over its positions, so the per-token KL is that ÷ T (sensitivity.py uses it)."""
    import torch

    slots = tensor_params(model, torch_model)
    for p in torch_model.parameters():
        p.requires_grad_(False)
    for s in slots.values():
        s.param.requires_grad_(True)
    gen = torch.Generator().manual_seed(seed)
    # rows as ggml counts them (an MoE tensor's: every expert's, expert after expert)
    sums = {t: (np.zeros(int(np.prod(s.shape[:-1]))), np.zeros(s.shape[-1])) for t, s in slots.items()}
    n = len(tokens)
    try:
        for i in range(n):
            torch_model.zero_grad(set_to_none=True)
            sampled_nll(torch_model(torch.from_numpy(tokens[i : i + 1]), use_cache=False).logits, gen).backward()
            for t, s in slots.items():
                g2 = s.of(s.param.grad).double().square().reshape(-1, s.shape[-1])  # tied parameters share one .grad
                sums[t][0][:] += g2.sum(1).numpy()
                sums[t][1][:] += g2.sum(0).numpy()
            if progress:
                progress(i + 1, n)
    finally:
        torch_model.zero_grad(set_to_none=True)
        for p in torch_model.parameters():
            p.requires_grad_(False)
    return fisher_in_gguf_order(weight_processor(model, torch_model), sums, n)


def streamed_fisher_marginals(
    model: GGUFModel, sm, tokens: np.ndarray, *, seed: int = 0, progress: Callable[[int, int], None] | None = None
) -> dict[str, FisherStats]:
    """`fisher_marginals` on a StreamedModel: the same labels, the same sums, one module's weights
    in memory at a time."""
    import torch

    from windq.pipeline.streaming import streamed_fisher

    gen = torch.Generator().manual_seed(seed)
    n = len(tokens)
    with streamed_fisher(sm, {t.name for t in model.quantizable()}) as sums:
        for i in range(n):
            sampled_nll(sm(torch.from_numpy(tokens[i : i + 1])).logits, gen).backward()
            if progress:
                progress(i + 1, n)
    return fisher_in_gguf_order(sm.processor, sums, n)


def sampled_nll(logits, gen):
    """−log p of labels drawn from the model itself, summed over the sequence: its gradient's square
    estimates the true Fisher."""
    import torch

    logp = torch.log_softmax(logits.float(), dim=-1)
    labels = torch.multinomial(logp.detach().exp().view(-1, logp.shape[-1]), 1, generator=gen)
    return -logp.view(-1, logp.shape[-1]).gather(1, labels).sum()


def fisher_in_gguf_order(processor, sums: Mapping[str, tuple[np.ndarray, np.ndarray]], n: int) -> dict[str, FisherStats]:
    """Per-sequence means of squared-gradient row and column sums, rows put back in GGUF order."""
    out = {}
    for t, (r, c) in sums.items():
        order = hf_row_order(processor, t, len(r))
        rows = np.empty_like(r)
        rows[order] = r
        out[t] = FisherStats(rows=(rows / n).astype(np.float32), cols=(c / n).astype(np.float32))
    return out


@contextmanager
def observe_linear_inputs(torch_model, names: dict[str, str], stats: dict[str, ActivationStats]) -> Iterator[None]:
    """Attach forward pre-hooks that feed every mapped Linear's input into `stats`; detach after."""
    handles = []
    for mod_name, mod in torch_model.named_modules():
        if mod_name not in names:
            continue
        tensor = names[mod_name]
        stats.setdefault(tensor, ActivationStats.empty(mod.in_features))

        def hook(_mod, args, tensor=tensor):
            stats[tensor].add(args[0].detach().float().numpy())

        handles.append(mod.register_forward_pre_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# The routed experts' tensors, by gguf kind: transformers' MoE layers hold them outside nn.Linear,
# so their inputs are taken by `observe_expert_inputs` instead of a hook per matrix.
def _expert_roles():
    import gguf

    T = gguf.MODEL_TENSOR
    return {T.FFN_GATE_EXP: "gate", T.FFN_UP_EXP: "up", T.FFN_DOWN_EXP: "down"}


def expert_modules(model: GGUFModel, torch_model, slots: Mapping[str, Slot] | None = None) -> dict[str, dict[str, tuple[str, Slot]]]:
    """HF module name → {"gate"|"up"|"down": (GGUF tensor, slot)} for every module holding a layer's
    routed experts (transformers' `…Experts`: 3-D parameters, experts first)."""
    slots = parameter_slots(model, torch_model) if slots is None else slots
    owner = {id(p): name for name, mod in torch_model.named_modules() for p in mod._parameters.values() if p is not None}
    out: dict[str, dict[str, tuple[str, Slot]]] = {}
    roles_of = _expert_roles()
    for tensor, slot in slots.items():
        role = roles_of.get(tensor_kind(tensor))
        if role is not None:
            out.setdefault(owner[id(slot.param)], {})[role] = (tensor, slot)
    for name, roles in out.items():
        if set(roles) != set(roles_of.values()) or not callable(getattr(torch_model.get_submodule(name), "act_fn", None)):
            raise UnsupportedModelError(f"{model.path.name}: {name} is not a gated FFN of experts (gate, up, down, act_fn); not supported")
    return out


@contextmanager
def observe_expert_inputs(torch_model, experts: dict[str, dict[str, tuple[str, Slot]]], stats: dict) -> Iterator[None]:
    """Feed every expert's inputs into `stats`, per expert, as llama-imatrix collects them from
    llama.cpp's MUL_MAT_ID: gate and up see the tokens routed to the expert, down sees
    act(gate x) · up x of the same tokens. transformers' experts module is called with the layer's
    hidden states and each token's chosen experts; a pre-hook takes both and computes down's input
    from the expert's own weights (tested against the module's own matmuls)."""
    import torch

    handles = []
    for mod_name, roles in experts.items():
        mod = torch_model.get_submodule(mod_name)
        (gate_t, gate), (up_t, up), (down_t, _) = roles["gate"], roles["up"], roles["down"]
        n_experts, n_ff, n_embd = gate.shape
        for t, n in ((gate_t, n_embd), (up_t, n_embd), (down_t, n_ff)):
            stats.setdefault(t, ExpertStats.empty(n_experts, n))

        def hook(mod, args, kwargs, gate=gate, up=up, names=(gate_t, up_t, down_t)):
            x = args[0] if args else kwargs["hidden_states"]
            chosen = args[1] if len(args) > 1 else kwargs["top_k_index"]
            x = x.detach().float().reshape(-1, x.shape[-1])
            chosen = chosen.reshape(x.shape[0], -1)
            wg, wu = gate.of(gate.param).detach(), up.of(up.param).detach()
            for e in range(wg.shape[0]):
                xe = x[(chosen == e).any(-1)]
                if len(xe):
                    h = mod.act_fn(torch.nn.functional.linear(xe, wg[e])) * torch.nn.functional.linear(xe, wu[e])
                    for t, v in zip(names, (xe, xe, h)):
                        stats[t].experts[e].add(v.numpy())

        handles.append(mod.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def calibrate(
    model: GGUFModel,
    text: Text,
    cfg: CalibrationConfig = CalibrationConfig(),
    progress: Callable[[int, int], None] | None = None,
) -> Calibration:
    import torch

    architecture(model)  # refused before llama.cpp tokenizes anything
    t0 = time.perf_counter()
    want = cfg.tokens // cfg.ctx
    every = token_chunks(
        model.path, text.content, cfg.ctx, max_chunks=want + cfg.judge_chunks, min_chunks=1 + cfg.judge_chunks, text_name=text.name
    )
    # the judge chunks come off the end: the imatrix takes what is left, up to `want`
    tokens, judge = every[: len(every) - cfg.judge_chunks], every[len(every) - cfg.judge_chunks :]
    n_chunks = len(tokens)

    if cfg.stream:
        from windq.pipeline.streaming import StreamedModel

        sm = StreamedModel(model)
        tm, fisher_of = sm.tm, streamed_fisher_marginals
    else:
        tm = load_torch_model(model)
        sm, fisher_of = tm, fisher_marginals
    slots = parameter_slots(model, tm)
    names = module_to_tensor(model, tm, slots)
    # The imatrix needs the output head's input, not its output: the decoder alone runs, and its
    # last hidden state (after the final norm) is what the head would have been given. The head's
    # logits were a fifth of the default model's work per token and 512 × vocabulary floats a chunk.
    decoder, head = tm.get_decoder(), tm.get_output_embeddings()
    head_module = next(n for n, mod in tm.named_modules() if mod is head)
    stats: dict[str, ActivationStats | ExpertStats] = {}
    with (
        torch_threads(cfg.threads), torch.inference_mode(),
        observe_linear_inputs(tm, {n: t for n, t in names.items() if n != head_module}, stats),
        observe_expert_inputs(tm, expert_modules(model, tm, slots), stats),
    ):  # fmt: skip
        head_stats = stats.setdefault(names[head_module], ActivationStats.empty(head.in_features))
        for i in range(n_chunks):
            hidden = decoder(torch.from_numpy(tokens[i : i + 1]), use_cache=False).last_hidden_state
            head_stats.add(hidden.float().numpy())
            if progress:
                progress(i + 1, n_chunks)
    # an expert no token was routed to has no importance to give llama.cpp's quantizer (llama-quantize
    # would put ones there in silence): refused now, not when a plan needs it
    unseen = [(t, e) for t, s in stats.items() if isinstance(s, ExpertStats) for e, c in enumerate(s.count) if c == 0]
    if unseen:
        raise CalibrationError(
            f"{model.path.name}: expert {unseen[0][1]} of {unseen[0][0]} was routed none of the {int(tokens.size)} "
            f"calibration tokens ({len(unseen)} such); calibrate on more text (--tokens)"
        )
    n_fisher = min(cfg.fisher_chunks, n_chunks)
    with torch_threads(cfg.threads):
        fisher = fisher_of(
            model, sm, tokens[:n_fisher], progress=(lambda d, t: progress(n_chunks + d, n_chunks + n_fisher)) if progress else None
        )
    meta = {
        "windq": __version__,
        "model": model.path.name,
        "model_sha256": model.sha256,
        "architecture": model.architecture,
        "text": text.name,
        "text_sha256": text.sha256,
        "ctx": cfg.ctx,
        "chunks": n_chunks,
        "tokens": int(tokens.size),
        "fisher_chunks": n_fisher,
        "judge_chunks": len(judge),
        "streamed": cfg.stream,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    return Calibration(stats=stats, tokens=tokens, meta=meta, fisher=fisher, judge=judge)


def save_calibration(cal: Calibration, outdir: str | Path, architecture: str | None = None) -> Path:
    """The calibration folder; the imatrix names the calibrated model's architecture, as
    llama-imatrix's does, unless `architecture` says otherwise."""
    outdir = Path(outdir)
    save_imatrix(cal.imatrix, outdir / CalibrationFiles.IMATRIX, architecture or cal.meta.get("architecture", "llama"))
    with atomic_output(outdir / CalibrationFiles.ACTIVATIONS) as tmp:
        with open(tmp, "wb") as f:
            np.savez(
                f,
                # per column; an MoE tensor's pooled over its experts
                **{f"{k}|abs_mean": (s.sum_abs / max(int(np.sum(s.count)), 1)).astype(np.float32) for k, s in cal.stats.items()},
                **{f"{k}|abs_max": s.max_abs for k, s in cal.stats.items()},
            )
    with atomic_output(outdir / CalibrationFiles.TOKENS) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, cal.tokens.astype(np.int32))
    if cal.judge is not None:
        with atomic_output(outdir / CalibrationFiles.JUDGE_TOKENS) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, cal.judge.astype(np.int32))
    save_fisher(cal.fisher, outdir / CalibrationFiles.FISHER)
    atomic_write_text(outdir / CalibrationFiles.META, json.dumps(cal.meta, indent=1) + "\n")
    return outdir


def load_activation_stats(statsdir: str | Path) -> dict[str, dict[str, np.ndarray]]:
    """tensor → {"abs_mean": …, "abs_max": …} from a calibration folder."""
    out: dict[str, dict[str, np.ndarray]] = {}
    path = Path(statsdir) / CalibrationFiles.ACTIVATIONS
    if not path.is_file():
        raise CalibrationError(f"{statsdir}: no {CalibrationFiles.ACTIVATIONS}; run `windq calibrate` first")
    for key, value in load_arrays(path).items():
        tensor, stat = key.split("|")
        out.setdefault(tensor, {})[stat] = value
    return out


def save_fisher(fisher: Mapping[str, FisherStats], path: str | Path) -> Path:
    with atomic_output(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **{f"{k}|rows": s.rows for k, s in fisher.items()}, **{f"{k}|cols": s.cols for k, s in fisher.items()})
    return Path(path)


def _fisher_path(statsdir: str | Path) -> Path:
    path = Path(statsdir) / CalibrationFiles.FISHER
    if not path.is_file():
        raise CalibrationError(f"{statsdir}: no {CalibrationFiles.FISHER} (made by an older windq); run `windq calibrate` again")
    return path


def fisher_sha256(statsdir: str | Path) -> str:
    """The Fisher file's hash, part of the tables' cache key."""
    return hashlib.sha256(_fisher_path(statsdir).read_bytes()).hexdigest()


def load_fisher(statsdir: str | Path) -> dict[str, FisherStats]:
    path = _fisher_path(statsdir)
    parts: dict[str, dict[str, np.ndarray]] = {}
    for key, value in load_arrays(path).items():
        tensor, part = key.split("|")
        parts.setdefault(tensor, {})[part] = value
    return {t: FisherStats(rows=p["rows"], cols=p["cols"]) for t, p in parts.items()}


def tokens_per_sequence(statsdir: str | Path) -> int:
    """The calibration's chunk length (ctx): the Fisher is per sequence of this many tokens."""
    return int(json.loads((Path(statsdir) / CalibrationFiles.META).read_text())["ctx"])


def load_judge_tokens(statsdir: str | Path) -> np.ndarray:
    """Held-in chunks the imatrix was not computed from: where plans' real KL is measured."""
    path = Path(statsdir) / CalibrationFiles.JUDGE_TOKENS
    if not path.is_file():
        raise CalibrationError(f"{statsdir}: no {CalibrationFiles.JUDGE_TOKENS} (made by an older windq); run `windq calibrate` again")
    return load_array(path)


def load_tokens(statsdir: str | Path) -> np.ndarray:
    path = Path(statsdir) / CalibrationFiles.TOKENS
    if not path.is_file():
        raise CalibrationError(f"{statsdir}: no {CalibrationFiles.TOKENS}; run `windq calibrate` first")
    return load_array(path)


def pad_calibration(src_dir: str | Path, dst_dir: str | Path, aligned: GGUFModel) -> Path:
    """A calibration folder of the unaligned model, for its aligned twin (`windq align`).

    The aligned model computes the same function and its padded channels are always exactly zero,
    so its statistics are the unaligned ones with zeros appended: no second calibration run.
    """
    from windq.models.align import pad_columns, pad_imatrix
    from windq.pipeline.imatrix import read_imatrix

    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    im = read_imatrix(src_dir / CalibrationFiles.IMATRIX)
    padded = Imatrix(
        sums=pad_imatrix(im.sums, aligned), counts=dict(im.counts), datasets=list(im.datasets), chunk_count=im.chunk_count,
        chunk_size=im.chunk_size,
    )  # fmt: skip
    save_imatrix(padded, dst_dir / CalibrationFiles.IMATRIX, aligned.architecture)
    acts = {  # keys are "tensor|statistic"
        key: pad_columns(value, aligned, key.split("|")[0]) for key, value in load_arrays(src_dir / CalibrationFiles.ACTIVATIONS).items()
    }
    with atomic_output(dst_dir / CalibrationFiles.ACTIVATIONS) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **acts)
    with atomic_output(dst_dir / CalibrationFiles.TOKENS) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, load_tokens(src_dir))
    with atomic_output(dst_dir / CalibrationFiles.JUDGE_TOKENS) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, load_judge_tokens(src_dir))
    # align.py pads rows and columns at the end; padded weights see no input and feed nothing
    # downstream, so their Fisher is zero
    save_fisher(
        {
            t: FisherStats(rows=_zero_pad(f.rows, aligned.tensors[t].n_elements // aligned.tensors[t].n_per_row), cols=pad_columns(f.cols, aligned, t))
            for t, f in load_fisher(src_dir).items()
        },
        dst_dir / CalibrationFiles.FISHER,
    )
    meta = json.loads((src_dir / CalibrationFiles.META).read_text())
    meta.update(
        model=aligned.path.name, model_sha256=aligned.sha256, padded_from=str(src_dir), padded_from_imatrix_sha256=im.sha256()
    )
    atomic_write_text(dst_dir / CalibrationFiles.META, json.dumps(meta, indent=1) + "\n")
    return dst_dir


def _zero_pad(v: np.ndarray, n: int) -> np.ndarray:
    out = np.zeros(n, dtype=np.float32)
    out[: len(v)] = v
    return out

"""The one registry of quant types windq plans with.

Sizes come from gguf-py's GGML_QUANT_SIZES and are checked against libggml at first use, so a
version skew between gguf and llama-cpp-python fails loudly instead of mis-counting bits; a
tensor's bytes are libggml's `ggml_row_size`. Nothing here copies a size by hand. Building the
registry costs only these cheap C calls (no quantizer runs), so a command starts at once.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import gguf
import numpy as np

from windq import ggml
from windq.errors import IllegalTypeError, WindqError

# Types a weight can be stored in. Left out on purpose: Q8_1 and Q8_K (dot-product intermediates,
# not storage formats), TQ1_0/TQ2_0 (ternary models only), MXFP4/NVFP4/Q1_0 (no CPU quantizer
# path in every llama.cpp build), and the integer types.
OFFERED = (
    "F32", "F16", "BF16",
    "Q8_0", "Q6_K", "Q5_K", "Q5_1", "Q5_0", "Q4_K", "Q4_1", "Q4_0", "IQ4_XS", "IQ4_NL",
    "Q3_K", "IQ3_S", "IQ3_XXS", "Q2_K", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S",
)  # fmt: skip

# llama.cpp refuses these without an imatrix for any tensor but token_embd/output
# (tensor_requires_imatrix in src/llama-quant.cpp), a wider set than ggml_quantize_requires_imatrix.
_LLAMA_NEEDS_IMATRIX = frozenset({"IQ3_XXS", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_M", "IQ1_S"})
_LLAMA_IMATRIX_EXEMPT = ("token_embd.weight", "output.weight")

# Types whose grid has no zero point: a zero 32-column stretch inside a live 256-block does not
# decode to exact zeros (the IQ1/IQ2/IQ3 lattices). K, legacy, IQ4 and float types give such a
# stretch a zero scale or level. Declared here because finding out means running the quantizers
# (initialising the IQ grids took 12-19 s); tests/test_registry.py probes libggml and checks it.
_LOSES_ZERO_SUBBLOCKS = frozenset({"IQ3_S", "IQ3_XXS", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S"})


@dataclass(frozen=True)
class QuantType:
    name: str
    ggml_type: gguf.GGMLQuantizationType
    block_size: int  # weights per block, along a row
    type_size: int  # bytes per block
    ggml_requires_imatrix: bool  # ggml aborts the process when asked to write it without one
    llama_requires_imatrix: bool  # llama.cpp refuses it without one, except on token_embd/output
    keeps_zero_subblocks: bool  # a zero 32-column stretch inside a live block decodes to exact zeros

    @property
    def id(self) -> int:
        return int(self.ggml_type)

    @property
    def bits_per_weight(self) -> float:
        return self.type_size * 8 / self.block_size

    @property
    def is_quantized(self) -> bool:
        return self.block_size > 1

    @property
    def requires_imatrix(self) -> bool:
        """Needs importance data on (almost) every tensor: not a type to plan without an imatrix."""
        return self.ggml_requires_imatrix or self.llama_requires_imatrix

    def needs_imatrix(self, tensor: str) -> bool:
        """Whether writing `tensor` as this type needs importance data for that tensor."""
        return self.ggml_requires_imatrix or (self.llama_requires_imatrix and tensor not in _LLAMA_IMATRIX_EXEMPT)

    def is_legal(self, tensor: str, n_per_row: int, *, has_imatrix: bool, zero_padded: bool = False) -> bool:
        """`zero_padded`: the tensor carries alignment padding whose zeros must survive (see models/align.py)."""
        return (
            self.fits_row(n_per_row)
            and (has_imatrix or not self.needs_imatrix(tensor))
            and (self.keeps_zero_subblocks or not zero_padded)
        )

    def check(self, tensor: str, n_per_row: int, *, has_imatrix: bool, zero_padded: bool = False) -> None:
        self.check_row(n_per_row, tensor)
        if zero_padded and not self.keeps_zero_subblocks:
            raise IllegalTypeError(
                f"{tensor}: {self.name} turns the alignment padding into nonzero values (its grid has no zero), "
                f"which would change the aligned model's output; pick a K, legacy or IQ4 type"
            )
        if self.needs_imatrix(tensor) and not has_imatrix:
            raise IllegalTypeError(
                f"{tensor}: {self.name} can only be written with importance data for this tensor; "
                f"pass --imatrix FILE holding {tensor}"
            )

    def fits_row(self, n_per_row: int) -> bool:
        """ggml blocks run along a row; a row must hold a whole number of blocks."""
        return n_per_row % self.block_size == 0

    def check_row(self, n_per_row: int, tensor: str) -> None:
        if not self.fits_row(n_per_row):
            raise IllegalTypeError(
                f"{tensor}: {self.name} needs rows that are a multiple of {self.block_size} weights, "
                f"this tensor's rows have {n_per_row} (pick another type, or align the model with `windq align`)"
            )

    def nbytes(self, shape: tuple[int, ...]) -> int:
        """Exact bytes of a tensor of this type (libggml's row size × rows); shape is ggml order."""
        nrows = 1
        for d in shape[1:]:
            nrows *= d
        return ggml.row_size(self.id, shape[0]) * nrows

    def __str__(self) -> str:
        return self.name


@functools.cache
def registry() -> dict[str, QuantType]:
    types = {}
    for name in OFFERED:
        gtype = gguf.GGMLQuantizationType[name]
        block, size = gguf.GGML_QUANT_SIZES[gtype]
        if (ggml.block_size(gtype), ggml.type_size(gtype)) != (block, size):
            raise WindqError(
                f"gguf and libggml disagree on {name} (gguf: {block}/{size}, ggml: "
                f"{ggml.block_size(gtype)}/{ggml.type_size(gtype)}); reinstall matching versions"
            )
        types[name] = QuantType(
            name, gtype, block, size, ggml.requires_imatrix(gtype), name in _LLAMA_NEEDS_IMATRIX, name not in _LOSES_ZERO_SUBBLOCKS
        )
    return types


def keeps_zero_subblocks_probe(gtype: gguf.GGMLQuantizationType) -> bool:
    """What libggml does (the test of the declared data above): quantize rows whose last 32-column
    stretches are zero inside a live 256-block and see whether those zeros come back."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 512)).astype(np.float32)
    w[:, 448:] = 0
    importance = np.where(np.arange(512) < 448, 1.0, 0.0).astype(np.float32)
    q = ggml.round_trip(int(gtype), w, importance)
    return bool((q[:, 448:] == 0).all())


def get(name: str) -> QuantType:
    try:
        return registry()[name.upper()]
    except KeyError:
        raise WindqError(f"unknown quant type {name!r}; windq offers: {', '.join(OFFERED)}") from None


def legal_types(
    tensor: str, n_per_row: int, *, has_imatrix: bool, zero_padded: bool = False, allowed: tuple[str, ...] | None = None
) -> list[QuantType]:
    """Types that can be written for a tensor, cheapest first. `has_imatrix`: importance data for this tensor."""
    out = [
        qt
        for qt in registry().values()
        if (allowed is None or qt.name in allowed)
        and qt.is_legal(tensor, n_per_row, has_imatrix=has_imatrix, zero_padded=zero_padded)
    ]
    return sorted(out, key=lambda qt: (qt.bits_per_weight, qt.name))


def bits_per_weight(nbytes: int, n_weights: int) -> float:
    """Bits per weight of `nbytes` of tensor data over `n_weights` (real) weights."""
    return nbytes * 8 / n_weights

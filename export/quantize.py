"""Write a plan as a GGUF with llama.cpp's own quantizer, then prove the file is what was planned.

llama.cpp quietly swaps a type that does not fit a row for another one. windq refuses such a
plan before quantizing (plan.validate), and after writing reads every tensor's type back.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import gguf
import numpy as np

from windq.errors import ExportError
from windq import registry
from windq.export import llama_quantize
from windq.files import atomic_output, atomic_write_text
from windq.models.gguf_model import GGUFModel
from windq.plan import Plan, validate


@dataclass(frozen=True)
class ExportReport:
    path: Path
    nbytes: int  # tensor data bytes
    file_bytes: int  # whole file, metadata included
    bits_per_weight: float
    base_ftype: str


def base_ftype(model: GGUFModel, tensors: Mapping[str, str]) -> int:
    """The file type written into general.file_type: that of the quantized type covering most weights.

    llama.cpp applies per-tensor overrides only when the file type's default is a quantized type,
    so an all-float plan takes the float file type and `pure` (its default type is the plan's).
    """
    weight: dict[str, int] = {}
    for name, type_name in tensors.items():
        weight[type_name] = weight.get(type_name, 0) + model.tensors[name].n_elements
    ranked = sorted(weight, key=lambda t: -weight[t])
    quantized = [t for t in ranked if registry.get(t).is_quantized]
    return llama_quantize.ftype_for(quantized[0] if quantized else ranked[0])


def export_gguf(
    model: GGUFModel,
    plan: Plan,
    out: str | Path,
    *,
    imatrix: Mapping[str, np.ndarray] | None = None,
    threads: int | None = None,  # None: all cores
) -> ExportReport:
    validate(plan, model, imatrix_tensors=set(imatrix or ()))
    out = Path(out)
    ftype = base_ftype(model, plan.tensors)
    overrides = {name: registry.get(t).id for name, t in plan.tensors.items()}
    with atomic_output(out) as tmp:
        llama_quantize.quantize_file(
            str(model.path), str(tmp), ftype=ftype, overrides=overrides,
            imatrix=dict(imatrix) if imatrix else None, pure=True, nthread=threads or 0,
        )  # fmt: skip
        written = GGUFModel(tmp)
        verify_against_plan(written, model, plan)
        report = ExportReport(
            path=out,
            nbytes=written.nbytes,
            file_bytes=tmp.stat().st_size,
            bits_per_weight=registry.bits_per_weight(written.nbytes, written.n_real_weights),
            base_ftype=_ftype_name(ftype),
        )
        del written  # release gguf-py's memory map before the rename
    return report


def mix_ftype(mix: str) -> int:
    name = f"MOSTLY_{mix}"
    if name not in gguf.LlamaFileType.__members__:
        raise ExportError(f"{mix}: not a llama.cpp file type (for example Q4_K_M, IQ2_XS, Q8_0)")
    return int(gguf.LlamaFileType[name])


def quantize_stock_mix(model: GGUFModel, mix: str, out: str | Path, *, imatrix: Mapping[str, np.ndarray] | None = None) -> Path:
    """llama.cpp's own mix (`Q4_K_M`, `IQ2_XS`, …) with its own rules and fallbacks: the rival a
    windq plan is judged against. Written atomically, like every windq output."""
    ftype = mix_ftype(mix)
    with atomic_output(out) as tmp:
        llama_quantize.quantize_file(str(model.path), str(tmp), ftype=ftype, imatrix=dict(imatrix) if imatrix else None)
    return Path(out)


def stock_mix_types(model: GGUFModel, mix: str, *, imatrix: Mapping[str, np.ndarray] | None = None) -> dict[str, str]:
    """The type `quantize_stock_mix` would give every tensor, from llama.cpp's dry run: nothing
    quantized, nothing written."""
    return llama_quantize.dry_run_types(str(model.path), ftype=mix_ftype(mix), imatrix=dict(imatrix) if imatrix else None)


def quantize_bare(model: GGUFModel, plan: Plan, out: str | Path, *, imatrix: Mapping[str, np.ndarray] | None = None) -> Path:
    """The plan's quantization as one bare llama_model_quantize call, with no validation and no
    read-back: only for measuring what `export_gguf`'s checks cost (the bench's export ratio)."""
    overrides = {name: registry.get(t).id for name, t in plan.tensors.items()}
    llama_quantize.quantize_file(
        str(model.path), str(out), ftype=llama_quantize.ftype_for("Q8_0"), pure=True, overrides=overrides,
        imatrix=dict(imatrix) if imatrix else None,
    )  # fmt: skip
    return Path(out)


def verify_against_plan(written: GGUFModel, source: GGUFModel, plan: Plan) -> None:
    """Every planned tensor has exactly its planned type; every other tensor is as in the source."""
    if set(written.tensors) != set(source.tensors):
        raise ExportError("llama.cpp wrote a different set of tensors than the source has")
    for name, info in written.tensors.items():
        want = plan.tensors.get(name, source.tensors[name].type_name)
        if info.type_name != want:
            raise ExportError(f"{name}: llama.cpp wrote {info.type_name}, the plan says {want}; refusing the file")


def write_recipe(plan: Plan, path: str | Path) -> Path:
    """The plan as a `--tensor-type-file` for stock llama-quantize (one `pattern=type` per line)."""
    lines = [f"{llama_quantize.exact_pattern(name)}={t.lower()}" for name, t in plan.tensors.items()]
    return atomic_write_text(path, "\n".join(lines) + "\n")


def _ftype_name(ftype: int) -> str:
    return gguf.LlamaFileType(ftype).name

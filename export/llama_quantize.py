"""llama.cpp's quantizer, called as llama-quantize calls it: a file type, per-tensor overrides
matched by anchored regex, importance data in memory; and its dry run, which applies the same
rules without quantizing."""

from __future__ import annotations

import ctypes
import os
import re
from pathlib import Path

import gguf

from windq import llamacpp
from windq.errors import ExportError


def ftype_for(type_name: str) -> int:
    """The llama_ftype whose default tensor type is `type_name` (K types: the _S mix)."""
    for candidate in (f"MOSTLY_{type_name}", f"MOSTLY_{type_name}_S"):
        if candidate in gguf.LlamaFileType.__members__:
            return int(gguf.LlamaFileType[candidate])
    if type_name == "F32":
        return int(gguf.LlamaFileType.ALL_F32)
    raise ExportError(f"no llama.cpp file type has {type_name} as its default type")


def quantize_file(
    src: str,
    dst: str,
    *,
    ftype: int,
    overrides: dict[str, int] | None = None,
    imatrix: dict[str, "object"] | None = None,
    pure: bool = False,
    nthread: int = 0,
    dry_run: bool = False,
) -> list[str]:
    """Call llama_model_quantize. `overrides` maps exact tensor names to ggml type ids; `imatrix`
    maps tensor names to float32 arrays (one value per input column; an MoE tensor's, one row of
    them per expert, expert after expert). Returns what llama.cpp
    logged; raises ExportError with its reason on failure. With `dry_run` nothing is quantized or
    written: llama.cpp only logs each tensor's type (see `dry_run_types`)."""
    import numpy as np

    lc = llamacpp.llama_cpp()
    params = lc.llama_model_quantize_default_params()
    params.nthread = nthread
    params.ftype = ftype
    params.allow_requantize = True  # the default model is itself quantized (Q4_1)
    params.quantize_output_tensor = True
    params.pure = pure
    params.dry_run = dry_run

    keep = []  # ctypes arrays and buffers referenced by params must outlive the call
    if overrides:
        arr = (lc.llama_model_tensor_override * (len(overrides) + 1))()
        for i, (name, type_id) in enumerate(overrides.items()):
            pattern = exact_pattern(name).encode()
            keep.append(pattern)
            arr[i].pattern = pattern
            arr[i].type = type_id
        arr[len(overrides)].pattern = None
        params.tt_overrides = ctypes.cast(arr, ctypes.POINTER(lc.llama_model_tensor_override))
        keep.append(arr)
    if imatrix:
        arr = (lc.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, values) in enumerate(imatrix.items()):
            data = np.ascontiguousarray(values, dtype=np.float32)
            bname = name.encode()
            keep += [data, bname]
            arr[i].name = bname
            arr[i].data = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            arr[i].size = data.size
        arr[len(imatrix)].name = None
        params.imatrix = ctypes.cast(arr, ctypes.POINTER(lc.llama_model_imatrix_data))
        keep.append(arr)

    with llamacpp.capture() as lines:
        rc = lc.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise ExportError(f"llama.cpp could not quantize {Path(src).name}: {llamacpp.reason(lines)}")
    return lines


# one tensor of the dry run's log: "[  12/ 272]  blk.1.ffn_up.weight - [ 576, 1536, 1, 1], type =   q4_1, "
# then "size =     0.48 MiB ->     0.55 MiB (q4_K)", or "size =    0.475 MiB" for a tensor kept as it is
_DRY_RUN_LINE = re.compile(
    r"\[\s*(\d+)/\s*(\d+)\]\s+(\S+)\s+-\s+\[[^\]]*\],\s+type\s+=\s+(\w+),\s+"
    r"size\s+=\s+[\d.]+\s+MiB(?:\s+->\s+[\d.]+\s+MiB\s+\((\w+)\))?"
)


def dry_run_types(src: str, *, ftype: int, imatrix: dict[str, "object"] | None = None) -> dict[str, str]:
    """The type llama.cpp's quantizer gives every tensor of `src` for `ftype` (its rules, overrides
    and fallbacks, which it applies before the dry-run branch exactly as before quantizing), as gguf
    names ("Q4_K"), read from its log without quantizing anything: the bytes a mix would take, in
    a fraction of a second instead of a whole-model quantization. Raises ExportError when the log
    does not name every tensor once."""
    lines = quantize_file(src, os.devnull, ftype=ftype, imatrix=imatrix, dry_run=True)
    found = _DRY_RUN_LINE.findall("\n".join(lines))
    types = {name: (new or cur).upper() for _, _, name, cur, new in found}
    if not found or len(types) != len(found) or len(found) != int(found[0][1]):
        raise ExportError(f"llama.cpp's dry run of {Path(src).name} named {len(types)} tensors, expected {found[0][1] if found else 'some'}")
    return types


def exact_pattern(name: str) -> str:
    """An anchored regex matching one tensor name only: llama.cpp matches overrides with regex_search,
    so an unanchored `blk.1.ffn_up` would also hit `blk.11.ffn_up`."""
    return "^" + name.replace(".", r"\.") + "$"

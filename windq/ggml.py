"""ctypes binding to the libggml that llama-cpp-python ships.

windq never reimplements a ggml format: quantization, dequantization and row sizes all come from
here, so a number computed by windq is the number the exported file will contain.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import numpy as np

from windq.errors import CalibrationError, IllegalTypeError, InputError, WindqError

_to_float_t = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(ctypes.c_float), ctypes.c_int64)


class _TypeTraits(ctypes.Structure):
    # struct ggml_type_traits in ggml.h
    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


@functools.cache
def lib() -> ctypes.CDLL:
    """The libggml inside llama-cpp-python, with the prototypes windq uses."""
    import llama_cpp  # loads libllama and, with it, libggml into the process

    libdir = Path(llama_cpp.__file__).parent / "lib"
    for name in ("libggml-base.so", "libggml-base.dylib", "ggml-base.dll", "libggml.so", "libggml.dylib"):
        if (libdir / name).exists():
            handle = ctypes.CDLL(str(libdir / name))
            break
    else:
        raise WindqError(f"libggml not found under {libdir}; reinstall llama-cpp-python")

    handle.ggml_blck_size.argtypes = [ctypes.c_int]
    handle.ggml_blck_size.restype = ctypes.c_int64
    handle.ggml_type_size.argtypes = [ctypes.c_int]
    handle.ggml_type_size.restype = ctypes.c_size_t
    handle.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    handle.ggml_row_size.restype = ctypes.c_size_t
    handle.ggml_type_name.argtypes = [ctypes.c_int]
    handle.ggml_type_name.restype = ctypes.c_char_p
    handle.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    handle.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    handle.ggml_quantize_init.argtypes = [ctypes.c_int]
    handle.ggml_quantize_init.restype = None
    handle.ggml_quantize_chunk.argtypes = [
        ctypes.c_int,  # type
        ctypes.c_void_p,  # const float * src
        ctypes.c_void_p,  # void * dst
        ctypes.c_int64,  # start
        ctypes.c_int64,  # nrows
        ctypes.c_int64,  # n_per_row
        ctypes.c_void_p,  # const float * imatrix
    ]
    handle.ggml_quantize_chunk.restype = ctypes.c_size_t
    handle.ggml_validate_row_data.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
    handle.ggml_validate_row_data.restype = ctypes.c_bool
    handle.ggml_get_type_traits.argtypes = [ctypes.c_int]
    handle.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
    return handle


def block_size(type_id: int) -> int:
    return int(lib().ggml_blck_size(type_id))


def type_size(type_id: int) -> int:
    return int(lib().ggml_type_size(type_id))


def row_size(type_id: int, n_per_row: int) -> int:
    return int(lib().ggml_row_size(type_id, n_per_row))


def type_name(type_id: int) -> str:
    return lib().ggml_type_name(type_id).decode()


def requires_imatrix(type_id: int) -> bool:
    return bool(lib().ggml_quantize_requires_imatrix(type_id))


def _f32(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32)


def quantize(type_id: int, weights: np.ndarray, imatrix: np.ndarray | None = None, *, experts: int = 1) -> np.ndarray:
    """Quantize a 2-D float matrix (rows × n_per_row) with ggml_quantize_chunk; returns the raw bytes.

    `imatrix` holds one importance per input column (n_per_row values), as llama.cpp passes it; for
    a stack of `experts` matrices (an MoE tensor, rows expert after expert) experts × n_per_row
    values, each expert's rows quantized with its own slice, as llama.cpp's quantizer does
    (imatrix_for_row in src/llama-quant.cpp).
    """
    w = _f32(weights)
    nrows, n_per_row = w.shape
    out = np.empty(nrows * row_size(type_id, n_per_row), dtype=np.uint8)
    im = None if imatrix is None else _f32(imatrix).reshape(-1)
    if im is None and requires_imatrix(type_id):
        # ggml asserts (aborting the whole process) rather than returning an error
        raise IllegalTypeError(f"{type_name(type_id)} cannot be quantized without importance data; pass an imatrix")
    if nrows % experts or (im is not None and len(im) != experts * n_per_row):
        raise CalibrationError(
            f"importance data of {len(im) if im is not None else 0} values for {experts} × {n_per_row} columns "
            f"({nrows} rows): an imatrix for another model"
        )
    rows_per_mat, row_bytes = nrows // experts, row_size(type_id, n_per_row)
    for e in range(experts):
        r0 = e * rows_per_mat
        written = lib().ggml_quantize_chunk(
            type_id, w[r0:].ctypes.data, out[r0 * row_bytes :].ctypes.data, 0, rows_per_mat, n_per_row,
            None if im is None else im[e * n_per_row :].ctypes.data,
        )  # fmt: skip
        if written != rows_per_mat * row_bytes:
            raise WindqError(f"ggml_quantize_chunk wrote {written} bytes for {type_name(type_id)}, expected {rows_per_mat * row_bytes}")
    if not lib().ggml_validate_row_data(type_id, out.ctypes.data, out.nbytes):
        raise WindqError(f"ggml rejected its own {type_name(type_id)} data (non-finite weights?)")
    return out


def dequantize(type_id: int, data: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Raw ggml bytes of a (rows × n_per_row) matrix back to float32, with ggml's own to_float."""
    nrows, n_per_row = shape
    raw = np.ascontiguousarray(data).view(np.uint8)
    if raw.nbytes != nrows * row_size(type_id, n_per_row):
        raise InputError(f"{raw.nbytes} bytes do not hold a {shape} {type_name(type_id)} matrix (a damaged GGUF?)")
    traits = lib().ggml_get_type_traits(type_id).contents
    out = np.empty((nrows, n_per_row), dtype=np.float32)
    if not traits.to_float:  # F32 has no converter: the bytes are the floats
        out[...] = raw.view(np.float32).reshape(shape)
        return out
    to_float = _to_float_t(traits.to_float)
    to_float(raw.ctypes.data, out.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), nrows * n_per_row)
    return out


def round_trip(type_id: int, weights: np.ndarray, imatrix: np.ndarray | None = None, *, experts: int = 1) -> np.ndarray:
    """What a tensor becomes after writing it as `type_id` and reading it back."""
    w = _f32(weights)
    return dequantize(type_id, quantize(type_id, w, imatrix, experts=experts), w.shape)

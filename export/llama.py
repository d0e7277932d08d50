"""The llama.cpp runtime as windq uses it: one log sink, and the quantizer's C call.

llama.cpp logs from C through one process-wide callback. windq routes it to Python's `logging`
(logger "windq.llama", DEBUG for llama.cpp's info lines) and keeps the recent lines, so a failure
can be reported with llama.cpp's own reason instead of a bare return code.
"""

from __future__ import annotations

import collections
import ctypes
import functools
import logging

import gguf

log = logging.getLogger("windq.llama")
_recent: collections.deque[str] = collections.deque(maxlen=64)
# enum ggml_log_level: NONE, DEBUG, INFO, WARN, ERROR, CONT (continues the previous line's level).
# llama.cpp's INFO lines are a per-tensor commentary, so they go out at DEBUG.
_LEVELS = {0: logging.CRITICAL, 1: logging.DEBUG, 2: logging.DEBUG, 3: logging.WARNING, 4: logging.ERROR}
_last_level = [logging.DEBUG]


@functools.cache
def llama_cpp():
    """Import llama_cpp once, with its logs routed through windq."""
    import llama_cpp as lc
    import llama_cpp._logger  # noqa: F401  (installs llama-cpp-python's own callback, which we replace)

    @lc.llama_log_callback
    def _sink(level: int, text: bytes, _user) -> None:
        py_level = _last_level[0] if level == 5 else _LEVELS.get(level, logging.DEBUG)
        _last_level[0] = py_level
        line = text.decode("utf-8", "replace").rstrip("\n")
        if line:
            _recent.append(line)
            log.log(py_level, line)

    lc.llama_log_set(_sink, ctypes.c_void_p(0))
    lc._windq_log_sink = _sink  # keep the ctypes callback alive for the life of the process
    lc.llama_backend_init()
    return lc


def last_error() -> str:
    """The last line llama.cpp logged that reads like an error, for error messages."""
    for line in reversed(_recent):
        low = line.lower()
        if "error" in low or "failed" in low or "exception" in low:
            return line.strip(" =\n")
    return _recent[-1].strip() if _recent else "no message from llama.cpp"


def version() -> str:
    from importlib.metadata import version as v

    return v("llama-cpp-python")


def ftype_for(type_name: str) -> int:
    """The llama_ftype whose default tensor type is `type_name` (K types: the _S mix)."""
    for candidate in (f"MOSTLY_{type_name}", f"MOSTLY_{type_name}_S"):
        if candidate in gguf.LlamaFileType.__members__:
            return int(gguf.LlamaFileType[candidate])
    if type_name == "F32":
        return int(gguf.LlamaFileType.ALL_F32)
    raise KeyError(type_name)


def quantize_file(
    src: str,
    dst: str,
    *,
    ftype: int,
    overrides: dict[str, int] | None = None,
    imatrix: dict[str, "object"] | None = None,
    pure: bool = False,
    nthread: int = 0,
) -> None:
    """Call llama_model_quantize. `overrides` maps exact tensor names to ggml type ids; `imatrix`
    maps tensor names to float32 arrays (one value per input column). Raises RuntimeError with
    llama.cpp's reason on failure."""
    import numpy as np

    lc = llama_cpp()
    params = lc.llama_model_quantize_default_params()
    params.nthread = nthread
    params.ftype = ftype
    params.allow_requantize = True  # the default model is itself quantized (Q4_1)
    params.quantize_output_tensor = True
    params.pure = pure

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

    _recent.clear()
    rc = lc.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(last_error())


def exact_pattern(name: str) -> str:
    """An anchored regex matching one tensor name only: llama.cpp matches overrides with regex_search,
    so an unanchored `blk.1.ffn_up` would also hit `blk.11.ffn_up`."""
    return "^" + name.replace(".", r"\.") + "$"

"""The llama.cpp runtime as windq uses it: one log sink, the one place models are loaded, the
quantizer's C call, and a probe that decodes a few tokens in a child process.

llama.cpp logs from C through one process-wide callback. windq routes it to Python's `logging`
(logger "windq.llama", DEBUG for llama.cpp's info lines) and keeps the recent lines, so a failure
can be reported with llama.cpp's own reason instead of a bare return code.
"""

from __future__ import annotations

import collections
import ctypes
import functools
import json
import logging
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import gguf

from windq.errors import RuntimeCrashError

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


def load_llama(path: str | Path, **kwargs):
    """A `llama_cpp.Llama` for `path`: every model windq (and its tests) runs goes through here, so
    how models are loaded is decided once. Nothing is set beyond the caller's arguments: the build
    is what keeps this safe on every CPU (the Makefile compiles llama.cpp without AMX, whose kernels
    segfault on Sapphire Rapids), and `windq doctor` checks that build on this machine."""
    llama_cpp()
    from llama_cpp import Llama

    return Llama(model_path=str(path), verbose=False, **kwargs)


def system_info() -> str:
    """What this llama.cpp build was compiled with, as llama.cpp prints it ("AVX2 = 1 | AMX_INT8 = 1 | …")."""
    return llama_cpp().llama_print_system_info().decode("utf-8", "replace").strip()


@dataclass(frozen=True)
class ProbeResult:
    model: str
    n_tokens: int
    seconds: float
    system_info: str
    cpu: str

    @property
    def amx_compiled(self) -> bool:
        return "AMX_INT8 = 1" in self.system_info


PROBE_TEXT = "The capital of France is Paris, and the capital of Italy is"


def probe_command(path: str | Path, n_tokens: int) -> list[str]:
    """The child process of `probe`: this module run as a script."""
    return [sys.executable, "-m", "windq.export.llama", str(path), str(n_tokens)]


def probe(path: str | Path, n_tokens: int = 8, *, timeout: float = 300, command: Sequence[str] | None = None) -> ProbeResult:
    """Load `path` and decode `n_tokens` tokens in a child process, so that a build of llama.cpp
    that crashes on this CPU (a signal, not an exception) is reported in one line instead of
    taking the caller down. `command` replaces the child (tests make it crash on purpose)."""
    cmd = list(command) if command is not None else probe_command(path, n_tokens)
    cpu = cpu_summary()
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeCrashError(f"llama.cpp did not finish decoding {n_tokens} tokens of {path} within {timeout:.0f} s (CPU: {cpu})") from None
    lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
    info = json.loads(lines[0]).get("system_info", "?") if lines and lines[0].startswith("{") else "unknown (the child died before reporting it)"
    if r.returncode != 0:
        if r.returncode < 0:
            try:
                how = f"crashed with {signal.Signals(-r.returncode).name}"
            except ValueError:
                how = f"was killed by signal {-r.returncode}"
        else:
            tail = [ln for ln in r.stderr.splitlines() if ln.strip()]
            how = f"failed (exit {r.returncode}: {tail[-1].strip() if tail else 'no message'})"
        amx = "AMX_INT8 = 1" in info
        fix = (
            "this build has llama.cpp's AMX kernels, which crash on this CPU: rebuild without them with "
            "`rm -rf .venv ~/.cache/windq/wheels && make` (the Makefile compiles with -mno-amx-*)"
            if amx
            else "rebuild llama-cpp-python with `rm -rf .venv ~/.cache/windq/wheels && make`, and report the CPU and build above"
        )
        raise RuntimeCrashError(
            f"llama.cpp {how} decoding {n_tokens} tokens of {Path(path).name} in a child process; "
            f"CPU: {cpu}; llama-cpp-python {version()} built with [{_features(info)}]; {fix}"
        )
    if len(lines) < 2:
        raise RuntimeCrashError(f"the llama.cpp probe of {path} reported nothing (CPU: {cpu})")
    done = json.loads(lines[-1])
    return ProbeResult(str(path), int(done["n_tokens"]), time.perf_counter() - t0, info, cpu)


def _features(info: str) -> str:
    """The compiled-in features of a system_info line, without the '= 1' noise."""
    feats = [p.split("=")[0].strip() for p in info.replace("CPU :", "|").split("|") if p.strip().endswith("= 1")]
    return " ".join(feats) or info


def cpu_summary() -> str:
    """The CPU's name and the instruction sets that decide which llama.cpp kernels can run."""
    name, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and name == "unknown CPU":
                name = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        return name
    has = [f for f, names in (("AVX2", {"avx2"}), ("AVX-512", {"avx512f"}), ("AMX", {"amx_int8"})) if names & flags]
    return f"{name} ({', '.join(has) or 'no AVX2'})"


def _probe_child(path: str, n_tokens: int) -> None:
    """Runs in the child: report the build first (so a crash still names it), then decode."""
    print(json.dumps({"system_info": system_info()}), flush=True)
    llm = load_llama(path, n_ctx=64, n_batch=64, n_threads=2)
    tokens = llm.tokenize(PROBE_TEXT.encode(), add_bos=True, special=False)[:n_tokens]
    llm.eval(tokens)
    llm.close()
    print(json.dumps({"n_tokens": len(tokens)}), flush=True)


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


if __name__ == "__main__":
    _probe_child(sys.argv[1], int(sys.argv[2]))

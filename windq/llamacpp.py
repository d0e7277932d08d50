"""The llama.cpp library as windq uses it: imported once with one log sink, the one place models
are loaded, and a probe that decodes a few tokens in a child process (`windq doctor`).

llama.cpp logs from C through one process-wide callback. windq routes it to Python's `logging`
(logger "windq.llama", DEBUG for llama.cpp's info lines); `capture()` collects the lines logged
during one call, so a failure is reported with that call's own reason, never a stale line.
"""

from __future__ import annotations

import contextlib
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
from typing import Iterator, Sequence

from windq.errors import InputError, RuntimeCrashError

log = logging.getLogger("windq.llama")
_captures: list[list[str]] = []  # open capture() blocks, innermost last
_callbacks: list = []
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
            for lines in _captures:
                lines.append(line)
            log.log(py_level, line)

    lc.llama_log_set(_sink, ctypes.c_void_p(0))
    _callbacks.append(_sink)  # the ctypes callback must live as long as the process logs through it
    lc.llama_backend_init()
    return lc


@contextlib.contextmanager
def capture() -> Iterator[list[str]]:
    """Collects the lines llama.cpp logs inside the block (see `reason`)."""
    lines: list[str] = []
    _captures.append(lines)
    try:
        yield lines
    finally:
        _captures.remove(lines)


def reason(lines: Sequence[str]) -> str:
    """The first line of one call's log that reads like an error: the root cause (llama.cpp's later
    lines only repeat that loading or quantizing failed)."""
    for line in lines:
        low = line.lower()
        if "error" in low or "failed" in low or "exception" in low:
            return line.strip(" =\n")
    return lines[-1].strip() if lines else "llama.cpp gave no reason"


def load_llama(path: str | Path, **kwargs):
    """A `llama_cpp.Llama` for `path`: every model windq (and its tests) runs goes through here, so
    how models are loaded is decided once. Nothing is set beyond the caller's arguments: the build
    is what keeps this safe on every CPU (the Makefile compiles llama.cpp without AMX, whose kernels
    segfault on Sapphire Rapids), and `windq doctor` checks that build on this machine.
    Raises InputError with llama.cpp's reason when the file does not load."""
    llama_cpp()
    from llama_cpp import Llama

    with capture() as lines:
        try:
            return Llama(model_path=str(path), verbose=False, **kwargs)
        except (ValueError, RuntimeError) as e:  # llama-cpp-python's "Failed to load model from file"
            what = "the vocabulary" if kwargs.get("vocab_only") else "the model"
            raise InputError(f"{path}: llama.cpp could not load {what} ({reason(lines) if lines else e})") from None


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
        return _amx_compiled(self.system_info)


def _amx_compiled(info: str) -> bool:
    """Whether a system_info line says llama.cpp's AMX kernels were compiled in."""
    return "AMX_INT8 = 1" in info


PROBE_TEXT = "The capital of France is Paris, and the capital of Italy is"


def probe_command(path: str | Path, n_tokens: int) -> list[str]:
    """The child process of `probe`: this module run as a script."""
    return [sys.executable, "-m", "windq.llamacpp", str(path), str(n_tokens)]


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
        fix = (
            "this build has llama.cpp's AMX kernels, which crash on this CPU: rebuild without them with "
            "`rm -rf .venv ~/.cache/windq/wheels && make` (the Makefile compiles with -mno-amx-*)"
            if _amx_compiled(info)
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


if __name__ == "__main__":
    _probe_child(sys.argv[1], int(sys.argv[2]))

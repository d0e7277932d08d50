"""The llama.cpp build runs on this CPU, and a build that crashes is named in one line (`windq doctor`)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from windq.cli import main
from windq.errors import RuntimeCrashError
from windq import llamacpp as llama

MAKEFILE = Path(__file__).resolve().parents[1] / "Makefile"

# A child that reports an AMX build, then dies of a real segmentation fault (a read of address 0),
# as llama.cpp's AMX kernels do on Sapphire Rapids.
CRASHING_CHILD = [
    sys.executable, "-c",
    "import ctypes, json; print(json.dumps({'system_info': 'CPU : AVX2 = 1 | AVX512 = 1 | AMX_INT8 = 1 | REPACK = 1 |'}), flush=True); "
    "ctypes.string_at(0)",
]  # fmt: skip


def test_probe_decodes_in_a_child_and_names_the_build(synthetic_gguf):
    r = llama.probe(synthetic_gguf, 6)
    assert r.n_tokens == 6
    assert "CPU" in r.system_info and r.cpu
    # the Makefile's build never has the AMX kernels, on any CPU
    assert not r.amx_compiled, r.system_info


def test_a_crashing_child_is_one_line_naming_cpu_build_and_fix(synthetic_gguf):
    with pytest.raises(RuntimeCrashError) as e:
        llama.probe(synthetic_gguf, 6, command=CRASHING_CHILD)
    msg = str(e.value)
    assert "\n" not in msg
    assert "crashed with SIGSEGV" in msg
    assert "AMX" in msg and "-mno-amx" in msg  # the build's features and what to do
    assert llama.cpu_summary() in msg


def test_a_child_that_fails_without_a_signal_is_reported_too(synthetic_gguf):
    with pytest.raises(RuntimeCrashError, match=r"failed \(exit 3: boom\)"):
        llama.probe(synthetic_gguf, 6, command=[sys.executable, "-c", "import sys; print('boom', file=sys.stderr); sys.exit(3)"])


def test_doctor_cli_ok_and_crash(synthetic_gguf, monkeypatch):
    runner = CliRunner()
    ok = runner.invoke(main, ["doctor", str(synthetic_gguf)])
    assert ok.exit_code == 0, ok.output
    assert ok.output.startswith("llama.cpp OK: decoded") and "AMX kernels not compiled" in ok.output

    monkeypatch.setattr(llama, "probe_command", lambda path, n: CRASHING_CHILD)
    bad = runner.invoke(main, ["doctor", str(synthetic_gguf)])
    assert bad.exit_code == 2
    lines = [ln for ln in bad.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("windq: error: llama.cpp crashed with SIGSEGV"), bad.stderr


def _makefile_var(name: str) -> str:
    m = re.search(rf"^{name}\s*:=\s*(.+)$", MAKEFILE.read_text(), re.M)
    assert m, name
    return m.group(1).strip()


def test_makefile_flags_keep_amx_out_even_under_march_native_on_sapphire_rapids():
    """The build flags, checked against the compiler: with -march=sapphirerapids (what -march=native
    means on an AMX machine) the macros that compile llama.cpp's AMX kernels must stay undefined."""
    flags = _makefile_var("LLAMA_CFLAGS").split()

    def macros(*args):
        r = subprocess.run(["cc", *args, "-dM", "-E", "-"], input="", capture_output=True, text=True, check=True)
        return set(re.findall(r"#define (__\w+__) ", r.stdout))

    assert "__AMX_INT8__" in macros("-march=sapphirerapids")  # the hazard is real for this compiler
    for order in ([*flags, "-march=sapphirerapids"], ["-march=sapphirerapids", *flags]):
        got = macros(*order)
        assert not {m for m in got if m.startswith("__AMX")}, order
        assert "__AVX512F__" in got  # everything else -march gives stays

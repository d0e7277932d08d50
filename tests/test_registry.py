import gguf
import numpy as np
import pytest

from windq.errors import IllegalTypeError, WindqError
from windq import ggml, registry


def test_sizes_agree_between_gguf_and_libggml():
    """Two independent sources: gguf-py's table (what the registry is built from) and libggml's own
    block and type sizes; and the registry's byte counts (ggml_row_size) against gguf's table."""
    for qt in registry.registry().values():
        assert (qt.block_size, qt.type_size) == (ggml.block_size(qt.id), ggml.type_size(qt.id)), qt.name
        block, size = gguf.GGML_QUANT_SIZES[qt.ggml_type]
        for blocks, rows in ((1, 1), (4, 3), (9, 7)):
            assert qt.nbytes((blocks * block, rows)) == blocks * size * rows, qt.name


def test_known_bits_per_weight():
    assert registry.get("Q8_0").bits_per_weight == 8.5
    assert registry.get("Q4_0").bits_per_weight == 4.5
    assert registry.get("Q4_K").bits_per_weight == 4.5
    assert registry.get("Q2_K").bits_per_weight == 2.625
    assert registry.get("IQ2_XXS").bits_per_weight == 2.0625


def test_row_legality_on_a_576_wide_model():
    legal = {qt.name for qt in registry.legal_types("blk.0.attn_q.weight", 576, has_imatrix=True)}
    assert {"Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "IQ4_NL", "F16", "F32"} <= legal
    assert not legal & {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ2_XXS", "IQ4_XS"}
    with pytest.raises(IllegalTypeError, match="multiple of 256"):
        registry.get("Q4_K").check_row(576, "blk.0.attn_q.weight")


def test_imatrix_requirement_follows_llama_cpp():
    without = {qt.name for qt in registry.legal_types("blk.0.ffn_up.weight", 256, has_imatrix=False)}
    assert "IQ2_XXS" not in without and "IQ3_XXS" not in without and "IQ1_S" not in without
    assert "Q2_K" in without and "IQ4_XS" in without
    # llama.cpp exempts token_embd, but ggml's own requirement (an abort) still holds there
    emb = {qt.name for qt in registry.legal_types("token_embd.weight", 256, has_imatrix=False)}
    assert "IQ3_XXS" in emb and "IQ2_S" in emb and "IQ2_XXS" not in emb and "IQ1_S" not in emb


_QUANTIZE_WITHOUT_IMATRIX = """
import ctypes, sys
import numpy as np
from windq import ggml
w = np.random.default_rng(0).standard_normal((2, 256)).astype(np.float32)
for type_id in map(int, sys.argv[1:]):
    out = np.empty(2 * ggml.row_size(type_id, 256), dtype=np.uint8)
    ggml.lib().ggml_quantize_chunk(type_id, w.ctypes.data, out.ctypes.data, 0, 2, 256, None)
print("ok")
"""


@pytest.mark.slow  # the IQ quantizers' grids take seconds to build
def test_declared_imatrix_requirement_is_what_libggml_enforces():
    """ggml aborts the process when a type that needs importance data is quantized without it: each
    such type is run alone in a child that must die, and all the others together in one that must not."""
    import signal
    import subprocess
    import sys

    def run(*ids):
        return subprocess.run([sys.executable, "-c", _QUANTIZE_WITHOUT_IMATRIX, *map(str, ids)], capture_output=True, text=True)

    needs = [qt for qt in registry.registry().values() if qt.ggml_requires_imatrix]
    assert {qt.name for qt in needs} >= {"IQ2_XXS", "IQ2_XS", "IQ1_S"}
    for qt in needs:
        assert run(qt.id).returncode == -signal.SIGABRT, qt.name
    rest = run(*(qt.id for qt in registry.registry().values() if not qt.ggml_requires_imatrix))
    assert rest.returncode == 0 and rest.stdout.strip() == "ok", rest.stderr


def test_legal_types_sorted_cheapest_first():
    bpw = [qt.bits_per_weight for qt in registry.legal_types("blk.0.ffn_up.weight", 256, has_imatrix=True)]
    assert bpw == sorted(bpw)


def test_unknown_type_is_a_clear_error():
    with pytest.raises(WindqError, match="unknown quant type 'Q3_Z'"):
        registry.get("Q3_Z")


def test_ggml_round_trip_is_exact_for_f32_and_close_for_q8_0():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 256)).astype(np.float32)
    assert np.array_equal(ggml.round_trip(registry.get("F32").id, w), w)
    q8 = ggml.round_trip(registry.get("Q8_0").id, w)
    assert np.abs(q8 - w).max() < np.abs(w).max() / 100

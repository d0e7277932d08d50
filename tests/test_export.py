import numpy as np
import pytest

from helpers import assert_same_tensor_bytes, stock_quantize
from windq.errors import ExportError
from windq.export.quantize import export_gguf, write_recipe
from windq.models.gguf_model import GGUFModel
from windq.plan import make_plan, uniform_plan


@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_0", "Q4_K", "Q6_K"])
def test_uniform_export_is_byte_identical_to_llama_quantize(synthetic_gguf, tmp_path, type_name):
    m = GGUFModel(synthetic_gguf)
    ours = export_gguf(m, uniform_plan(m, type_name), tmp_path / "ours.gguf")
    ref = stock_quantize(synthetic_gguf, tmp_path / "ref.gguf", type_name)
    assert_same_tensor_bytes(GGUFModel(ours.path), ref)


def test_mixed_plan_is_written_exactly_and_bits_match_plan(synthetic_gguf, tmp_path):
    m = GGUFModel(synthetic_gguf)
    cycle = ["Q8_0", "Q2_K", "Q4_K", "IQ4_NL", "Q5_1", "F16"]
    tensors = {t.name: cycle[i % len(cycle)] for i, t in enumerate(m.quantizable())}
    plan = make_plan(m, tensors, method="manual")
    report = export_gguf(m, plan, tmp_path / "mixed.gguf")
    out = GGUFModel(report.path)
    assert {n: out.tensors[n].type_name for n in tensors} == tensors
    assert out.nbytes == plan.total_bytes
    assert report.bits_per_weight == pytest.approx(plan.achieved_bpw)
    # tensors outside the plan (norms) are copied untouched
    for name in set(m.tensors) - set(tensors):
        assert out.raw(name).tobytes() == m.raw(name).tobytes()


def test_failure_inside_llama_cpp_leaves_no_file(synthetic_gguf, tmp_path):
    m = GGUFModel(synthetic_gguf)
    plan = uniform_plan(m, "Q4_K")
    bad = {t.name: np.full(t.n_per_row, np.nan, dtype=np.float32) for t in m.quantizable()}
    with pytest.raises(ExportError, match="non-finite"):
        export_gguf(m, plan, tmp_path / "out.gguf", imatrix=bad)
    assert list(tmp_path.iterdir()) == []


def test_recipe_is_a_tensor_type_file(synthetic_gguf, tmp_path):
    m = GGUFModel(synthetic_gguf)
    plan = uniform_plan(m, "Q4_K")
    lines = write_recipe(plan, tmp_path / "recipe.txt").read_text().splitlines()
    assert len(lines) == len(plan.tensors)
    assert r"^blk\.0\.attn_q\.weight$=q4_k" in lines


def _mix_types_both_ways(path, mix, tmp_path, imatrix=None):
    from windq.export.quantize import quantize_stock_mix, stock_mix_types

    m = GGUFModel(path)
    written = GGUFModel(quantize_stock_mix(m, mix, tmp_path / f"{mix}.gguf", imatrix=imatrix))
    return stock_mix_types(m, mix, imatrix=imatrix), {n: info.type_name for n, info in written.tensors.items()}


@pytest.mark.parametrize("mix", ["Q4_K_M", "IQ2_XS", "Q3_K_S"])
def test_a_stock_mix_dry_run_names_the_types_llama_cpp_writes(synthetic_gguf, synthetic_stats, tmp_path, mix):
    """The verification takes a mix's types from llama.cpp's dry run instead of quantizing the model."""
    from windq.pipeline.imatrix import load_imatrix

    im = load_imatrix(synthetic_stats / "imatrix.gguf", GGUFModel(synthetic_gguf)).data
    dry, written = _mix_types_both_ways(synthetic_gguf, mix, tmp_path, im)
    assert dry == written and len(set(written.values())) > 1  # its rules, not one type everywhere


@pytest.mark.slow  # three whole-model quantizations of the default
@pytest.mark.parametrize("mix", ["Q4_K_M", "Q3_K_S", "Q5_K_S"])
def test_a_stock_mix_dry_run_names_llama_cpps_fallbacks_on_the_default(default_gguf, tmp_path, mix):
    """On the default's 576-wide rows llama.cpp falls back from K types to others: the dry run says so."""
    dry, written = _mix_types_both_ways(default_gguf, mix, tmp_path)
    assert dry == written
    assert any(t in ("Q5_0", "Q5_1", "Q8_0", "IQ4_NL", "Q4_0", "Q4_1") for n, t in written.items() if "ffn_up" in n)

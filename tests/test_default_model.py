"""End to end on the real default model (SmolLM2-135M-Instruct, Q4_1 GGUF) through llama.cpp."""

import pytest

from helpers import assert_same_tensor_bytes, stock_quantize
from test_perplexity import _direct_ppl
from windq.evaluators.perplexity import evaluate
from windq.export.quantize import export_gguf
from windq.models.gguf_model import GGUFModel
from windq.plan import uniform_plan

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def q8_export(default_gguf, tmp_path_factory):
    m = GGUFModel(default_gguf)
    return export_gguf(m, uniform_plan(m, "Q8_0"), tmp_path_factory.mktemp("default") / "q8_0.gguf").path


@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_0"])
def test_uniform_export_is_byte_identical_on_the_default_model(default_gguf, tmp_path, q8_export, type_name):
    m = GGUFModel(default_gguf)
    ours = q8_export if type_name == "Q8_0" else export_gguf(m, uniform_plan(m, type_name), tmp_path / "ours.gguf").path
    ref = stock_quantize(default_gguf, tmp_path / "ref.gguf", type_name)
    assert_same_tensor_bytes(GGUFModel(ours), ref)


def test_ppl_of_the_source_matches_a_direct_computation(default_gguf, sample_text):
    r = evaluate(default_gguf, sample_text, ctx=512, max_chunks=3)
    assert r.ppl == pytest.approx(_direct_ppl(default_gguf, sample_text, 512, 3), rel=1e-4)


def test_q8_0_is_within_one_percent_of_the_reference(default_gguf, q8_export, sample_text):
    ref = evaluate(default_gguf, sample_text, ctx=512, max_chunks=6)
    q8 = evaluate(q8_export, sample_text, ctx=512, max_chunks=6, ref_path=default_gguf)
    assert abs(q8.ppl / ref.ppl - 1) < 0.01
    assert 0 < q8.kld < 0.01 and q8.top1 > 0.95

"""Alignment computes the same function, before and after quantization, and counts real weights."""

import gguf
import numpy as np
import pytest

from helpers import assert_one_line_error, windq
from windq.errors import IllegalTypeError
from windq.evaluators.perplexity import evaluate
from windq import ggml, registry
from windq.export.quantize import export_gguf
from windq.models.align import align_gguf
from windq.models.gguf_model import GGUFModel
from windq.models.synthetic import SyntheticConfig, write_synthetic_gguf
from windq.plan import make_plan, uniform_plan, validate

ODD = SyntheticConfig(n_embd=192, n_head=3, n_head_kv=1, n_ff=320)  # SmolLM2's awkwardness, smaller
NATIVE = SyntheticConfig(n_embd=256, n_head=4, n_head_kv=1, n_ff=512)  # the aligned widths, with no padding


@pytest.fixture(scope="module")
def odd(tmp_path_factory):
    d = tmp_path_factory.mktemp("odd")
    src = write_synthetic_gguf(d / "odd.gguf", ODD)
    report = align_gguf(GGUFModel(src), d / "aligned.gguf")
    return src, report


def test_geometry_and_bit_accounting(odd):
    src, report = odd
    assert (report.after.n_embd, report.after.n_head, report.after.n_head_kv, report.after.n_ff) == (256, 12, 4, 512)
    a = GGUFModel(report.path)
    assert a.n_real_weights == GGUFModel(src).n_weights < a.n_weights
    for t in a.quantizable():
        assert t.n_per_row % 256 == 0
    plan = uniform_plan(a, "Q8_0")
    # bits per real weight: type bits × padded size / real size
    assert plan.achieved_bpw > 8.5 * a.n_weights / a.n_real_weights * 0.99


def test_aligned_model_computes_the_same_function(odd, sample_text):
    src, report = odd
    ref = evaluate(src, sample_text, ctx=128, max_chunks=4)
    al = evaluate(report.path, sample_text, ctx=128, max_chunks=4, ref_path=src)
    assert al.ppl == pytest.approx(ref.ppl, rel=1e-3)
    assert al.kld < 1e-5 and al.top1 == 1.0


def test_function_holds_after_quantizing_with_a_block_32_type(odd, sample_text, tmp_path):
    """Q8_0's blocks line up with the 32-column padding boundary: the real blocks quantize exactly as
    unaligned, the padded ones stay zero, so the two files compute the same function."""
    src, report = odd
    s, a = GGUFModel(src), GGUFModel(report.path)
    q_src = export_gguf(s, uniform_plan(s, "Q8_0"), tmp_path / "src-q8.gguf").path
    q_al = export_gguf(a, uniform_plan(a, "Q8_0"), tmp_path / "al-q8.gguf").path
    r0 = evaluate(q_src, sample_text, ctx=128, max_chunks=4)
    r1 = evaluate(q_al, sample_text, ctx=128, max_chunks=4)
    assert r1.ppl == pytest.approx(r0.ppl, rel=1e-3)


def test_k_types_become_legal_and_keep_the_function_close(odd, sample_text, tmp_path):
    """Q6_K cannot be written unaligned; aligned, its file is as close to the source as Q6_K is on a
    model whose widths fit it natively (the same weights' distribution, no padding): padding that
    leaked into the real channels would show as a far larger KLD."""
    src, report = odd
    s, a = GGUFModel(src), GGUFModel(report.path)
    with pytest.raises(IllegalTypeError):
        uniform_plan(s, "Q6_K")
    q6k = export_gguf(a, uniform_plan(a, "Q6_K"), tmp_path / "al-q6k.gguf").path
    aligned = evaluate(q6k, sample_text, ctx=128, max_chunks=4, ref_path=src)
    native_src = write_synthetic_gguf(tmp_path / "native.gguf", NATIVE)
    native = export_gguf(GGUFModel(native_src), uniform_plan(GGUFModel(native_src), "Q6_K"), tmp_path / "native-q6k.gguf").path
    baseline = evaluate(native, sample_text, ctx=128, max_chunks=4, ref_path=native_src)
    # measured: 0.053 aligned against 0.050 native
    assert aligned.kld < 1.5 * baseline.kld, (aligned.kld, baseline.kld)


@pytest.mark.parametrize("name", registry.OFFERED)
def test_zero_padding_survives_quantization(name):
    """Why alignment survives quantization, type by type, with the importance a padded imatrix has."""
    qt = registry.get(name)
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 768)).astype(np.float32)
    w[:, 576:] = 0  # padded columns: zero 32-stretches inside a live 256-block
    w[4] = 0  # a padded row (o/down output, dummy-head q/k/v rows)
    importance = np.where(np.arange(768) < 576, 1.0, 0.0).astype(np.float32)
    q = ggml.round_trip(qt.id, w, importance)
    assert np.isfinite(q).all()
    assert (q[4] == 0).all(), "every ggml type keeps a zero row zero"
    assert (q[:, 576:] == 0).all() == qt.keeps_zero_subblocks


def test_token_embd_on_an_aligned_model_refuses_grids_without_zero(odd):
    _, report = odd
    a = GGUFModel(report.path)
    tensors = dict(uniform_plan(a, "Q4_K").tensors)
    tensors["token_embd.weight"] = "IQ3_S"
    with pytest.raises(IllegalTypeError, match="padding"):
        validate(make_plan(a, tensors, method="manual"), a)
    tensors["token_embd.weight"] = "Q4_K"
    tensors["blk.0.attn_q.weight"] = "IQ3_S"  # its padded columns meet exactly-zero activations: fine
    validate(make_plan(a, tensors, method="manual"), a)


def test_other_architectures_are_refused(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    w.add_embedding_length(64)
    w.add_tensor("token_embd.weight", np.zeros((10, 64), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    r = windq("align", tmp_path / "gpt2.gguf", "-o", tmp_path / "out.gguf")
    assert_one_line_error(r, "alignment is supported for llama", "gpt2")
    assert not (tmp_path / "out.gguf").exists()



def test_aligned_twin_keeps_its_sources_types_for_exclude_source(odd, tmp_path):
    """The twin is all F32, but a plan giving a tensor the type it had in the source reproduces it at
    (nearly) zero error, so --exclude-source on the twin must exclude the source's types, not F32."""
    from types import SimpleNamespace

    from helpers import stock_quantize
    from windq.pipeline.planner import PlanConfig, allowed_types

    src, _ = odd
    q = stock_quantize(src, tmp_path / "q5.gguf", "Q5_0")
    twin = GGUFModel(align_gguf(q, tmp_path / "twin.gguf").path)
    for name, info in q.tensors.items():
        assert twin.source_type(name) == info.type_name
    planned = [t.name for t in twin.quantizable()]
    assert all(twin.tensors[n].type_name == "F32" for n in planned)
    assert any(q.tensors[n].type_name == "Q5_0" for n in planned)
    tables = SimpleNamespace(tensors={n: SimpleNamespace(types=("F32", "Q5_0", "Q8_0", "Q4_K")) for n in planned})
    allowed = allowed_types(twin, tables, PlanConfig(bpw=5.0, exclude_source=True))
    assert "Q5_0" not in allowed and "Q8_0" in allowed and "F32" in allowed

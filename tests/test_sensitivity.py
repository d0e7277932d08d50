import numpy as np
import pytest

from windq import ggml, registry
from windq.export.quantize import export_gguf
from windq.models.gguf_model import GGUFModel
from windq.pipeline.imatrix import load_imatrix
from windq.plan import make_plan
from windq.pipeline.sensitivity import Tables, chunk_widths, compute_tables, load_or_compute

from test_calibrate import FIXTURE


@pytest.fixture(scope="module")
def imatrix(synthetic_gguf):
    return load_imatrix(FIXTURE, GGUFModel(synthetic_gguf)).data


@pytest.fixture(scope="module")
def tables(synthetic_gguf, imatrix):
    return compute_tables(GGUFModel(synthetic_gguf), imatrix, group=128)


def test_error_ranks_q8_0_below_q4_k_below_q2_k(tables):
    for t in tables.tensors.values():
        e = dict(zip(t.types, t.tensor_error()))
        assert e["Q8_0"] < e["Q4_K"] < e["Q2_K"], t.name
        assert e["F32"] == 0.0


@pytest.mark.slow  # every type's chunk tables (4 s); make test runs it, make test-fast does not
def test_chunks_sum_to_the_whole_tensor(synthetic_gguf, imatrix, tables):
    whole = compute_tables(GGUFModel(synthetic_gguf), imatrix, group=None)
    for name, t in tables.tensors.items():
        w = whole.tensors[name]
        assert t.types == w.types and w.error.shape[1] == 1
        np.testing.assert_allclose(t.error.sum(axis=1), w.error[:, 0], rtol=1e-12)
        assert np.array_equal(t.nbytes.sum(axis=1), w.nbytes[:, 0])


def test_table_is_bit_exact_with_the_exported_file(synthetic_gguf, imatrix, tables, tmp_path):
    m = GGUFModel(synthetic_gguf)
    cycle = ["Q2_K", "IQ2_XS", "Q4_K", "IQ4_NL", "Q5_0", "Q8_0"]
    plan = make_plan(m, {t.name: cycle[i % len(cycle)] for i, t in enumerate(m.quantizable())}, method="manual")
    out = GGUFModel(export_gguf(m, plan, tmp_path / "x.gguf", imatrix=imatrix).path)
    mean_imp = float(np.mean([v.mean() for v in imatrix.values()]))
    for name, type_name in plan.tensors.items():
        t = tables.tensors[name]
        i = t.types.index(type_name)
        w = m.dequantized(name)
        q = out.dequantized(name)
        # what the table quantized is exactly what the file holds ...
        assert np.array_equal(q, ggml.round_trip(registry.get(type_name).id, w, imatrix.get(name)))
        # ... and its error is the activation-weighted distance to it
        imp = imatrix.get(name, np.full(w.shape[1], mean_imp, dtype=np.float32))
        col = ((w.astype(np.float64) - q) ** 2).sum(axis=0) * imp
        np.testing.assert_allclose(t.error[i].sum(), col.sum(), rtol=1e-6)
        assert t.nbytes[i].sum() == out.tensors[name].nbytes


def test_chunk_legality_follows_block_size(tables):
    t = tables.tensors["blk.0.ffn_down.weight"]  # 512 columns, chunks of 128
    legal = dict(zip(t.types, t.chunk_legal))
    assert legal["Q4_0"].all() and not legal["Q4_K"].any()
    assert list(chunk_widths(576, 256)) == [256, 256, 64]


def test_tables_are_cached(synthetic_gguf, imatrix, tmp_path):
    m = GGUFModel(synthetic_gguf)
    a = load_or_compute(m, imatrix, tmp_path, group=256, imatrix_sha256="x", allowed=("Q8_0", "Q4_0"))
    files = list(tmp_path.glob("sensitivity-g256-*.npz"))
    assert len(files) == 1
    b = Tables.load(files[0])
    for name in a.tensors:
        assert np.array_equal(a.tensors[name].error, b.tensors[name].error)
    assert a.tensors["blk.0.attn_q.weight"].types == ("Q4_0", "Q8_0")


@pytest.mark.slow  # the real default model
def test_source_type_costs_nothing(default_gguf, tmp_path):
    """llama.cpp copies a tensor already in the planned type; the table says its error is zero."""
    m = GGUFModel(default_gguf)
    name = "blk.0.attn_q.weight"
    assert m.tensors[name].type_name == "Q4_1"
    t = compute_tables(m, None, group=None, allowed=("Q4_1", "Q5_0", "Q8_0"), only=[name]).tensors[name]
    e = dict(zip(t.types, t.tensor_error()))
    assert e["Q4_1"] == 0.0 and e["Q5_0"] > 0 and e["Q8_0"] > 0
    plan = make_plan(m, {n: "Q4_1" if n == name else "Q8_0" for n in (x.name for x in m.quantizable())}, method="manual")
    out = GGUFModel(export_gguf(m, plan, tmp_path / "x.gguf").path)
    assert out.raw(name).tobytes() == m.raw(name).tobytes()


def test_row_sampling_estimates_the_full_tables(synthetic_gguf, synthetic_stats):
    """Tables from about a quarter of each tensor's rows (systematic over rows sorted by their
    predicted error, each counting for the rows it stands for) are close to the full ones; bytes are
    exact; a sample as large as the tensor is the full computation; the two are cached apart."""
    import json

    from windq.pipeline.calibrate import load_fisher
    from windq.pipeline.sensitivity import cache_key, sample_row_indices

    m = GGUFModel(synthetic_gguf)
    im = load_imatrix(synthetic_stats / "imatrix.gguf", m).data
    fisher, ctx = load_fisher(synthetic_stats), json.loads((synthetic_stats / "calibration.json").read_text())["ctx"]
    only = ("blk.0.ffn_down.weight", "blk.1.attn_q.weight", "token_embd.weight")
    allowed = ("Q8_0", "Q4_K", "Q2_K", "IQ2_XS")
    kw = dict(group=256, allowed=allowed, fisher=fisher, tokens_per_sequence=ctx, only=only)
    full = compute_tables(m, im, **kw)
    sampled = compute_tables(m, im, sample_rows=64, **kw)
    for name, f in full.tensors.items():
        s = sampled.tensors[name]
        assert s.types == f.types and np.array_equal(s.nbytes, f.nbytes)
        # random weights give every row the same error distribution, so a quarter of the rows
        # estimates a sum to a few % (measured: 2-6 % s.d. over seeds); an estimate that forgot
        # what each row stands for would be 4x off. The accuracy on a real model is a benchmark
        # (evaluators/table_sampling.py), not a test.
        np.testing.assert_allclose(s.tensor_error(), f.tensor_error(), rtol=0.15)
        np.testing.assert_allclose(s.kl.sum(axis=1), f.kl.sum(axis=1), rtol=0.15)
        assert not np.array_equal(s.error, f.error)  # it did sample
    same = compute_tables(m, im, sample_rows=10_000, **kw)
    for name, f in full.tensors.items():
        assert np.array_equal(same.tensors[name].error, f.error) and np.array_equal(same.tensors[name].kl, f.kl)
    rows, stands_for = sample_row_indices(m.dequantized(only[0]), im[only[0]], fisher[only[0]].rows, 64)
    assert len(rows) == 64 and len(set(rows.tolist())) == 64
    assert stands_for.sum() == pytest.approx(m.tensors[only[0]].n_elements // m.tensors[only[0]].n_per_row)
    assert cache_key("m", "i", 256, None, "f") != cache_key("m", "i", 256, None, "f", 64)
    with pytest.raises(Exception, match="sample rows 0"):
        compute_tables(m, im, sample_rows=0, **kw)

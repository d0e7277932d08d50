"""The FFN split (#21): a llama model rewritten as llama.cpp's granitemoe, each FFN cut into two
neuron groups (shared expert + one routed expert), computes the same function in stock llama.cpp,
and each group can then be stored in its own type."""

import gguf
import numpy as np
import pytest

from helpers import stock_quantize
from windq.errors import InputError, UnsupportedModelError
from windq.evaluators.perplexity import evaluate
from windq.export.quantize import export_gguf
from windq.models.ffn_split import neuron_order, split_ffn_gguf
from windq.models.gguf_model import GGUFModel
from windq.models.synthetic import SyntheticConfig, write_synthetic_gguf
from windq.plan import make_plan

N_FF = 512


@pytest.fixture(scope="module")
def split(synthetic_gguf, tmp_path_factory):
    """The synthetic llama split at 256 of 512 neurons, each layer's neurons shuffled first."""
    rng = np.random.default_rng(1)
    order = {i: rng.permutation(N_FF) for i in range(2)}
    return split_ffn_gguf(GGUFModel(synthetic_gguf), tmp_path_factory.mktemp("split") / "split.gguf", 256, order), order


def test_split_computes_the_same_function_in_llama_cpp(synthetic_gguf, split, sample_text):
    report, _ = split
    ref = evaluate(synthetic_gguf, sample_text, ctx=128, max_chunks=4)
    got = evaluate(report.path, sample_text, ctx=128, max_chunks=4, ref_path=synthetic_gguf)
    assert got.ppl == pytest.approx(ref.ppl, rel=1e-4)
    assert got.kld < 1e-6 and got.top1 == 1.0


def test_split_layout(synthetic_gguf, split):
    """granitemoe with one routed expert; each group holds exactly its neurons' rows and columns."""
    report, order = split
    src, m = GGUFModel(synthetic_gguf), GGUFModel(report.path)
    assert m.architecture == "granitemoe"
    assert m.arch_field("{arch}.expert_count") == 1 and m.arch_field("{arch}.expert_used_count") == 1
    assert m.arch_field("{arch}.feed_forward_length") == N_FF - 256
    assert m.arch_field("{arch}.expert_shared_feed_forward_length") == 256
    for layer, p in order.items():
        gate = src.dequantized(f"blk.{layer}.ffn_gate.weight")
        down = src.dequantized(f"blk.{layer}.ffn_down.weight")
        assert np.array_equal(m.dequantized(f"blk.{layer}.ffn_gate_shexp.weight"), gate[p[:256]])
        assert np.array_equal(m.dequantized(f"blk.{layer}.ffn_gate_exps.weight"), gate[p[256:]])
        assert np.array_equal(m.dequantized(f"blk.{layer}.ffn_down_shexp.weight"), down[:, p[:256]])
        assert np.array_equal(m.dequantized(f"blk.{layer}.ffn_down_exps.weight"), down[:, p[256:]])
        assert m.tensors[f"blk.{layer}.ffn_down_exps.weight"].shape == (N_FF - 256, 256, 1)  # ggml order
    # everything outside the FFNs is the source's, and the router is never quantized
    assert np.array_equal(m.dequantized("blk.1.attn_q.weight"), src.dequantized("blk.1.attn_q.weight"))
    assert "blk.0.ffn_gate_inp.weight" not in {t.name for t in m.quantizable()}


def test_each_group_gets_its_own_type(split, sample_text, tmp_path):
    """Salient neurons in Q8_0, the rest in Q4_K, written by llama.cpp's quantizer and read back."""
    report, _ = split
    m = GGUFModel(report.path)
    types = {t.name: ("Q8_0" if "shexp" in t.name else "Q4_K") for t in m.quantizable()}
    out = export_gguf(m, make_plan(m, types, method="test", budget_bpw=None), tmp_path / "two.gguf").path
    written = GGUFModel(out)
    assert written.tensors["blk.0.ffn_down_shexp.weight"].type_name == "Q8_0"
    assert written.tensors["blk.0.ffn_down_exps.weight"].type_name == "Q4_K"
    assert evaluate(out, sample_text, ctx=128, max_chunks=2, ref_path=report.path).kld < 0.5


def test_neuron_order_ranks_by_contribution(synthetic_gguf):
    m = GGUFModel(synthetic_gguf)
    imatrix = {n: np.ones(m.tensors[n].n_per_row, np.float32) for n in m.tensors}
    imatrix["blk.0.ffn_down.weight"][7] = 1e6  # neuron 7's activation dominates
    order = neuron_order(m, imatrix)
    assert sorted(order) == [0, 1]
    assert order[0][0] == 7 and np.array_equal(np.sort(order[0]), np.arange(N_FF))
    down = m.dequantized("blk.1.ffn_down.weight")
    assert np.argmax((down**2).sum(0)) == order[1][0]  # uniform activations: the largest column first


def test_refusals(synthetic_gguf, tmp_path):
    m = GGUFModel(synthetic_gguf)
    for bad in (0, N_FF):
        with pytest.raises(InputError, match="salient width"):
            split_ffn_gguf(m, tmp_path / "x.gguf", bad)
    with pytest.raises(InputError, match="not a permutation"):
        split_ffn_gguf(m, tmp_path / "x.gguf", 256, {0: np.zeros(N_FF, np.int64)})
    qwen = write_synthetic_gguf(tmp_path / "qwen2.gguf", SyntheticConfig(architecture="qwen2"))
    with pytest.raises(UnsupportedModelError, match="not 'qwen2'"):
        split_ffn_gguf(GGUFModel(qwen), tmp_path / "x.gguf", 256)
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.slow
def test_default_model_split_is_exact_at_f32(default_gguf, sample_text, tmp_path):
    """SmolLM2 (Q4_1) decoded to F32 by llama.cpp, against its split (1536 = 512 + 1024 neurons)."""
    src = GGUFModel(default_gguf)
    f32 = stock_quantize(default_gguf, tmp_path / "f32.gguf", "F32")
    report = split_ffn_gguf(src, tmp_path / "split.gguf", 512)
    ref = evaluate(f32.path, sample_text, ctx=256, max_chunks=4)
    got = evaluate(report.path, sample_text, ctx=256, max_chunks=4, ref_path=f32.path)
    assert got.ppl == pytest.approx(ref.ppl, rel=1e-4)
    assert got.kld < 1e-5


@pytest.fixture(scope="module")
def split_workspace_(synthetic_gguf, synthetic_stats, tmp_path_factory):
    from windq.pipeline.split import split_workspace

    return split_workspace(GGUFModel(synthetic_gguf), synthetic_stats, 256, tmp_path_factory.mktemp("ws"))


def test_split_calibration_is_the_sources_sliced(synthetic_gguf, synthetic_stats, split_workspace_):
    """Each split tensor's imatrix, activation statistics and Fisher are its source tensor's, sliced
    as its weights were; the split model records where each neuron came from."""
    from windq.models.ffn_split import read_split
    from windq.pipeline.calibrate import load_activation_stats, load_fisher
    from windq.pipeline.imatrix import load_imatrix

    report, stats = split_workspace_
    src, m = GGUFModel(synthetic_gguf), GGUFModel(report.path)
    salient, order = read_split(m)
    im_src = load_imatrix(synthetic_stats / "imatrix.gguf", src).data
    assert salient == 256 and np.array_equal(order[0], neuron_order(src, im_src)[0])
    im = load_imatrix(stats / "imatrix.gguf", m).data  # also checks every row length against the split model
    f_src, f = load_fisher(synthetic_stats), load_fisher(stats)
    a_src, a = load_activation_stats(synthetic_stats), load_activation_stats(stats)
    for layer, p in order.items():
        down, gate = f"blk.{layer}.ffn_down.weight", f"blk.{layer}.ffn_gate.weight"
        for part, idx in (("shexp", p[:256]), ("exps", p[256:])):
            d, g = f"blk.{layer}.ffn_down_{part}.weight", f"blk.{layer}.ffn_gate_{part}.weight"
            assert np.array_equal(im[d], im_src[down][idx]) and np.array_equal(im[g], im_src[gate])
            assert np.array_equal(a[d]["abs_max"], a_src[down]["abs_max"][idx])
            assert np.array_equal(f[d].cols, f_src[down].cols[idx]) and np.array_equal(f[d].rows, f_src[down].rows)
            assert np.array_equal(f[g].rows, f_src[gate].rows[idx]) and np.array_equal(f[g].cols, f_src[gate].cols)
    assert np.array_equal(im["blk.0.attn_q.weight"], im_src["blk.0.attn_q.weight"])


@pytest.mark.slow  # the split model's tables (17 s); make test runs it, make test-fast does not
def test_split_model_plans_exports_and_refuses_verification(split_workspace_, tmp_path):
    """The planner plans the split model under a budget, each group its own type, and export writes
    exactly that; the torch verification, which cannot run granitemoe, is refused before any work."""
    from windq.errors import UnsupportedModelError
    from windq.pipeline.planner import PlanConfig, run_planner

    report, stats = split_workspace_
    m = GGUFModel(report.path)
    with pytest.raises(UnsupportedModelError, match="--no-verify"):
        run_planner(m, stats, PlanConfig(bpw=5.0, verify=True))
    with pytest.raises(UnsupportedModelError, match="real-loss-tokens 0"):
        run_planner(m, stats, PlanConfig(bpw=5.0, method="ppo"))
    res = run_planner(m, stats, PlanConfig(bpw=4.5, verify=False))
    assert res.plan.achieved_bpw <= 4.5
    from windq.pipeline.imatrix import load_imatrix

    imatrix = load_imatrix(stats / "imatrix.gguf", m).data  # what llama.cpp's quantizer reads for the experts
    written = export_gguf(m, res.plan, tmp_path / "planned.gguf", imatrix=imatrix).path
    assert {n: GGUFModel(written).tensors[n].type_name for n in res.plan.tensors} == dict(res.plan.tensors)


def test_split_cli(synthetic_gguf, synthetic_stats, tmp_path):
    from helpers import assert_one_line_error, windq

    r = windq("split", synthetic_gguf, "--stats", synthetic_stats, "--salient", 256, "--out", tmp_path / "s")
    assert r.returncode == 0, r.stderr
    assert "256 salient + 256 others" in r.stdout
    assert (tmp_path / "s" / "model.gguf").is_file() and (tmp_path / "s" / "stats" / "imatrix.gguf").is_file()
    bad = windq("split", synthetic_gguf, "--stats", synthetic_stats, "--salient", 512, "--out", tmp_path / "t")
    assert_one_line_error(bad, "salient width 512")
    assert not (tmp_path / "t" / "model.gguf").exists()

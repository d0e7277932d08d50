"""The fitted objective (`kl-fit`): each tensor's predicted KL scaled to the real KL it causes alone."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from windq.errors import CalibrationError
from windq.keys import CalibrationFiles
from windq.models.gguf_model import GGUFModel
from windq.pipeline import kl_fit
from windq.pipeline.calibrate import load_tokens
from windq.pipeline.imatrix import load_imatrix
from windq.pipeline.planner import PlanConfig, load_tables, run_planner
from windq.pipeline.real_loss import RealLoss
from windq.pipeline.sensitivity import TensorTable


@pytest.fixture()
def stats(synthetic_gguf, synthetic_stats, tmp_path):
    """A copy of the session's calibration folder, whose tables the other planner tests share (built
    there first if none has yet): the fit writes its cache into the copy."""
    model = GGUFModel(synthetic_gguf)
    im = load_imatrix(synthetic_stats / CalibrationFiles.IMATRIX, model)
    load_tables(model, synthetic_stats, im.data, im.sha256())
    return shutil.copytree(synthetic_stats, tmp_path / "stats")


def test_kl_alone_measures_each_tensor_with_every_other_at_the_source(synthetic_gguf):
    """One tensor quantized at a time, the rest as the file holds them, whatever plan the judge
    held before: the same KL a fresh judge gives that one tensor, and the judge left at the source."""
    model = GGUFModel(synthetic_gguf)
    tokens = np.random.default_rng(0).integers(3, 259, (2, 32))
    names = [t.name for t in model.quantizable()][:2]
    judge = RealLoss(model, None, tokens)
    judge.kl({t.name: "Q4_0" for t in model.quantizable()})  # a whole plan written first
    alone = judge.kl_alone([(n, "Q4_0") for n in names])
    assert judge.kl({}) == 0.0
    fresh = [RealLoss(model, None, tokens).kl({n: "Q4_0"}) for n in names]
    np.testing.assert_allclose(alone, fresh, rtol=1e-9)
    assert alone.min() > 1e-4
    streamed = RealLoss(model, None, tokens, stream=True)  # one module's weights at a time: the same
    streamed.kl({t.name: "Q4_0" for t in model.quantizable()})
    np.testing.assert_allclose(streamed.kl_alone([(n, "Q4_0") for n in names]), alone, rtol=1e-5)
    assert streamed.kl({}) == 0.0


def test_probe_is_the_legal_type_nearest_the_probe_bits_that_has_an_error():
    n = 256 * 4  # 1,024 weights: bytes × 8 ÷ n bits per weight
    table = TensorTable(
        "w", (4, 256), ("IQ2_XXS", "Q3_K", "Q4_K", "Q8_0"), np.array([256]),
        error=np.ones((4, 1)), nbytes=np.array([[264], [440], [576], [1088]]), kl=np.array([[4.0], [2.0], [1.0], [0.0]]),
    )  # fmt: skip
    assert [8 * b / n for b in (264, 440, 576)] == [2.0625, 3.4375, 4.5]
    assert kl_fit.probe_type(table, "F32") == "Q3_K"
    assert kl_fit.probe_type(table, "Q3_K") == "Q4_K"  # the source type is copied, error-free
    zero = TensorTable("w", (4, 256), ("Q8_0",), np.array([256]), np.ones((1, 1)), np.array([[1088]]), kl=np.zeros((1, 1)))
    assert kl_fit.probe_type(zero, "F32") is None  # nothing to scale


def test_the_fitted_kl_at_the_probe_is_the_real_kl_the_tensor_causes_alone(synthetic_gguf, stats, monkeypatch):
    """Per tensor, the fitted row is the predicted row times one factor, and at the probe type it is
    exactly the real KL of that tensor alone on the fitting tokens (calibration chunks, not the
    judge's); a second call reads the cache and measures nothing."""
    model = GGUFModel(synthetic_gguf)
    im = load_imatrix(stats / CalibrationFiles.IMATRIX, model)
    tables = load_tables(model, stats, im.data, im.sha256())
    fitted = kl_fit.load_or_fit(model, stats, tables, im.data)
    tokens = kl_fit.fit_tokens(load_tokens(stats))
    assert tokens.shape == (2, 128)
    judge = RealLoss(model, im.data, tokens)
    names = list(fitted.tensors)
    for name in names[:: max(1, len(names) // 3)]:  # the first, a middle and a last one, measured again
        t = fitted.tensors[name]
        probe = kl_fit.probe_type(t, model.source_type(name))
        judge.reset()
        assert t.kl_fit[t.types.index(probe)].sum() == pytest.approx(judge.kl({name: probe}), rel=1e-6)
    scales = []
    for t in fitted.tensors.values():
        scale = t.kl_fit.sum() / t.kl.sum()
        np.testing.assert_allclose(t.kl_fit, t.kl * scale, rtol=1e-9)
        scales.append(scale)
    assert np.ptp(scales) > 0.1  # the scales differ between tensors: a fit, not one constant

    def no_measuring(*a, **k):
        raise AssertionError("measured again")

    monkeypatch.setattr(kl_fit, "fit", no_measuring)
    again = kl_fit.load_or_fit(model, stats, tables, im.data)
    for name, t in again.tensors.items():
        np.testing.assert_array_equal(t.kl_fit, fitted.tensors[name].kl_fit)
    path = next(stats.glob("kl-fit-*.json"))
    cached = json.loads(path.read_text())
    assert cached["tokens"] == 256 and set(cached["tensors"]) == set(tables.tensors)
    path.write_text(json.dumps({"tensors": {"x": {"probe": "Q4_0"}}}))  # a folder handed over with a broken cache
    with pytest.raises(CalibrationError, match="not a kl-fit cache"):
        kl_fit.load_or_fit(model, stats, tables, im.data)


def test_a_plan_with_the_fitted_objective_minimises_it(synthetic_gguf, stats):
    model = GGUFModel(synthetic_gguf)
    res = run_planner(model, stats, PlanConfig(bpw=5.0, objective="kl-fit"))
    im = load_imatrix(stats / CalibrationFiles.IMATRIX, model)
    fitted = kl_fit.load_or_fit(model, stats, load_tables(model, stats, im.data, im.sha256()), im.data)
    predicted = sum(float(fitted.tensors[n].kl_fit[fitted.tensors[n].types.index(t)].sum()) for n, t in res.plan.tensors.items())
    assert res.plan.provenance["objective"] == "kl-fit"
    assert res.plan.provenance["predicted_error"] == pytest.approx(predicted, rel=1e-9)
    plain = run_planner(model, stats, PlanConfig(bpw=5.0, objective="kl"))
    assert plain.plan.provenance["predicted_error"] != pytest.approx(predicted, rel=1e-6)

"""The predicted KL expanded around a plan (`kl-local`): the real loss's gradient there, the Fisher
for the second-order part, and the knapsack over the expansion."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from windq.errors import InputError
from windq.keys import CalibrationFiles
from windq.models.gguf_model import GGUFModel
from windq.pipeline import allocate, fidelity, kl_local
from windq.pipeline.calibrate import load_fisher, load_tokens, tokens_per_sequence
from windq.pipeline.imatrix import load_imatrix
from windq.pipeline.planner import load_tables
from windq.pipeline.real_loss import RealLoss


def _set(judge: RealLoss, tensor: str, w: np.ndarray) -> None:
    slot = judge.params[tensor]
    with torch.no_grad():
        slot.of(slot.param).copy_(torch.from_numpy(np.ascontiguousarray(w)).view(slot.shape))


def test_kl_gradient_is_the_derivative_of_the_real_loss(synthetic_gguf):
    """At a whole plan, the gradient along the line from one tensor's Q4_0 weights to its Q8_0
    weights is the central difference of the measured KL (llama's Q and K included, whose torch rows
    are a permutation of the file's), and the judge is left holding the plan."""
    model = GGUFModel(synthetic_gguf)
    tokens = np.random.default_rng(0).integers(3, 259, (2, 32))
    judge = RealLoss(model, None, tokens)
    at = {t.name: "Q4_0" for t in model.quantizable()}
    grads = judge.kl_gradient(at)
    held = judge.kl({})  # nothing written: what the judge holds
    assert held == judge.kl(at) > 0.1
    for name in ("token_embd.weight", "blk.0.attn_q.weight", "blk.1.ffn_down.weight"):
        w0, w1 = judge.weights(name, "Q4_0"), judge.weights(name, "Q8_0")
        d = (w1 - w0).reshape(grads[name].shape)
        kl = []
        for eps in (0.1, -0.1):
            _set(judge, name, w0 + eps * (w1 - w0))
            kl.append(judge.kl({}))
        _set(judge, name, w0)
        assert float((grads[name] * d).sum()) == pytest.approx((kl[0] - kl[1]) / 0.2, rel=2e-2)


@pytest.fixture(scope="module")
def expansion(synthetic_gguf, synthetic_stats):
    """The kl optimum at 3.5 bits and its expansion, shared by the tests below (each expansion
    quantizes every tensor to every type and takes a gradient)."""
    model = GGUFModel(synthetic_gguf)
    im = load_imatrix(synthetic_stats / CalibrationFiles.IMATRIX, model)
    tables = load_tables(model, synthetic_stats, im.data, im.sha256())
    fisher, ctx = load_fisher(synthetic_stats), tokens_per_sequence(synthetic_stats)
    judge = RealLoss(model, im.data, kl_local.gradient_tokens(load_tokens(synthetic_stats)))
    base = allocate.build_problem(model, tables, objective="kl")
    at = allocate.tensor_types(base, allocate.knapsack(base, 3.5))
    rows = kl_local.expand(judge, tables, fisher, ctx, at)
    return model, tables, judge, base, at, rows, fisher, ctx


def test_the_expansion_is_the_tables_change_plus_the_real_gradients_departure_from_theirs(expansion):
    """Algebra the expansion must satisfy, tensor by tensor: with F the tables' rank-one diagonal
    Fisher and Δ⁰ the error at the plan expanded around, moving a tensor by d changes the predicted
    KL by g·d + ½ d F d, and the tables' own change is ½ (Δ⁰+d) F (Δ⁰+d) − ½ Δ⁰ F Δ⁰; the two differ
    by exactly (g − F Δ⁰)·d, the real gradient's departure from the one the tables imply. So the
    Fisher's rows meet the torch rows they belong to (llama's Q and K are permuted), in the tables'
    units, and the expansion is 0 at its own plan."""
    model, tables, judge, base, at, rows, fisher, ctx = expansion
    grads = judge.kl_gradient(at)
    from windq.pipeline.calibrate import hf_row_order

    checked = 0
    for name, t in tables.tensors.items():
        i0 = t.types.index(at[name])
        assert rows[name][i0] == 0.0
        g = grads[name].reshape(-1, grads[name].shape[-1]).astype(np.float64)
        f = fisher[name]
        r = f.rows[hf_row_order(judge.processor, name, len(f.rows))].astype(np.float64)
        fisher_w = np.outer(r, f.cols) / (f.rows.sum() * ctx)  # F per token
        w = judge.weights(name, None).reshape(g.shape).astype(np.float64)
        delta0 = judge.weights(name, at[name]).reshape(g.shape) - w
        for i in range(len(t.types)):
            d = judge.weights(name, t.types[i]).reshape(g.shape) - w - delta0
            departure = float(((g - fisher_w * delta0) * d).sum())
            tables_change = float(t.kl[i].sum() - t.kl[i0].sum())
            assert rows[name][i] - tables_change == pytest.approx(departure, rel=1e-3, abs=1e-6 * abs(rows[name][i]) + 1e-9)
            checked += 1
    assert checked > 50


def test_the_local_problem_orders_plans_by_the_expansion(expansion):
    """Any plan's error in the local problem less the expanded plan's is the sum of its tensors'
    predicted changes: the per-unit shift is a constant."""
    model, tables, judge, base, at, rows, fisher, ctx = expansion
    p = kl_local.local_problem(base, tables, rows)
    at_choice = np.array([u.types.index(at[u.tensor]) for u in p.units])
    rng = np.random.default_rng(0)
    for _ in range(5):
        choice = np.array([rng.integers(len(u.types)) for u in p.units])
        predicted = sum(rows[u.tensor][tables.tensors[u.tensor].types.index(u.types[c])] for u, c in zip(p.units, choice))
        assert p.error_of(choice) - p.error_of(at_choice) == pytest.approx(predicted, rel=1e-9, abs=1e-12)
    assert min(float(u.error.min()) for u in p.units) == 0.0
    chunked = allocate.build_problem(model, tables, granularity="chunk:256", objective="kl")
    with pytest.raises(InputError, match="one type per tensor"):
        kl_local.local_problem(chunked, tables, rows)


def test_fidelity_judges_kl_local_per_budget(synthetic_gguf, synthetic_stats):
    model = GGUFModel(synthetic_gguf)
    kl, local = fidelity.run(model, synthetic_stats, [3.5], rivals=3, objectives=("kl", "kl-local"), tokens=512)
    assert (kl.objective, local.objective) == ("kl", "kl-local")
    assert len(local.real) == 4 and local.bits.max() <= 3.5 + 1e-9
    assert local.predicted[0] == local.predicted.min()  # the expansion's own optimum comes first


def test_relinearizing_expands_again_around_the_last_optimum(expansion):
    model, tables, judge, base, at, rows, fisher, ctx = expansion
    first = kl_local.local_problem(base, tables, rows)  # problem_at without relinearizing
    moved = allocate.tensor_types(first, allocate.knapsack(first, 3.5))
    assert moved != at  # the first expansion's optimum is another plan, so the second expansion differs
    again = kl_local.problem_at(base, 3.5, judge, tables, fisher, ctx, relinearize=1)
    expected = kl_local.local_problem(base, tables, kl_local.expand(judge, tables, fisher, ctx, moved))
    for u, v in zip(again.units, expected.units):
        np.testing.assert_allclose(u.error, v.error, rtol=1e-6, atol=1e-12)
    assert any(not np.allclose(u.error, v.error) for u, v in zip(again.units, first.units))

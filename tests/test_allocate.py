import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from windq.errors import BudgetError
from windq.pipeline.allocate import (
    SLACK, Problem, Unit, greedy_fill, knapsack, project_to_tensors, random_plan, solve_exact, solve_lagrangian,
)  # fmt: skip


def random_problem(rng: np.random.Generator, n_units: int, n_types: int) -> Problem:
    units = []
    for i in range(n_units):
        k = int(rng.integers(1, n_types + 1))
        nbytes = np.sort(rng.choice(np.arange(10, 400), size=k, replace=False)).astype(np.int64)
        # more bytes, less error (as real types), with noise so the frontier is not trivial
        error = np.sort(rng.exponential(1.0, size=k))[::-1] * rng.uniform(0.1, 10)
        units.append(Unit(f"t{i}", 0, tuple(f"T{j}" for j in range(k)), nbytes, error))
    return Problem(tuple(units), fixed_bytes=int(rng.integers(0, 100)), n_weights=8 * 1000, granularity="tensor")


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n_units=st.integers(1, 40), n_types=st.integers(1, 6), frac=st.floats(0, 1))
def test_budget_is_never_exceeded(seed, n_units, n_types, frac):
    rng = np.random.default_rng(seed)
    p = random_problem(rng, n_units, n_types)
    lo, hi = p.reachable_bpw()
    bpw = lo + frac * (hi - lo)
    budget = p.budget_bytes(bpw)
    for solver in (knapsack, lambda p, b: random_plan(p, b, rng)):
        choice = solver(p, bpw)
        assert p.bytes_of(choice) <= budget
    assert p.bytes_of(solve_lagrangian(p, budget)) <= budget


def brute_force(p: Problem, budget: int) -> float:
    best = np.inf
    for combo in itertools.product(*(range(len(u.types)) for u in p.units)):
        c = np.array(combo)
        if p.bytes_of(c) <= budget:
            best = min(best, p.error_of(c))
    return best


@pytest.mark.parametrize("seed", range(25))
def test_exact_knapsack_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    p = random_problem(rng, n_units=int(rng.integers(2, 7)), n_types=4)
    lo, hi = p.reachable_bpw()
    budget = p.budget_bytes(lo + rng.uniform(0, 1) * (hi - lo))
    choice = solve_exact(p, budget)
    assert p.bytes_of(choice) <= budget
    assert p.error_of(choice) == pytest.approx(brute_force(p, budget))
    # the Lagrangian solver is a heuristic: never better than the optimum, never over budget
    lag = solve_lagrangian(p, budget)
    assert p.bytes_of(lag) <= budget and p.error_of(lag) >= p.error_of(choice) - 1e-9


@pytest.mark.parametrize("seed", range(4))
def test_bound_keeps_the_optimum_and_a_small_frontier(seed):
    """Branch and bound drops only states that cannot beat the Lagrangian plan: the same optimum as
    the plain programme, with a frontier small enough that a limit the plain one overruns holds."""
    rng = np.random.default_rng(seed)
    p = random_problem(rng, n_units=120, n_types=6)
    lo, hi = p.reachable_bpw()
    budget = p.budget_bytes(lo + rng.uniform(0.3, 0.7) * (hi - lo))
    plain = solve_exact(p, budget, limit=10**9, bound=False)
    bounded = solve_exact(p, budget, limit=2_000)
    assert solve_exact(p, budget, limit=2_000, bound=False) is None  # the plain frontier outgrows it
    assert bounded is not None and p.bytes_of(bounded) <= budget
    assert p.error_of(bounded) == pytest.approx(p.error_of(plain), rel=1e-12)


def test_knapsack_lands_within_slack_of_target():
    rng = np.random.default_rng(7)
    p = random_problem(rng, n_units=200, n_types=6)
    lo, hi = p.reachable_bpw()
    for frac in (0.1, 0.5, 0.9):
        bpw = lo + frac * (hi - lo)
        nbytes = p.bytes_of(knapsack(p, bpw))
        assert nbytes <= p.budget_bytes(bpw)  # budgets are whole bytes
        assert p.bpw(nbytes) >= bpw * (1 - SLACK)


def test_infeasible_target_names_the_reachable_range():
    p = random_problem(np.random.default_rng(1), 10, 3)
    lo, hi = p.reachable_bpw()
    with pytest.raises(BudgetError, match=f"{lo:.3f} to {hi:.3f}"):
        knapsack(p, lo * 0.9)


def test_greedy_fill_only_improves():
    p = random_problem(np.random.default_rng(3), 30, 5)
    cheapest = np.array([0] * len(p.units))
    budget = p.budget_bytes(sum(p.reachable_bpw()) / 2)
    filled = greedy_fill(p, cheapest, budget)
    assert p.bytes_of(filled) <= budget and p.error_of(filled) < p.error_of(cheapest)


def test_projection_keeps_chunk_types_and_budget():
    rng = np.random.default_rng(5)
    tensor_units, chunk_units = [], []
    for i in range(8):
        types = ("A", "B", "C")
        per_chunk_bytes = np.array([10, 20, 40])
        errs = [np.array([4.0, 2.0, 1.0]) * rng.uniform(0.5, 2) for _ in range(3)]
        for c in range(3):
            chunk_units.append(Unit(f"t{i}", c, types, per_chunk_bytes, errs[c]))
        tensor_units.append(Unit(f"t{i}", 0, types, per_chunk_bytes * 3, sum(errs)))
    cp = Problem(tuple(chunk_units), 0, 8 * 8 * 90, "chunk:1")
    tp = Problem(tuple(tensor_units), 0, 8 * 8 * 90, "tensor")
    bpw = cp.bpw(8 * 3 * 25)
    chunk_choice = knapsack(cp, bpw)
    tensor_choice = project_to_tensors(cp, chunk_choice, tp, bpw)
    assert tp.bytes_of(tensor_choice) <= tp.budget_bytes(bpw)
    for i, u in enumerate(tp.units):
        used = {cp.units[j].types[chunk_choice[j]] for j in range(len(cp.units)) if cp.units[j].tensor == u.tensor}
        assert u.types[tensor_choice[i]] in used
    # a chunk plan is at least as good on the proxy as any one-type-per-tensor plan
    assert cp.error_of(chunk_choice) <= tp.error_of(tensor_choice) + 1e-9

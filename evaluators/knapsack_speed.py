"""Benchmark: the exact knapsack with and without its branch-and-bound pruning, on a model's real
tables and on deeper problems made from them.

    python -m windq.evaluators.knapsack_speed --stats STATS [--model default] [--depths 1,2,3,4]

The programme's cost grows with the number of units (tensors), not with their size, so deeper
models are stood in for by stacking DEPTH copies of the model's tensors, each copy's errors scaled
by a seeded log-normal factor per tensor (σ 0.3) so the copies are not ties. At each budget, the
plain programme (`bound=False`, what windq ran before) and the bounded one are timed (median of
--repeats) and their optima compared. The predicted-KL objective, Q4_1-style source types
excluded with --exclude-source, as `windq plan` would plan. A benchmark, not a test: machines are
noisy; the ratio comes from one run.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import click
import numpy as np


def timed(fn, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


@click.command()
@click.option("--model", default="default", show_default=True)
@click.option("--stats", required=True, type=click.Path(file_okay=False), help="A `windq calibrate` folder of MODEL (its tables are built if missing).")
@click.option("--depths", default="1,2,3,4", show_default=True, help="Comma-separated: copies of the model's tensors stacked.")
@click.option("--bpw", "budgets_spec", default="4.0,4.5,5.0,5.5", show_default=True)
@click.option("--exclude-source", is_flag=True, help="Leave the tensors' source types out, as `windq plan --exclude-source`.")
@click.option("--repeats", default=3, show_default=True)
def main(model: str, stats: str, depths: str, budgets_spec: str, exclude_source: bool, repeats: int) -> None:
    from windq.keys import CalibrationFiles
    from windq.models.gguf_model import GGUFModel
    from windq.models.sources import resolve_model
    from windq.pipeline import allocate
    from windq.pipeline.imatrix import load_imatrix
    from windq.pipeline.planner import PlanConfig, allowed_types, load_tables

    m = GGUFModel(resolve_model(model))
    im = load_imatrix(Path(stats) / CalibrationFiles.IMATRIX, m)
    tables = load_tables(m, Path(stats), im.data, im.sha256())
    allowed = allowed_types(m, tables, PlanConfig(bpw=0.0, exclude_source=exclude_source))
    base = allocate.build_problem(m, tables, allowed=allowed, objective="kl")
    rng = np.random.default_rng(0)
    click.echo("| units | budget | plain (s) | bounded (s) | bounded ÷ plain | same optimum |")
    click.echo("|---:|---:|---:|---:|---:|---|")
    for depth in (int(d) for d in depths.split(",")):
        units = []
        for d in range(depth):
            scale = rng.lognormal(0.0, 0.3, len(base.units)) if d else np.ones(len(base.units))
            units += [allocate.Unit(f"{u.tensor}#{d}", 0, u.types, u.nbytes, u.error * s) for u, s in zip(base.units, scale)]
        p = allocate.Problem(tuple(units), base.fixed_bytes * depth, base.n_weights * depth, "tensor")
        for bpw in (float(b) for b in budgets_spec.split(",")):
            budget = p.check_budget(bpw)
            t_plain, plain = timed(lambda: allocate.solve_exact(p, budget, limit=10**9, bound=False), repeats)
            t_bound, bounded = timed(lambda: allocate.solve_exact(p, budget, limit=10**9), repeats)
            same = abs(p.error_of(plain) - p.error_of(bounded)) <= 1e-12 * abs(p.error_of(plain))
            click.echo(f"| {len(units)} | {bpw:g} | {t_plain:.3f} | {t_bound:.3f} | {t_bound / t_plain:.3f} | {'yes' if same else 'NO'} |")


if __name__ == "__main__":
    main()

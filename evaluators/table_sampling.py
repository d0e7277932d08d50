"""Benchmark: how far row-sampled sensitivity tables are from the full computation, and how much
time they save.

    python -m windq.evaluators.table_sampling --stats STATS [--model default] [--rows 256,512]

For each sample size, every (tensor, type) entry's whole-tensor proxy error and predicted KL is
compared with the full tables' (relative error; entries of zero error, the source type copied,
are left out), and what the planner would lose: at each budget, the knapsack on the sampled
tables, scored by the full tables, against the knapsack on the full ones (predicted KL, relative
excess). Tables of either kind are cached in the calibration folder under their own keys, so a
build time is measured only when that build ran here (null otherwise).
A benchmark, not a test: machines are noisy.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click
import numpy as np


def relative_errors(full, sampled) -> dict[str, np.ndarray]:
    """|sampled − full| / full per (tensor, type) of nonzero full error, for "proxy" and "kl"."""
    out: dict[str, list[float]] = {"proxy": [], "kl": []}
    for name, f in full.tensors.items():
        s = sampled.tensors[name]
        for i, ty in enumerate(f.types):
            j = s.types.index(ty)
            for key, a, b in (("proxy", f.error, s.error), ("kl", f.kl, s.kl)):
                if a is None or b is None:
                    continue
                whole = float(a[i].sum())
                if whole > 0:
                    out[key].append(abs(float(b[j].sum()) - whole) / whole)
    return {k: np.asarray(v) for k, v in out.items()}


@click.command()
@click.option("--model", default="default", show_default=True)
@click.option("--stats", required=True, type=click.Path(file_okay=False), help="A `windq calibrate` folder of MODEL.")
@click.option("--rows", default="256,512", show_default=True, help="Comma-separated sample sizes (rows per tensor).")
@click.option("--bpw", "budgets_spec", default="4.5,5.0,5.5", show_default=True, help="Budgets at which the plans are compared.")
@click.option("--threads", type=int, default=None, help="Worker threads (default: all cores).")
def main(model: str, stats: str, rows: str, budgets_spec: str, threads: int | None) -> None:
    from windq.keys import CalibrationFiles
    from windq.models.gguf_model import GGUFModel
    from windq.models.sources import resolve_model
    from windq.pipeline.imatrix import load_imatrix
    from windq.pipeline.planner import load_tables, tables_path
    from windq.pipeline import allocate

    m = GGUFModel(resolve_model(model))
    statsdir = Path(stats)
    im = load_imatrix(statsdir / CalibrationFiles.IMATRIX, m)
    cached = tables_path(m, statsdir, im.sha256()).is_file()
    t0 = time.perf_counter()
    full = load_tables(m, statsdir, im.data, im.sha256(), threads=threads)
    full_s = None if cached else round(time.perf_counter() - t0, 1)
    budgets = [float(b) for b in budgets_spec.split(",")]
    report = {"model": m.path.name, "full_tables_s": full_s, "samples": []}
    full_p = allocate.build_problem(m, full, objective="kl")
    best = {b: full_p.error_of(allocate.knapsack(full_p, b)) for b in budgets}
    for n in (int(r) for r in rows.split(",")):
        cached_n = tables_path(m, statsdir, im.sha256(), sample_rows=n).is_file()
        t0 = time.perf_counter()
        sampled = load_tables(m, statsdir, im.data, im.sha256(), threads=threads, sample_rows=n)
        secs = None if cached_n else round(time.perf_counter() - t0, 1)
        errs = relative_errors(full, sampled)
        sampled_p = allocate.build_problem(m, sampled, objective="kl")
        # the same units in the same order (tables differ in errors only), so a choice carries over
        regret = {f"{b:g}": round(full_p.error_of(allocate.knapsack(sampled_p, b)) / best[b] - 1, 5) for b in budgets}
        report["samples"].append({
            "rows": n, "seconds": secs, "plan_predicted_kl_excess": regret,
            "tensors_sampled": sum(1 for t in m.quantizable() if t.n_elements // t.n_per_row > n),
            **{f"{k}_rel_error": {"median": round(float(np.median(v)), 5), "p95": round(float(np.quantile(v, 0.95)), 5),
                                  "max": round(float(v.max()), 5), "within_2pct": round(float(np.mean(v <= 0.02)), 4),
                                  "entries": int(v.size)} for k, v in errs.items() if v.size},
        })  # fmt: skip
    click.echo(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

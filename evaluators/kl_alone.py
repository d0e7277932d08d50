"""Measurement: how well the tables' predicted KL matches the real KL, tensor by tensor and plan by plan.

    python -m windq.evaluators.kl_alone --stats STATS [--align 256] [--tensors 30] [--tokens 1024]

A seeded sample of tensors is quantized one at a time (every other tensor as the file holds it) to
the legal types nearest 2.1, 3.4 and 4.5 bits per weight, and the real KL each causes alone,
KL(source ‖ source with that tensor quantized), is measured on the judge's first --tokens tokens
beside the tables' prediction. Then the predicted-KL knapsack's optimum at each --bpw is measured
whole. Q4_1-style source types are left out, as `--exclude-source`. What it answers: whether a
per-tensor scale would correct the prediction (does real ÷ predicted vary across tensors more than
across a tensor's types?), and how far a plan's real KL is from the sum of its tensors' predictions
(interactions; with --sum-alone, against the sum of its tensors' real KL alone). The objective `kl-fit` (pipeline/kl_fit.py) came out of it.
"""

from __future__ import annotations

import json

import click
import numpy as np


def summarize(rows: list[dict]) -> dict:
    """Per tensor, log(real ÷ predicted) at its three types, and how much of their spread across
    tensors a per-tensor scale fitted at the middle type would remove (standard deviations)."""
    by: dict[str, list[float]] = {}
    for r in rows:
        by.setdefault(r["tensor"], []).append(np.log(r["real"] / r["predicted"]) if r["predicted"] > 0 and r["real"] > 0 else np.nan)
    lr = np.array([v for v in by.values() if len(v) == 3])
    if not len(lr):
        return {}
    return {
        "real_over_predicted": {q: float(np.exp(f(lr))) for q, f in (("min", np.nanmin), ("median", np.nanmedian), ("max", np.nanmax))},
        "log_ratio_sd_low_type": {"raw": float(np.nanstd(lr[:, 0])), "scaled_by_middle": float(np.nanstd(lr[:, 0] - lr[:, 1]))},
        "log_ratio_sd_high_type": {"raw": float(np.nanstd(lr[:, 2])), "scaled_by_middle": float(np.nanstd(lr[:, 2] - lr[:, 1]))},
    }


def kl_problem(model: str, stats: str, align: str):
    """The model (aligned to WIDTH unless `align` is none), its calibration folder, imatrix and
    tables, and the predicted-KL problem with the source type excluded, as `--exclude-source`."""
    from pathlib import Path

    from windq.keys import CalibrationFiles
    from windq.models.gguf_model import GGUFModel
    from windq.models.sources import resolve_model
    from windq.pipeline import allocate
    from windq.pipeline.alignment import aligned_workspace
    from windq.pipeline.imatrix import load_imatrix
    from windq.pipeline.planner import PlanConfig, allowed_types, load_tables

    m, stats = GGUFModel(resolve_model(model)), Path(stats)
    if align != "none":
        m, stats = aligned_workspace(m, stats, int(align))
    im = load_imatrix(stats / CalibrationFiles.IMATRIX, m)
    tables = load_tables(m, stats, im.data, im.sha256())
    allowed = allowed_types(m, tables, PlanConfig(bpw=0.0, exclude_source=True))
    return m, stats, im, tables, allocate.build_problem(m, tables, allowed=allowed, objective="kl")


@click.command()
@click.option("--model", default="default", show_default=True)
@click.option("--stats", required=True, type=click.Path(file_okay=False), help="A `windq calibrate` folder of MODEL.")
@click.option("--align", default="none", show_default=True, help="none, or WIDTH: measure the model aligned to WIDTH (`windq align`).")
@click.option("--tensors", default=30, show_default=True, help="Tensors sampled (seeded).")
@click.option("--tokens", default=1024, show_default=True, help="Judge tokens measured on.")
@click.option("--bpw", "budgets", default="3.0,3.5,4.0", show_default=True, help="Budgets whose knapsack optimum is measured whole.")
@click.option("--sum-alone", is_flag=True, help="Also measure every tensor of each optimum alone at its planned type and sum them (one forward pass per tensor).")
@click.option("--seed", default=0, show_default=True)
def main(model, stats, align, tensors, tokens, budgets, sum_alone, seed) -> None:
    from windq import registry
    from windq.errors import BudgetError
    from windq.pipeline import allocate
    from windq.pipeline.calibrate import load_judge_tokens
    from windq.pipeline.planner import judge_sequences
    from windq.pipeline.real_loss import RealLoss

    m, stats, im, tables, p = kl_problem(model, stats, align)
    judge = RealLoss(m, im.data, judge_sequences(load_judge_tokens(stats), tokens))
    units = list(p.units)
    pairs, rows = [], []
    for i in sorted(np.random.default_rng(seed).choice(len(units), min(tensors, len(units)), replace=False)):
        u = units[i]
        bpw = registry.bits_per_weight(u.nbytes, m.tensors[u.tensor].n_elements)
        for target in (2.1, 3.4, 4.5):
            k = int(np.argmin(np.abs(bpw - target)))
            pairs.append((u.tensor, u.types[k]))
            rows.append({"tensor": u.tensor, "type": u.types[k], "bpw": float(bpw[k]), "predicted": float(u.error[k])})
    for row, real in zip(rows, judge.kl_alone(pairs)):
        row["real"] = float(real)
    plans = {}
    for b in (float(x) for x in budgets.split(",")):
        try:
            choice = allocate.knapsack(p, b)
        except BudgetError:
            continue
        types = allocate.tensor_types(p, choice)
        plans[b] = {"predicted": p.error_of(choice), "real": judge.kl(types)}
        judge.reset()
        if sum_alone:  # the plan's tensors one at a time: what an additive model of the real KL would say
            plans[b]["sum_of_real_alone"] = float(judge.kl_alone(list(types.items())).sum())

    summary = summarize(rows)
    click.echo(json.dumps({"tokens": judge.n_tokens, "summary": summary, "plans": plans, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

"""Measurement: does the expansion around a plan (`kl-local`, pipeline/kl_local.py) predict the real
loss on the very tokens its gradient was taken on?

    python -m windq.evaluators.kl_local --stats STATS [--align 256] [--bpw 3.0] [--rivals 10]

`windq fidelity --objective kl-local` judges the expansion on the judge's tokens; this asks the
easier question, on the gradient's own calibration tokens, so a failure there is the expansion's,
not the text's: the kl-local optimum and its rivals (as `windq fidelity` makes them) are measured
by the real KL on the gradient tokens, and the knapsack's predicted change from the plan expanded
around is set against the measured one. With --moves, single tensors moved one type from the plan
expanded around, the expansion's prediction and the tables' beside the measured change; with
--judge-tokens, the same moves measured on the judge's tokens too, against both predictions and
against the change measured on the calibration tokens (`real`). Q4_1-style source types are left out, as `--exclude-source`.
"""

from __future__ import annotations

import json

import click
import numpy as np


def summarize_moves(moves: list[dict]) -> dict:
    """Per predictor (the expansion, `kl_local`; the tables, `kl`): its median absolute error on the
    single moves, its Spearman with their measured change, and the sum of its predicted changes
    beside the sum of the measured ones (what a plan making every move at once would be promised)."""
    from windq.pipeline.fidelity import spearman

    real = [m["real"] for m in moves]
    out = {"sum_real_change": float(np.sum(real))}
    for o in ("kl_local", "kl"):
        pred = [m[o] for m in moves]
        out[f"median_abs_error_{o}"] = float(np.median(np.abs(np.subtract(pred, real))))
        out[f"spearman_{o}"] = spearman(pred, real)
        out[f"sum_predicted_change_{o}"] = float(np.sum(pred))
    return out


@click.command()
@click.option("--model", default="default", show_default=True)
@click.option("--stats", required=True, type=click.Path(file_okay=False), help="A `windq calibrate` folder of MODEL.")
@click.option("--align", default="none", show_default=True, help="none, or WIDTH: measure the model aligned to WIDTH (`windq align`).")
@click.option("--bpw", default=3.0, show_default=True, help="The budget.")
@click.option("--rivals", default=10, show_default=True, help="Near-optimal rivals of the kl-local optimum (as `windq fidelity`).")
@click.option("--moves", default=0, show_default=True, help="Also move this many sampled tensors (seeded) alone, one type down and one up from the plan expanded around, and set the expansion's and the tables' predicted change against the measured one.")
@click.option("--judge-tokens", default=0, show_default=True, help="Also measure the moves on this many of the judge's tokens (held-in, never calibrated on): does what the expansion predicts on the calibration text hold on other text?")
def main(model, stats, align, bpw, rivals, moves, judge_tokens) -> None:
    from windq.evaluators.kl_alone import kl_problem
    from windq.pipeline import allocate, fidelity, kl_local
    from windq.pipeline.calibrate import load_fisher, load_judge_tokens, load_tokens, tokens_per_sequence
    from windq.pipeline.planner import judge_sequences
    from windq.pipeline.real_loss import RealLoss

    m, stats, im, tables, base = kl_problem(model, stats, align)
    judge = RealLoss(m, im.data, kl_local.gradient_tokens(load_tokens(stats)))
    local = kl_local.problem_at(base, bpw, judge, tables, load_fisher(stats), tokens_per_sequence(stats))
    at = allocate.tensor_types(base, allocate.knapsack(base, bpw))
    at_choice = np.array([u.types.index(at[u.tensor]) for u in local.units])
    at_kl = judge.kl(at)
    plans = fidelity.rival_plans(local, bpw, rivals)
    real = [judge.kl(allocate.tensor_types(local, c)) for c in plans]
    change = [local.error_of(c) - local.error_of(at_choice) for c in plans]
    single = []
    for i in sorted(np.random.default_rng(0).choice(len(base.units), min(moves, len(base.units)), replace=False)):
        u, k = base.units[i], at_choice[i]  # base and local share units and their types
        for j in (k - 1, k + 1):
            if 0 <= j < len(u.types):
                single.append({
                    "tensor": u.tensor, "from": u.types[k], "to": u.types[j], "real": judge.kl({**at, u.tensor: u.types[j]}) - at_kl,
                    "kl_local": float(local.units[i].error[j] - local.units[i].error[k]), "kl": float(u.error[j] - u.error[k]),
                })  # fmt: skip
    moved = summarize_moves(single) if single else {}
    if single and judge_tokens:
        other = RealLoss(m, im.data, judge_sequences(load_judge_tokens(stats), judge_tokens), cache=judge.cache)
        other_at = other.kl(at)
        for mv in single:
            mv["real_judge"] = other.kl({**at, mv["tensor"]: mv["to"]}) - other_at
        moved["judge_tokens"] = other.n_tokens
        moved.update({
            f"spearman_{o}_on_judge": fidelity.spearman([mv[o] for mv in single], [mv["real_judge"] for mv in single])
            for o in ("kl_local", "kl", "real")
        })  # fmt: skip
    click.echo(json.dumps({
        "bpw": bpw, "gradient_tokens": judge.n_tokens, "expanded_at_real_kl": at_kl,
        "spearman_in_sample": fidelity.spearman(change, real),
        "optimum_predicted_change": change[0], "optimum_real_change": real[0] - at_kl,
        "predicted_change": change, "real_change": [r - at_kl for r in real], **moved, "moves": single,
    }, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()

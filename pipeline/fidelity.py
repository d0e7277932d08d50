"""Fidelity: does the planner's objective rank plans as the real loss does?

At a budget, the optimum of the objective and `rivals` near-optimal plans (the optimum of the
objective with each tensor's errors scaled by log-normal noise, so every rival is a plausible plan
of the same size) are measured by the real loss, KL(reference ‖ plan) on held-in judge tokens the
imatrix never saw. The Spearman rank correlation between the objective's sum and the measured KL
is the figure: 1 means the knapsack's ordering of these plans is the real one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from windq.errors import BudgetError
from windq.pipeline import allocate


@dataclass(frozen=True)
class FidelityResult:
    bpw: float
    objective: str
    predicted: np.ndarray  # the objective's sum for every plan (the optimum first)
    real: np.ndarray  # measured KL for every plan, nats per token
    bits: np.ndarray  # achieved bits per weight of every plan
    tokens: int  # judge tokens measured on
    halves: np.ndarray | None = None  # (plans, 2): each plan's real KL on either half of the judge's sequences

    @property
    def spearman(self) -> float:
        return spearman(self.predicted, self.real)

    @property
    def judge_split_half(self) -> float:
        """The judge against itself: Spearman between the plans' KL on one half of its sequences
        and on the other. Near-optimal plans differ by little, so the judge's own noise bounds how
        well any objective can appear to rank them on these tokens."""
        return float("nan") if self.halves is None else spearman(self.halves[:, 0], self.halves[:, 1])

    @property
    def judge_ceiling(self) -> float:
        return judge_ceiling(self.judge_split_half)

    @property
    def optimum_rank(self) -> int:
        """1 when the objective's optimum also has the lowest real KL of the plans measured."""
        return int(np.sum(self.real < self.real[0])) + 1


def judge_ceiling(split_half: float) -> float:
    """About the Spearman an objective that ranked the plans perfectly could reach against a judge
    whose split-half agreement is r: √(2r ÷ (1 + r)). Why: each half is half the judge, so the whole
    judge's reliability is 2r ÷ (1 + r) (Spearman–Brown), and a measure correlates with the truth it
    measures by at most the square root of its reliability (the attenuation bound of classical test
    theory). Both are stated for Pearson correlations; for the ranks of 11 plans this is an
    estimate, not a bound."""
    r = split_half
    return float("nan") if np.isnan(r) else (float(np.sqrt(2 * r / (1 + r))) if r > 0 else 0.0)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (average ranks for ties)."""

    def ranks(x):
        x = np.asarray(x, dtype=float)
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x))
        for v in np.unique(x):  # ties share their mean rank
            tie = x == v
            r[tie] = r[tie].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(np.sqrt((ra**2).sum() * (rb**2).sum()))
    return float((ra * rb).sum() / den) if den > 0 else float("nan")


def rival_plans(p: allocate.Problem, bpw: float, n: int, *, sigma: float = 0.5, seed: int = 0) -> list[np.ndarray]:
    """The optimum and `n` distinct near-optimal rivals within the same budget."""
    rng = np.random.default_rng(seed)
    plans = [allocate.knapsack(p, bpw)]
    seen = {plans[0].tobytes()}
    tensors = sorted({u.tensor for u in p.units})
    for _ in range(20 * n):
        if len(plans) > n:
            break
        noise = dict(zip(tensors, rng.lognormal(0.0, sigma, len(tensors))))
        units = tuple(allocate.Unit(u.tensor, u.chunk, u.types, u.nbytes, u.error * noise[u.tensor]) for u in p.units)
        choice = allocate.knapsack(allocate.Problem(units, p.fixed_bytes, p.n_weights, p.granularity), bpw)
        if choice.tobytes() not in seen:
            seen.add(choice.tobytes())
            plans.append(choice)
    return plans


def measure(
    p: allocate.Problem,
    bpw: float,
    real_loss: Callable[[dict[str, str]], np.ndarray],
    *,
    rivals: int = 10,
    objective: str = "kl",
    seed: int = 0,
    tokens: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> FidelityResult:
    """`real_loss` maps a tensor → type plan to its measured KL per judge sequence
    (RealLoss.kl_per_sequence; sequences of equal length, so their mean is the plan's KL)."""
    plans = rival_plans(p, bpw, rivals, seed=seed)
    per_seq = []
    for i, choice in enumerate(plans):
        per_seq.append(np.atleast_1d(np.asarray(real_loss(allocate.tensor_types(p, choice)), dtype=float)))
        if progress:
            progress(i + 1, len(plans))
    per_seq = np.stack(per_seq)
    half = per_seq.shape[1] // 2
    halves = np.stack([per_seq[:, :half].mean(1), per_seq[:, half : 2 * half].mean(1)], axis=1) if half else None
    return FidelityResult(
        bpw=bpw,
        objective=objective,
        predicted=np.array([p.error_of(c) for c in plans]),
        real=per_seq.mean(1),
        bits=np.array([p.bpw(p.bytes_of(c)) for c in plans]),
        tokens=tokens,
        halves=halves,
    )


def run(
    model,
    statsdir,
    budgets: list[float],
    *,
    rivals: int = 10,
    objectives: tuple[str, ...] = ("kl",),
    exclude_source: bool = False,
    tokens: int = 2048,
    seed: int = 0,
    threads: int | None = None,
    skip_unreachable: bool = False,
    relinearize: int = 0,
    progress: Callable[[str, int, int], None] | None = None,
) -> list[FidelityResult]:
    """Fidelity of each objective at each budget (objective by objective), on `tokens` judge
    tokens; one judge serves them all, so its reference logits and quantized weights are made once.
    A budget below the smallest plan is refused (BudgetError) before anything is measured, or with
    `skip_unreachable` left out of the results (each result names its budget). `relinearize`:
    how many more times kl-local is expanded, each around the last expansion's optimum."""
    from pathlib import Path

    from windq.keys import CalibrationFiles
    from windq.pipeline.calibrate import load_judge_tokens
    from windq.pipeline.imatrix import load_imatrix
    from windq.pipeline.planner import PlanConfig, allowed_types, check_calibration_folder, judge_sequences, load_tables
    from windq.pipeline.real_loss import RealLoss

    statsdir = Path(statsdir)
    check_calibration_folder(statsdir)
    im = load_imatrix(statsdir / CalibrationFiles.IMATRIX, model)
    bar = (lambda stage: (lambda d, t: progress(stage, d, t))) if progress else (lambda stage: None)
    tables = load_tables(model, statsdir, im.data, im.sha256(), threads=threads, progress=bar("tables"))
    if "kl-fit" in objectives:
        from windq.pipeline import kl_fit

        tables = kl_fit.load_or_fit(model, statsdir, tables, im.data, threads=threads, progress=bar("kl-fit"))
    allowed = allowed_types(model, tables, PlanConfig(bpw=0.0, exclude_source=exclude_source))
    # kl-local is the kl problem expanded around its optimum at each budget (kl_local.py)
    problems = {o: allocate.build_problem(model, tables, allowed=allowed, objective="kl" if o == "kl-local" else o) for o in objectives}
    reachable = []
    for b in budgets:
        try:
            for p in problems.values():
                p.check_budget(b)  # every budget and objective refused before the torch model is built
        except BudgetError:
            if not skip_unreachable:
                raise
            continue
        reachable.append(b)
    if not reachable:
        return []
    local = None
    if "kl-local" in objectives:
        from windq.pipeline import kl_local
        from windq.pipeline.calibrate import load_fisher, load_tokens, tokens_per_sequence

        grad_judge = RealLoss(model, im.data, kl_local.gradient_tokens(load_tokens(statsdir)), threads=threads)
        local = (grad_judge, tables, load_fisher(statsdir), tokens_per_sequence(statsdir))
    judge = RealLoss(model, im.data, judge_sequences(load_judge_tokens(statsdir), tokens), threads=threads,
                     cache=local[0].cache if local else None)  # fmt: skip
    out = []
    for o, p in problems.items():
        for b in reachable:
            if o == "kl-local":
                p_b = kl_local.problem_at(p, b, *local, relinearize=relinearize, progress=bar(f"kl-local {b:g} bits, expansion"))
            else:
                p_b = p
            out.append(measure(p_b, b, judge.kl_per_sequence, rivals=rivals, objective=o, seed=seed, tokens=judge.n_tokens, progress=bar(f"{o} {b:g} bits")))
    return out

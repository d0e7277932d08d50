"""The verified choice: before a plan is written, its real loss is held against the simple rivals.

The candidates are the planner's own plan (and the knapsack optimum it started from, for PPO), the
best uniform plan within the budget, and every llama.cpp stock mix that fits the budget when made
with the same imatrix. Each is measured by the real loss (`RealLoss`: the fake-quantized torch
model holding exactly the GGUF's weights) on the judge chunks, held-in tokens that neither the
imatrix nor the Fisher saw. The lowest KL wins: windq never hands over a plan that a single type or
a stock mix beats at the same size on held-in data. The table goes into the plan's provenance.

A stock mix's types are llama.cpp's own (its rules and fallbacks), from its quantizer's dry run
(a fraction of a second each: nothing is quantized).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Callable, Mapping

import numpy as np

from windq import registry
from windq.errors import BudgetError
from windq.models.gguf_model import GGUFModel
from windq.pipeline import allocate

# llama.cpp's mixes a plan is verified against: llama-quantize's K and IQ mixes from IQ1_S to Q6_K and
# its Q4_0, Q5_0 and Q8_0 (the bench's STOCK_MIXES is a subset, chosen for plot readability); the
# budget decides which of them fit. The IQ1 and Q2_K_S mixes are the only rivals at the lowest budgets.
STOCK_MIXES = ("IQ1_S", "IQ1_M", "Q2_K_S", "Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K",
               "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "IQ3_S", "IQ3_M", "IQ4_XS", "IQ4_NL", "Q4_0", "Q5_0", "Q8_0")  # fmt: skip


@dataclass(frozen=True)
class Candidate:
    label: str  # "windq knapsack", "uniform IQ4_NL", "llama.cpp Q4_K_M", …
    types: dict[str, str]  # tensor → type, every planned tensor
    nbytes: int  # tensor data bytes
    bpw: float
    kl: float | None = None  # measured on the judge chunks, nats per token
    predicted: float | None = None  # the planner's objective, where it has one for these types

    def row(self) -> dict:
        d = asdict(self)
        d.pop("types")
        return d


def from_choice(label: str, p: "allocate.Problem", choice: np.ndarray) -> Candidate:
    """A candidate for one of the planner's own choices on the tensor problem `p`."""
    nbytes = p.bytes_of(choice)
    return Candidate(label, allocate.tensor_types(p, choice), nbytes, p.bpw(nbytes), predicted=p.error_of(choice))


def predicted(p: "allocate.Problem", types: Mapping[str, str]) -> float | None:
    """The objective's sum for a tensor plan, or None where it uses a type the problem lacks."""
    if any(types[u.tensor] not in u.types for u in p.units):
        return None
    return p.error_of(np.array([u.types.index(types[u.tensor]) for u in p.units]))


def stock_candidates(
    model: GGUFModel,
    planned: set[str],
    budget_bytes: int,
    fixed_bytes: int,
    n_weights: int,
    imatrix: Mapping[str, np.ndarray],
    *,
    allowed: tuple[str, ...] | None = None,
    mixes: tuple[str, ...] = STOCK_MIXES,
    progress: Callable[[int, int], None] | None = None,
) -> list[Candidate]:
    """Every mix whose file fits the budget and uses only `allowed` types on the planned tensors."""
    from windq.export.quantize import stock_mix_types

    out = []
    for i, mix in enumerate(mixes):
        types = stock_mix_types(model, mix, imatrix=imatrix)
        if progress:
            progress(i + 1, len(mixes))
        if set(types) != set(model.tensors):
            continue
        unplanned_changed = any(types[n] != model.tensors[n].type_name for n in model.tensors if n not in planned)
        if unplanned_changed:  # the mix requantizes something windq keeps (a norm): not the same file shape
            continue
        plan = {n: types[n] for n in planned}
        if allowed is not None and not set(plan.values()) <= set(allowed):
            continue
        nbytes = fixed_bytes + sum(registry.get(t).nbytes(model.tensors[n].shape) for n, t in plan.items())
        if nbytes <= budget_bytes:
            out.append(Candidate(f"llama.cpp {mix}", plan, nbytes, registry.bits_per_weight(nbytes, n_weights)))
    return out


def unique(candidates: list[Candidate]) -> list[Candidate]:
    """One candidate per distinct plan: the first label kept, the others named beside it."""
    out: dict[str, Candidate] = {}
    for c in candidates:
        key = json.dumps(c.types, sort_keys=True)
        if key in out:
            first = out[key]
            out[key] = Candidate(f"{first.label} = {c.label}", first.types, first.nbytes, first.bpw, first.kl, first.predicted)
        else:
            out[key] = c
    return list(out.values())


def measure(candidates: list[Candidate], real_loss: Callable[[dict[str, str]], float], progress=None) -> list[Candidate]:
    """The candidates with their real KL, best first (ties by size, smaller first, then label)."""
    out = []
    for i, c in enumerate(candidates):
        out.append(Candidate(c.label, c.types, c.nbytes, c.bpw, float(real_loss(c.types)), c.predicted))
        if progress:
            progress(i + 1, len(candidates))
    return sorted(out, key=lambda c: (c.kl, c.nbytes, c.label))


def check_fits(c: Candidate, budget_bytes: int) -> None:
    if c.nbytes > budget_bytes:  # every candidate is built within the budget; this guards that promise
        raise BudgetError(f"{c.label}: {c.nbytes} bytes exceeds the budget of {budget_bytes}")

"""The predicted KL expanded around a plan rather than around the source (objective `kl-local`).

The tables' predicted KL (sensitivity.py) is the second-order expansion of KL(source ‖ plan) around
the source with a block-diagonal Fisher: ½ Σ_i Δ_iᵀ F_i Δ_i, Δ_i tensor i's quantization error. It
leaves out every cross term Δ_iᵀ H_ij Δ_j between tensors, and measured on the aligned default
those are most of what it misses at low bits: the 3.0-bit optimum's real KL is 1.41× the sum of its
tensors' real KL alone (README, "A per-tensor fit of the prediction").

Expanded around a plan P₀ instead (Δ⁰ its errors), with g = ∂KL/∂W measured at P₀, a plan P whose
errors are Δ has

    KL(P) ≈ KL(P₀) + Σ_i g_i · (Δ_i − Δ⁰_i) + ½ Σ_i (Δ_i − Δ⁰_i)ᵀ F_i (Δ_i − Δ⁰_i)

Under a quadratic loss the gradient g_i = Σ_j H_ij Δ⁰_j holds tensor i's interaction with every
other tensor's error at P₀, so what this leaves out is only the interaction between the *changes*
from P₀, second order in them: small for the plans near P₀ that a budget's optimum and its rivals
are. It stays a sum over tensors of a term that depends on the tensor's own type (Δ_i − Δ⁰_i =
q_t(W_i) − q_{t₀}(W_i), the two decoded weights' difference), so the knapsack optimises it as it
does the tables. g is the real gradient of the fake-quantized torch model (exactly the GGUF's
weights) on calibration tokens the judge never sees, so it also holds what the loss does beyond
second order at P₀. F is the calibration's Fisher (rank-one marginals, as in the tables).

P₀ is the `kl` optimum at the budget, so the objective depends on the budget: it is built per
budget, and can be expanded again around its own optimum (`relinearize`).

Measured, it does not pay (README, "The interaction, expanded around the plan"): on the aligned
default at 3.0 and 3.5 bits, `windq fidelity` gives it a Spearman of 0.05 and 0.21 (`kl`: 0.40 and
0.66), and its optimum is 1.5 % and 0.8 % worse in real KL. One move at a time it ranks the real
change well on its own tokens (0.81, the tables 0.38; evaluators/kl_local.py), but a knapsack over
211 tensors collects its largest errors and makes every move at once: at 3.0 bits it promised
−11.8 nats where the KL rose by 0.009. So it is judged by `windq fidelity` only; nothing plans
with it.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Callable, Mapping

import numpy as np

from windq.errors import InputError
from windq.pipeline import allocate
from windq.pipeline.sensitivity import Tables, fisher_column_scale

if TYPE_CHECKING:
    from windq.pipeline.calibrate import FisherStats
    from windq.pipeline.real_loss import RealLoss

GRADIENT_SEQUENCES = 8  # calibration chunks the gradient is measured on: the last ones, whole


def gradient_tokens(tokens: np.ndarray) -> np.ndarray:
    """The calibration chunks the gradient is taken on: the last GRADIENT_SEQUENCES (all of them if
    the calibration holds fewer); never the judge's."""
    return tokens[-GRADIENT_SEQUENCES:]


def expand(
    grad_judge: "RealLoss",
    tables: Tables,
    fisher: Mapping[str, "FisherStats"],
    tokens_per_sequence: int,
    at: Mapping[str, str],
    *,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, np.ndarray]:
    """Per tensor, [n_types] (the tables' types): the predicted change of the per-token KL when the
    tensor moves from its type in `at` to each type, every other tensor held at `at`; 0 at `at`'s
    own type. `grad_judge` is a RealLoss on the calibration tokens."""
    from windq.pipeline.calibrate import hf_row_order

    missing = [n for n in tables.tensors if n not in at]
    if missing:
        raise ValueError(f"the plan expanded around lacks {missing[0]}")
    grads = grad_judge.kl_gradient(at)
    # every (tensor, type) of the tables quantized first, on every core, a type index at a time
    for k in range(max(len(t.types) for t in tables.tensors.values())):
        grad_judge.prepare({n: t.types[k] for n, t in tables.tensors.items() if k < len(t.types)})

    def rows(name: str) -> np.ndarray:
        t = tables.tensors[name]
        f = fisher[name]
        g = grads.pop(name)  # each gradient freed as its tensor is done
        g = g.reshape(-1, g.shape[-1])  # rows as the Fisher's marginals count them (calibrate.py)
        w0 = grad_judge.weights(name, at[name]).reshape(g.shape)
        r = f.rows[hf_row_order(grad_judge.processor, name, len(f.rows))].astype(np.float64)  # GGUF row order → torch's
        c = fisher_column_scale(f, tokens_per_sequence)  # the tables' Fisher term, of the change
        out = []
        for ty in t.types:
            d = grad_judge.weights(name, ty).reshape(g.shape) - w0
            out.append(np.einsum("ij,ij->", g, d, dtype=np.float64) + r @ np.einsum("ij,j->i", d * d, c, dtype=np.float64))
        return np.array(out)

    names = sorted(tables.tensors, key=lambda n: -int(np.prod(tables.tensors[n].shape)))
    out = {}
    with ThreadPoolExecutor(max_workers=grad_judge.threads) as pool:
        for i, (name, r) in enumerate(zip(names, pool.map(rows, names)), 1):
            out[name] = r
            if progress:
                progress(i, len(names))
    return out


def local_problem(base: allocate.Problem, tables: Tables, rows: Mapping[str, np.ndarray]) -> allocate.Problem:
    """`base` (a tensor-granularity problem: its units, types and bytes) with each option's error
    the expansion's predicted change, less the unit's smallest: a constant per unit, which every
    plan pays once, so the knapsack's optimum and the plans' order are the expansion's, and no
    error is negative."""
    if base.granularity != "tensor":
        raise InputError("--objective kl-local expands around a plan of one type per tensor: use --granularity tensor")
    units = []
    for u in base.units:
        e = rows[u.tensor][[tables.tensors[u.tensor].types.index(ty) for ty in u.types]]
        units.append(dataclasses.replace(u, error=e - e.min()))
    return dataclasses.replace(base, units=tuple(units))


def problem_at(
    base: allocate.Problem,
    bpw: float,
    grad_judge: "RealLoss",
    tables: Tables,
    fisher: Mapping[str, "FisherStats"],
    tokens_per_sequence: int,
    *,
    relinearize: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> allocate.Problem:
    """The `kl-local` problem at a budget: `base` (the `kl` problem, tensor granularity) expanded
    around its own optimum at `bpw`, then `relinearize` more times around the new optimum."""
    p = base
    for _ in range(1 + relinearize):
        at = allocate.tensor_types(p, allocate.knapsack(p, bpw))
        p = local_problem(base, tables, expand(grad_judge, tables, fisher, tokens_per_sequence, at, progress=progress))
    return p

"""Allocation under a global bit budget: which type every unit (tensor or column chunk) gets.

Bits are exact: the budget is on the bytes of every tensor in the GGUF (quantized weights at their
type's size, norms and anything llama.cpp copies at their source size) × 8 ÷ the number of weights.
A plan never exceeds it, and the knapsack plans land within 0.5 % below it.

Every allocator sees only legal options: a type that does not fit a unit's rows, or that needs
importance data the imatrix lacks, is absent from the problem, never rewritten afterwards.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
import numpy as np

from windq.errors import BudgetError, PlanError
from windq import registry
from windq.models.gguf_model import GGUFModel
from windq.pipeline.sensitivity import Tables

# Largest Pareto frontier the exact solver keeps before it hands over to the Lagrangian one.
EXACT_FRONTIER_LIMIT = 200_000
SLACK = 0.005  # plans land at most this fraction below the target


@dataclass(frozen=True)
class Unit:
    tensor: str
    chunk: int  # column-chunk index; 0 for a whole tensor
    types: tuple[str, ...]  # legal options, cheapest first
    nbytes: np.ndarray  # bytes of each option
    error: np.ndarray  # proxy error of each option


@dataclass(frozen=True)
class Problem:
    units: tuple[Unit, ...]
    fixed_bytes: int  # tensors outside the plan, copied as they are
    n_weights: int
    granularity: str  # "tensor" or "chunk:G"

    def bytes_of(self, choice: np.ndarray) -> int:
        return self.fixed_bytes + int(sum(u.nbytes[c] for u, c in zip(self.units, choice)))

    def error_of(self, choice: np.ndarray) -> float:
        return float(sum(u.error[c] for u, c in zip(self.units, choice)))

    def bpw(self, nbytes: int) -> float:
        return registry.bits_per_weight(nbytes, self.n_weights)

    def budget_bytes(self, bpw: float) -> int:
        # the epsilon keeps a budget read back from an achieved figure (bytes·8/n) at those bytes
        return math.floor(bpw * self.n_weights / 8 + 1e-6)

    def reachable_bytes(self) -> tuple[int, int]:
        lo = self.fixed_bytes + sum(int(u.nbytes.min()) for u in self.units)
        hi = self.fixed_bytes + sum(int(u.nbytes.max()) for u in self.units)
        return lo, hi

    def reachable_bpw(self) -> tuple[float, float]:
        lo, hi = self.reachable_bytes()
        return self.bpw(lo), self.bpw(hi)

    def check_budget(self, bpw: float) -> int:
        """Budget in bytes, or a BudgetError naming the range these types can reach.

        Above the range is refused too: no plan could land within SLACK below such a target."""
        budget = self.budget_bytes(bpw)
        lo_bytes, hi_bytes = self.reachable_bytes()
        if not lo_bytes <= budget <= hi_bytes:
            lo, hi = self.reachable_bpw()
            types = sorted({t for u in self.units for t in u.types})
            raise BudgetError(
                f"{bpw:g} bits per weight cannot be reached: with {', '.join(types)} this model spans "
                f"{lo:.3f} to {hi:.3f} bits per weight"
            )
        return budget

    def min_rest(self) -> np.ndarray:
        """[i]: the cheapest bytes the units after unit i can still cost."""
        mins = np.array([u.nbytes.min() for u in self.units], dtype=np.int64)
        return np.concatenate([np.cumsum(mins[::-1])[::-1][1:], [0]])

    def assignment(self, choice: np.ndarray) -> dict[tuple[str, int], str]:
        return {(u.tensor, u.chunk): u.types[c] for u, c in zip(self.units, choice)}


def build_problem(
    model: GGUFModel, tables: Tables, *, granularity: str = "tensor", allowed: tuple[str, ...] | None = None,
    objective: str = "proxy",
) -> Problem:  # fmt: skip
    """The allocation problem: one unit per tensor (or column chunk), its legal types, their exact
    bytes, and their error under `objective` (`kl`: the predicted real loss, what `windq plan`
    optimises; `proxy`: the imatrix-weighted error, all tables without a Fisher have)."""
    units = []
    for name, t in tables.tensors.items():
        keep = [i for i, ty in enumerate(t.types) if allowed is None or ty in allowed]
        if not keep:
            raise BudgetError(f"{name}: none of the allowed types ({', '.join(allowed or ())}) can be written for it")
        err = t.objective(objective)
        if granularity == "tensor":
            units.append(Unit(name, 0, tuple(t.types[i] for i in keep), t.tensor_bytes()[keep], err.sum(axis=1)[keep]))
            continue
        legal = t.chunk_legal
        for c in range(len(t.chunk_cols)):
            ok = [i for i in keep if legal[i, c]]
            if not ok:
                raise BudgetError(f"{name}: no allowed type fits its {t.chunk_cols[c]}-column chunks")
            units.append(Unit(name, c, tuple(t.types[i] for i in ok), t.nbytes[ok, c], err[ok, c]))
    fixed = sum(info.nbytes for n, info in model.tensors.items() if n not in tables.tensors)
    return Problem(tuple(units), fixed, model.n_real_weights, granularity)


# --- exact: Pareto-frontier dynamic programme -------------------------------------------------


def solve_exact(p: Problem, budget: int, limit: int = EXACT_FRONTIER_LIMIT, *, bound: bool = True) -> np.ndarray | None:
    """The minimum-error choice within `budget` bytes, or None if the frontier grows past `limit`.

    After each unit, only (bytes, error) pairs that no other pair beats on both are kept, so the
    answer is exact; the frontier is bounded by the budget and pruned to strictly falling error.

    A state is also dropped when even the best finish cannot beat a plan already in hand (branch and
    bound): the Lagrangian plan's error is an upper bound on the optimum, and for any price λ of a
    byte, the units still to come cost at least Σ_j min_c(e_jc + λ·n_jc) − λ·(bytes left) in error.
    A state on an optimal path has prefix + that bound ≤ optimum ≤ the upper bound, so it is never
    dropped. Without the bound the frontier grows with the number of tensors, and the programme's
    time with its square (the scale bench measured a cost exponent of 1.30 against parameters).
    `bound=False` runs the plain programme (for comparison).
    """
    cap = budget - p.fixed_bytes
    tail = p.min_rest()  # so no state that cannot finish is kept
    if p.reachable_bytes()[0] > budget:
        return None
    relaxed = _Priced(p)
    lam = relaxed.price(budget) if bound else 0.0
    upper = p.error_of(greedy_fill(p, relaxed.choice(lam), budget)) if bound else np.inf
    priced = relaxed.floor(lam)
    rest_priced = np.concatenate([np.cumsum(priced[::-1])[::-1][1:], [0.0]])  # [i]: units after i
    tolerance = 1e-9 * (abs(upper) + 1.0)  # rounding in sums taken in another order
    B = np.zeros(1, dtype=np.int64)
    E = np.zeros(1)
    back: list[tuple[np.ndarray, np.ndarray]] = []
    for i, u in enumerate(p.units):
        nb = (B[:, None] + u.nbytes[None, :]).ravel()
        ne = (E[:, None] + u.error[None, :]).ravel()
        parent = np.repeat(np.arange(len(B)), len(u.nbytes))
        option = np.tile(np.arange(len(u.nbytes)), len(B))
        ok = (nb + tail[i] <= cap) & (ne + rest_priced[i] - lam * (cap - nb) <= upper + tolerance)
        nb, ne, parent, option = nb[ok], ne[ok], parent[ok], option[ok]
        order = np.lexsort((ne, nb))
        nb, ne, parent, option = nb[order], ne[order], parent[order], option[order]
        # keep a state only if its error is below every cheaper state's
        best_before = np.minimum.accumulate(np.concatenate([[np.inf], ne[:-1]]))
        keep = ne < best_before
        B, E = nb[keep], ne[keep]
        back.append((parent[keep], option[keep]))
        if len(B) > limit:
            return None
    if len(B) == 0:
        return None
    k = int(np.argmin(E))
    choice = np.zeros(len(p.units), dtype=np.int64)
    for i in range(len(p.units) - 1, -1, -1):
        parent, option = back[i]
        choice[i] = option[k]
        k = parent[k]
    return choice


# --- large: Lagrangian relaxation + greedy fill ----------------------------------------------


class _Priced:
    """The Lagrangian relaxation: each unit's option of least error + λ·bytes for a price λ of a
    byte. The problem is held as padded (unit × option) arrays, so a price is tried in one numpy
    call (a loop over units was 0.2 s of the knapsack's 0.26 s on the default model)."""

    def __init__(self, p: Problem):
        width = max((len(u.nbytes) for u in p.units), default=1)
        self.fixed = p.fixed_bytes
        self.cheapest = p.reachable_bytes()[0]
        self.nbytes = np.zeros((len(p.units), width), dtype=np.int64)
        self.error = np.full((len(p.units), width), np.inf)  # padding is never the cheapest priced option
        for i, u in enumerate(p.units):
            self.nbytes[i, : len(u.nbytes)] = u.nbytes
            self.error[i, : len(u.error)] = u.error
        self.rows = np.arange(len(p.units))

    def choice(self, lam: float) -> np.ndarray:
        return np.argmin(self.error + lam * self.nbytes, axis=1)

    def floor(self, lam: float) -> np.ndarray:
        """Each unit's least error + λ·bytes."""
        return np.min(self.error + lam * self.nbytes, axis=1)

    def bytes_of(self, choice: np.ndarray) -> int:
        return self.fixed + int(self.nbytes[self.rows, choice].sum())

    def price(self, budget: int) -> float:
        """The smallest price of a byte (bisected) at which the relaxed choice fits the budget."""
        if self.cheapest > budget:
            raise BudgetError("budget below the cheapest plan")
        lo, hi = 0.0, 1.0
        while self.bytes_of(self.choice(hi)) > budget:
            hi *= 4
            if hi > 1e30:  # errors so large no price of a byte outweighs them (non-finite tables)
                raise PlanError("the Lagrangian search found no price of a byte that meets the budget; the error tables hold non-finite values")
        for _ in range(100):
            mid = (lo + hi) / 2
            if self.bytes_of(self.choice(mid)) > budget:
                lo = mid
            else:
                hi = mid
        return hi  # hi always fits


def solve_lagrangian(p: Problem, budget: int) -> np.ndarray:
    """Bisect the price of a byte until the relaxed choice fits, then spend the slack greedily."""
    relaxed = _Priced(p)
    return greedy_fill(p, relaxed.choice(relaxed.price(budget)), budget)


def greedy_fill(p: Problem, choice: np.ndarray, budget: int, *, allow_zero_gain: bool = False) -> np.ndarray:
    """Spend leftover bytes on the upgrades that buy the most error per byte, while they fit.

    With `allow_zero_gain`, upgrades that lose nothing (say Q5_1 over a Q4_1 source, both exact)
    are taken too, so a plan whose error cannot fall further still uses its budget."""
    choice = choice.copy()
    left = budget - p.bytes_of(choice)
    while True:
        best, best_gain = None, 0.0
        for i, u in enumerate(p.units):
            c = choice[i]
            extra = u.nbytes - u.nbytes[c]
            gain = u.error[c] - u.error
            ok = (extra > 0) & (extra <= left) & ((gain >= 0) if allow_zero_gain else (gain > 0))
            if ok.any():
                ratio = np.where(ok, gain / np.maximum(extra, 1), -1.0)
                j = int(np.argmax(ratio))
                if ratio[j] > best_gain or (best is None and ratio[j] >= 0 and allow_zero_gain):
                    best, best_gain = (i, j), ratio[j]
        if best is None:
            return choice
        i, j = best
        left -= int(p.units[i].nbytes[j] - p.units[i].nbytes[choice[i]])
        choice[i] = j


def _solve(p: Problem, budget: int) -> np.ndarray:
    """Exact where the Pareto frontier stays small, Lagrangian otherwise."""
    choice = solve_exact(p, budget)
    return solve_lagrangian(p, budget) if choice is None else choice


def knapsack(p: Problem, bpw: float) -> np.ndarray:
    """Minimum summed proxy error within the budget: exact where the frontier stays small."""
    budget = p.check_budget(bpw)
    choice = _solve(p, budget)
    if p.bytes_of(choice) < budget * (1 - SLACK):
        choice = greedy_fill(p, choice, budget, allow_zero_gain=True)
    return choice


def uniform(p: Problem, bpw: float) -> np.ndarray:
    """The widest single type that is legal on every unit and fits the budget. Types of equal size
    (Q4_0, IQ4_NL and Q4_K are all 4.5 bits) are told apart by proxy error, then by name: never by
    a set's iteration order, which changes with Python's hash seed."""
    budget = p.check_budget(bpw)
    common = set(p.units[0].types).intersection(*(u.types for u in p.units[1:]))
    fits = []
    for t in sorted(common):
        choice = np.array([u.types.index(t) for u in p.units])
        nbytes = p.bytes_of(choice)
        if nbytes <= budget:
            fits.append((-nbytes, p.error_of(choice), t, choice))
    if not fits:
        raise BudgetError(f"no single type legal on every tensor fits {bpw:g} bits per weight")
    return min(fits, key=lambda f: f[:3])[3]


def random_plan(p: Problem, bpw: float, rng: np.random.Generator) -> np.ndarray:
    """A random legal plan within budget (a baseline): each unit picks among the options it can still afford."""
    budget = p.check_budget(bpw)
    min_rest = p.min_rest()
    spent = p.fixed_bytes
    choice = np.zeros(len(p.units), dtype=np.int64)
    for i, u in enumerate(p.units):
        ok = np.flatnonzero(spent + u.nbytes + min_rest[i] <= budget)
        choice[i] = rng.choice(ok)
        spent += int(u.nbytes[choice[i]])
    return choice


# --- chunk plans → tensor plans -----------------------------------------------------------------


def project_to_tensors(chunk_problem: Problem, chunk_choice: np.ndarray, tensor_problem: Problem, bpw: float) -> np.ndarray:
    """One type per tensor, for stock GGUF: per tensor, the candidates are the types its chunks
    were given, and the knapsack picks the combination with the least summed chunk error under the
    same budget. Always feasible: the cheapest candidate of every tensor costs no more than its chunks."""
    used: dict[str, set[str]] = {}
    for u, c in zip(chunk_problem.units, chunk_choice):
        used.setdefault(u.tensor, set()).add(u.types[c])
    units = []
    for u in tensor_problem.units:
        keep = [i for i, t in enumerate(u.types) if t in used[u.tensor]]
        units.append(Unit(u.tensor, 0, tuple(u.types[i] for i in keep), u.nbytes[keep], u.error[keep]))
    restricted = Problem(tuple(units), tensor_problem.fixed_bytes, tensor_problem.n_weights, "tensor")
    choice = _solve(restricted, tensor_problem.budget_bytes(bpw))
    # back to indices of the full tensor problem
    return np.array([tensor_problem.units[i].types.index(restricted.units[i].types[c]) for i, c in enumerate(choice)])


def tensor_types(p: Problem, choice: np.ndarray) -> dict[str, str]:
    if p.granularity != "tensor":
        raise ValueError("only a tensor-granularity choice maps to one type per tensor")
    return {u.tensor: u.types[c] for u, c in zip(p.units, choice)}

"""`windq plan`: from a calibration folder to a plan — tables, problem, allocator, projection."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from windq.errors import BudgetError, CalibrationError, InputError, UnsupportedModelError
from windq.models.gguf_model import GGUFModel
from windq.pipeline import allocate
from windq.keys import CalibrationFiles
from windq.pipeline.calibrate import fisher_sha256 as calibrate_fisher_sha256, load_activation_stats, load_fisher, load_judge_tokens, tokens_per_sequence
from windq.pipeline.imatrix import load_imatrix
from windq.plan import Plan, make_plan
from windq.pipeline.sensitivity import Tables, load_or_compute


@dataclass(frozen=True)
class PlanConfig:
    bpw: float
    method: str = "knapsack"
    granularity: str = "tensor"  # "tensor" or "chunk:G"
    types: tuple[str, ...] | None = None
    seed: int = 0
    episodes: int = 20  # PPO training episodes
    policy: str | None = None  # apply a saved policy instead of training
    real_loss_tokens: int = 1024  # judge tokens for the PPO episode-end KL, over several sequences (0: none)
    threads: int | None = None
    # what the allocator minimises: "kl" (Fisher-predicted real loss), "kl-fit" (the same scaled per
    # tensor to its measured real loss, kl_fit.py) or "proxy" (imatrix-weighted
    # squared error, as llama.cpp's tools). `windq fidelity` on the default model: kl's optimum had
    # the lowest real KL of 11 near-optimal plans at 4.6, 5.0 and 5.5 bits, proxy's did not (README)
    objective: str = "kl"
    exclude_source: bool = False  # never plan a tensor in its source type (llama.cpp would copy it, error-free)
    verify: bool = False  # (`windq plan` turns it on) measure the plan against the best uniform plan and llama.cpp's mixes; keep the best
    verify_tokens: int | None = None  # judge tokens the verification measures on (None: every one calibrate kept, 2,048 by default)
    verify_mixes: tuple[str, ...] | None = None  # llama.cpp mixes the verification tries (None: verify.STOCK_MIXES)
    sample_rows: int | None = None  # tables from about this many rows of each larger tensor (None: every row)
    stream: bool = False  # the real loss runs one module's weights at a time (pipeline/streaming.py): same KL, less memory

    @property
    def group(self) -> int | None:
        if self.granularity == "tensor":
            return None
        kind, _, g = self.granularity.partition(":")
        if kind != "chunk" or not g.isdigit():
            raise InputError(f"--granularity {self.granularity}: use `tensor` or `chunk:G` (G = 128, 256, 512)")
        return int(g)


@dataclass
class PlannerResult:
    plan: Plan
    tensor_problem: allocate.Problem
    tensor_choice: np.ndarray | None  # None when a rival's plan won the verification
    proxy_error: float
    chunk_proxy_error: float | None = None
    ppo: object | None = None  # PPOResult
    policy: object | None = None  # the PPO policy network trained or applied (`ppo.save_policy` writes it)
    candidates: list | None = None  # verify.Candidate rows, best first, when verified


@dataclass(frozen=True)
class Job:
    """Everything an allocator may use: the model, its calibration, the problem to solve."""

    model: GGUFModel
    statsdir: Path
    tables: Tables
    problem: allocate.Problem  # at the plan's granularity
    tensor_problem: allocate.Problem
    imatrix: dict[str, np.ndarray]
    cfg: "PlanConfig"
    policy: object | None  # a loaded --policy
    progress: Callable[[int, int], None] | None
    judge: Callable[[], object]  # the RealLoss on the judge chunks, built on first use


@dataclass(frozen=True)
class Allocation:
    choice: np.ndarray  # an option index per unit of job.problem
    ppo: object | None = None  # PPOResult
    policy: object | None = None


def _knapsack(job: Job) -> Allocation:
    return Allocation(allocate.knapsack(job.problem, job.cfg.bpw))


def _uniform(job: Job) -> Allocation:
    return Allocation(allocate.uniform(job.problem, job.cfg.bpw))


def _random(job: Job) -> Allocation:
    return Allocation(allocate.random_plan(job.problem, job.cfg.bpw, np.random.default_rng(job.cfg.seed)))


def _ppo(job: Job) -> Allocation:
    """MaskablePPO trained on this model (warm-started from the knapsack), or a loaded --policy applied."""
    from windq.pipeline import ppo

    model, tables, prob, tp, imatrix, cfg = job.model, job.tables, job.problem, job.tensor_problem, job.imatrix, job.cfg

    acts = load_activation_stats(job.statsdir)
    feats = ppo.unit_features(
        prob, weight_column_stats(model, tables.tensors), imatrix, acts,
        {n: t.chunk_cols for n, t in tables.tensors.items()} if prob.granularity != "tensor" else None,
    )  # fmt: skip
    real = None
    scale = 1.0
    if cfg.real_loss_tokens > 0:
        loss = job.judge()
        # the judge may hold more (the verification's); PPO's episodes measure the tokens asked for
        seqs = -(-cfg.real_loss_tokens // loss.tokens.shape[1])
        # the real loss is judged on the exported plan: chunk choices are projected first
        if prob.granularity == "tensor":
            real = lambda choice: loss.kl(allocate.tensor_types(tp, choice), seqs)  # noqa: E731
        else:
            real = lambda choice: loss.kl(  # noqa: E731
                allocate.tensor_types(tp, allocate.project_to_tensors(prob, choice, tp, cfg.bpw)), seqs
            )
        scale = max(real(allocate.knapsack(prob, cfg.bpw)), 1e-9)
    env = ppo.AllocationEnv(prob, feats, cfg.bpw, real_loss=real, real_loss_scale=scale)
    if job.policy is not None:
        result = ppo.apply_policy(job.policy, env)
        return Allocation(result.choice, result, job.policy)
    trained, result = ppo.train(env, episodes=cfg.episodes, seed=cfg.seed, progress=job.progress)
    return Allocation(result.choice, result, trained.policy)


# The allocators `--method` offers: a new one is a function of a Job and an entry here.
METHODS: dict[str, Callable[[Job], Allocation]] = {"knapsack": _knapsack, "ppo": _ppo, "uniform": _uniform, "random": _random}


def judge_sequences(judge: np.ndarray, tokens: int | None, per_sequence: int = 256) -> np.ndarray:
    """`tokens` judge tokens (None: one sequence from every chunk) as the first `per_sequence` of as
    many chunks as it takes (several sequences, not one long one: positions late in one text are not
    independent samples)."""
    per = min(per_sequence, judge.shape[1])
    n = len(judge) if tokens is None else max(1, -(-tokens // per))
    if n > len(judge):
        # never measure on fewer tokens than asked: a smaller judge is a noisier one
        raise CalibrationError(
            f"{tokens} judge tokens asked for, the calibration folder holds {len(judge) * per} "
            f"({len(judge)} chunks, {per} tokens each): ask for fewer or recalibrate with --judge-chunks {n}"
        )
    return judge[:n, :per]


def check_calibration_folder(statsdir: str | Path) -> Path:
    """A folder `windq calibrate` wrote; cheap, so a wrong --stats fails before anything is loaded."""
    meta_path = Path(statsdir) / CalibrationFiles.META
    if not meta_path.is_file():
        raise CalibrationError(f"{statsdir}: not a calibration folder (no {CalibrationFiles.META}); run `windq calibrate` first")
    return meta_path


def _check_stats(model: GGUFModel, statsdir: Path) -> None:
    meta_path = check_calibration_folder(statsdir)
    meta = json.loads(meta_path.read_text())
    if meta.get("model_sha256") != model.sha256:
        raise CalibrationError(f"{statsdir} was calibrated on {meta.get('model')}, not {model.path.name}; calibrate this model")


def tables_path(
    model: GGUFModel, statsdir: Path, imatrix_sha256: str, group: int | None = 256, fisher_sha256: str | None = None,
    sample_rows: int | None = None,
) -> Path:  # fmt: skip
    """Where the calibration folder caches its tables: keyed by model, imatrix and Fisher (hashed
    here unless the caller has its hash), and the row sampling."""
    from windq.pipeline.sensitivity import cache_path

    return cache_path(
        model, imatrix_sha256, statsdir, group=group, fisher_sha256=fisher_sha256 or calibrate_fisher_sha256(statsdir), sample_rows=sample_rows
    )


def load_tables(
    model: GGUFModel, statsdir: Path, imatrix: dict[str, np.ndarray], imatrix_sha256: str, *, group: int | None = 256,
    threads: int | None = None, progress: Callable[[int, int], None] | None = None, sample_rows: int | None = None,
) -> Tables:  # fmt: skip
    """The calibration folder's cached tables (proxy and predicted KL), built on first use; the
    Fisher is parsed only then."""
    statsdir = Path(statsdir)
    fisher_sha = calibrate_fisher_sha256(statsdir)
    path = tables_path(model, statsdir, imatrix_sha256, group, fisher_sha, sample_rows)
    if path.is_file():
        return Tables.load(path)
    return load_or_compute(
        model, imatrix, statsdir, group=group, imatrix_sha256=imatrix_sha256, threads=threads, progress=progress,
        fisher=load_fisher(statsdir), tokens_per_sequence=tokens_per_sequence(statsdir), fisher_sha256=fisher_sha, sample_rows=sample_rows,
    )  # fmt: skip


def weight_column_stats(model: GGUFModel, names) -> dict[str, np.ndarray]:
    out = {}
    for n in names:
        w = model.dequantized(n)
        out[n] = np.stack([w.std(axis=0), np.abs(w).max(axis=0)])
    return out


def run_planner(
    model: GGUFModel, statsdir: str | Path, cfg: PlanConfig, progress: Callable[[str, int, int], None] | None = None
) -> PlannerResult:
    statsdir = Path(statsdir)
    if cfg.method not in METHODS:
        raise InputError(f"--method {cfg.method}: use one of {', '.join(METHODS)}")
    _check_stats(model, statsdir)
    if cfg.verify or (cfg.method == "ppo" and cfg.real_loss_tokens):
        from windq.pipeline.calibrate import ARCHITECTURES

        if model.architecture not in ARCHITECTURES:  # before minutes of tables, not after
            raise UnsupportedModelError(
                f"{model.path.name}: the verification and PPO's real loss measure plans in torch, which windq does not "
                f"run for {model.architecture!r} (an FFN-split model is one); plan it with --no-verify (ppo: --real-loss-tokens 0)"
            )
    if cfg.stream and any(t.n_mat > 1 for t in model.quantizable()):  # StreamedModel would refuse it after the tables
        raise UnsupportedModelError(f"{model.path.name}: the real loss does not stream MoE experts yet; plan it without --stream")
    # a policy file is refused before any table is built, and read as data only
    policy = None
    if cfg.method == "ppo" and cfg.policy:
        from windq.pipeline import ppo

        policy = ppo.load_policy(cfg.policy)
    im = load_imatrix(statsdir / CalibrationFiles.IMATRIX, model)
    data = im.data

    def bar(stage):
        return (lambda d, t: progress(stage, d, t)) if progress else None

    group = cfg.group
    # tensor plans read whole-tensor sums from the G=256 tables, so both granularities share one cache
    tables = load_tables(
        model, statsdir, data, im.sha256(), group=group or 256, threads=cfg.threads, progress=bar("tables"), sample_rows=cfg.sample_rows
    )
    if cfg.objective == "kl-fit":
        from windq.pipeline import kl_fit

        tables = kl_fit.load_or_fit(model, statsdir, tables, data, threads=cfg.threads, stream=cfg.stream, progress=bar("kl-fit"))
    allowed = allowed_types(model, tables, cfg)
    tp = allocate.build_problem(model, tables, granularity="tensor", allowed=allowed, objective=cfg.objective)
    budget = tp.check_budget(cfg.bpw)
    prob = tp if group is None else allocate.build_problem(model, tables, granularity=cfg.granularity, allowed=allowed, objective=cfg.objective)

    judge_cache: list = []

    def judge():
        # one fake-quantized torch model for PPO's episode-end KL and the verification
        if not judge_cache:
            from windq.pipeline.real_loss import RealLoss

            held = load_judge_tokens(statsdir)
            wanted = ([cfg.verify_tokens] if cfg.verify else []) + ([cfg.real_loss_tokens] if cfg.method == "ppo" else [])
            # each request is checked against the folder (more is refused); all start at the first chunk
            judge_cache.append(RealLoss(model, data, max((judge_sequences(held, n) for n in wanted), key=len), stream=cfg.stream, threads=cfg.threads))
        return judge_cache[0]

    allocation = METHODS[cfg.method](Job(model, statsdir, tables, prob, tp, data, cfg, policy, bar(cfg.method), judge))
    choice, ppo_result, policy = allocation.choice, allocation.ppo, allocation.policy

    chunk_error = None
    if group is not None:
        chunk_error = prob.error_of(choice)
        tchoice = allocate.project_to_tensors(prob, choice, tp, cfg.bpw)
    else:
        tchoice = choice
    types = allocate.tensor_types(tp, tchoice)
    prov = {
        "seed": cfg.seed,
        "imatrix_sha256": im.sha256(),
        "calibration": str(statsdir),
        "objective": cfg.objective,
        "predicted_error": tp.error_of(tchoice),
        "allowed_types": list(allowed) if allowed else None,
        "source_type_excluded": cfg.exclude_source,
        "tables_sample_rows": cfg.sample_rows,  # None: tables from every row
    }
    candidates = None
    if cfg.verify:
        from windq.pipeline import verify

        own = [verify.from_choice(f"windq {cfg.method}", tp, tchoice)]
        if cfg.method == "ppo":
            own.append(verify.from_choice("windq knapsack", tp, allocate.knapsack(tp, cfg.bpw)))
        try:
            u = allocate.uniform(tp, cfg.bpw)
            own.append(verify.from_choice(f"uniform {tp.units[0].types[u[0]]}", tp, u))
        except BudgetError:
            pass  # no single type fits: nothing to compare with
        stock = verify.stock_candidates(
            model, set(types), budget, tp.fixed_bytes, tp.n_weights, data, allowed=allowed,
            mixes=cfg.verify_mixes or verify.STOCK_MIXES, progress=bar("mixes"),
        )
        stock = [dataclasses.replace(c, predicted=verify.predicted(tp, c.types)) for c in stock]
        candidates = verify.measure(verify.unique(own + stock), judge().kl, progress=bar("verify"))
        best = candidates[0]
        verify.check_fits(best, budget)
        prov["verified"] = {
            "chosen": best.label,
            "measured_on": f"{judge().n_tokens} held-in judge tokens ({judge().n_sequences} sequences) the imatrix never saw",
            "candidates": [c.row() for c in candidates],
        }
        if best.types != types:
            types, tchoice = best.types, None
            prov["predicted_error"] = best.predicted
    # llama-imatrix collects nothing for some tensors (token_embd; output when tied): the tables
    # weight their error by the mean importance of the others (sensitivity.py), recorded here
    missing = sorted(set(tables.tensors) - set(data))
    if missing:
        prov["importance_substituted"] = {"tensors": missing, "by": "mean importance of the tensors with imatrix data"}
    if chunk_error is not None:
        prov["chunk_proxy_error"] = chunk_error
        prov["chunk_types"] = _chunk_types(prob, choice)
    if ppo_result is not None:
        prov["ppo"] = {
            "episodes": ppo_result.episodes, "source": ppo_result.source, "kl": ppo_result.kl,
            "knapsack_kl": ppo_result.knapsack_kl, "policy": cfg.policy,
        }  # fmt: skip
    plan = make_plan(model, types, method=cfg.method, budget_bpw=cfg.bpw, granularity=cfg.granularity, provenance=prov)
    return PlannerResult(plan, tp, tchoice, prov["predicted_error"], chunk_error, ppo_result, policy, candidates)


def allowed_types(model: GGUFModel, tables: Tables, cfg: PlanConfig) -> tuple[str, ...] | None:
    """The types the plan may use: --types, less the tensors' source types with --exclude-source."""
    if not cfg.exclude_source:
        return cfg.types
    pool = set(cfg.types) if cfg.types else {t for table in tables.tensors.values() for t in table.types}
    source = {model.source_type(n) for n in tables.tensors}
    return tuple(sorted(pool - source))


def _chunk_types(p: allocate.Problem, choice: np.ndarray) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for u, c in zip(p.units, choice):
        out.setdefault(u.tensor, []).append(u.types[c])
    return out

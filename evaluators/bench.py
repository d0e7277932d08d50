"""`windq bench`: one command for the README's quality-versus-size and cost figures.

For a model (and its aligned twin), with one imatrix: llama.cpp's stock mixes and windq's plans at
budgets across the reachable range, every file exported and evaluated by llama.cpp (PPL, KLD
against the source, generation speed with 2 threads). Writes a Markdown table, Pareto plots
(bits per real weight vs PPL and vs KLD), the size-at-equal-PPL ratio of windq's best plan against
llama.cpp's best mix, and the wall time of every stage with its ratio to the bare llama.cpp call.

Resumable: every result is cached under OUT/results/ by (model hash, plan), so a rerun only does
what is missing.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from windq.files import load_arrays
from windq.pipeline.fidelity import spearman
from windq.keys import CalibrationFiles
from windq.registry import bits_per_weight

STOCK_MIXES = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_M", "IQ2_XXS", "IQ2_XS", "IQ2_M", "IQ3_XXS", "IQ3_M", "IQ4_XS", "Q8_0")


@dataclass(frozen=True)
class BenchConfig:
    model: str = "default"
    text: str = "wiki"
    budgets: tuple[float, ...] = (3.0, 3.5, 4.0, 4.5, 5.0, 5.5)
    methods: tuple[str, ...] = ("uniform", "knapsack", "ppo", "knapsack@chunk:256", "ppo@chunk:256")
    mixes: tuple[str, ...] = STOCK_MIXES
    variants: tuple[str, ...] = ("unaligned", "aligned")
    calib_tokens: int = 16384
    chunks: int = 128  # 512-token chunks: 128 × 255 scored = 32,640 tokens
    ppo_episodes: int = 20
    objective: str = "kl"  # what windq's plans minimise (PlanConfig.objective)
    speed_tokens: int = 64
    speed_rounds: int = 3
    threads: int = 2
    policy: str | None = None  # the saved PPO policy `ppo+policy` applies (zero-shot transfer)
    # `windq fidelity` at every budget and variant (the knapsack's objective against the real KL of
    # its optimum and this many near-optimal rivals), once per source-type setting the methods use
    fidelity_rivals: int = 0


# a bench method is `NAME[@GRANULARITY][+verify][+exclude]`: +verify is `windq plan --verify` (the
# chosen plan: the lowest held-in KL of the planner's own, the best uniform and every stock mix that
# fits), +exclude is `--exclude-source` (the source type, Q4_1 on the default, never planned),
# +policy (ppo only) applies the bench's --policy instead of training: a policy from another model
METHOD_MODIFIERS = ("verify", "exclude", "policy")


def split_width(variant: str) -> int | None:
    """The salient width of a `split:N` variant (the FFN-split model, #21), None for another variant."""
    from windq.errors import InputError

    if not variant.startswith("split:"):
        if variant not in ("unaligned", "aligned"):
            raise InputError(f"bench variant {variant!r}: use unaligned, aligned or split:N (N salient neurons per FFN)")
        return None
    n = variant.removeprefix("split:")
    if not n.isdigit() or int(n) <= 0:
        raise InputError(f"bench variant {variant!r}: split:N takes a positive number of salient neurons")
    return int(n)


def runs_on(variant: str, method: str) -> bool:
    """Whether a method can plan a variant: the verification and PPO's real loss run the model in
    torch, which windq does not do for the split layout (those pairs are listed as not run)."""
    name, _, mods = parse_method(method)
    return split_width(variant) is None or ("verify" not in mods and name != "ppo")


def parse_method(method: str) -> tuple[str, str, tuple[str, ...]]:
    """(allocator, granularity, modifiers) of a bench method such as `knapsack+verify+exclude`."""
    from windq.errors import InputError
    from windq.pipeline.planner import METHODS

    base, *mods = method.split("+")
    name, _, gran = base.partition("@")
    if name not in METHODS or any(m not in METHOD_MODIFIERS for m in mods):
        raise InputError(f"bench method {method!r}: NAME[@chunk:G][+verify][+exclude][+policy], NAME one of {', '.join(METHODS)}")
    if "policy" in mods and name != "ppo":
        raise InputError(f"bench method {method!r}: +policy applies a saved PPO policy, so only ppo+policy")
    return name, gran or "tensor", tuple(mods)


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both size and loss, by size."""
    out: list[tuple[float, float]] = []
    for x, y in sorted(points):
        if not out or y < out[-1][1]:
            out.append((x, y))
    return out


def judge_pairs(verified: "Row", rows: list["Row"]) -> list[tuple[float, float]]:
    """(held-in KL, held-out KLD) for every candidate of `verified` that is also a bench file of
    the same variant, matched by exact bits per weight (rows keep no type lists; two different
    plans of byte-identical size would be confused, which none of the rows measured here are)."""
    pairs = []
    for c in verified.held_in:
        match = [r for r in rows if r.variant == verified.variant and abs(r.bpw - c["bpw"]) < 1e-9]
        if match:
            pairs.append((c["kl"], match[0].kld))
    return pairs


def quick_config(model: str = "default") -> BenchConfig:
    """A CI-sized run: one budget, two mixes, few chunks."""
    return BenchConfig(
        model=model, budgets=(5.0,), methods=("uniform", "knapsack", "ppo", "knapsack+verify+exclude"), mixes=("Q8_0", "Q4_K_M"),
        variants=("unaligned", "aligned"), calib_tokens=1024, chunks=2, ppo_episodes=1, speed_tokens=8, fidelity_rivals=2,
    )  # fmt: skip


@dataclass
class Built:
    """One file of the bench: how it was made and its size."""

    variant: str
    method: str  # "llama.cpp:MIX" or windq method[@granularity]
    budget: float | None
    file: str = ""
    sha256: str = ""
    size_mb: float = float("nan")
    bpw: float = float("nan")  # bits per real weight
    seconds: dict = field(default_factory=dict)
    unreachable: bool = False  # the planner refused the budget
    chosen: str = ""  # +verify: the candidate kept ("windq knapsack", "uniform IQ4_NL", "llama.cpp Q3_K_M", …)
    held_in: list = field(default_factory=list)  # +verify: every candidate's row (label, bpw, held-in KL)


@dataclass
class Row:
    variant: str
    method: str
    budget: float | None
    size_mb: float
    bpw: float
    ppl: float
    kld: float
    top1: float
    gen_tok_s: float
    n_scored: int
    seconds: dict = field(default_factory=dict)
    ppl_stderr: float = float("nan")
    chosen: str = ""
    held_in: list = field(default_factory=list)


class Timer:
    """Wall time of one-off stages (calibration, alignment, tables), kept in a file so that a
    resumed run still reports the stages an earlier run did."""

    def __init__(self, path: Path):
        self.path = path
        self.times: dict[str, list[float]] = json.loads(path.read_text()) if path.exists() else {}

    def __call__(self, stage: str, fn: Callable, *a, **kw):
        from windq.files import atomic_write_text

        t0 = time.perf_counter()
        out = fn(*a, **kw)
        self.times.setdefault(stage, []).append(time.perf_counter() - t0)
        atomic_write_text(self.path, json.dumps(self.times))
        return out


def generation_speed(path: Path, n_tokens: int, threads: int) -> float:
    """Tokens per second of greedy generation, one token at a time (llama.cpp, `threads` threads)."""
    from windq import llamacpp

    llm = llamacpp.load_llama(path, n_ctx=256, n_threads=threads, n_threads_batch=threads)
    llm.create_completion("The history of", max_tokens=4, temperature=0.0)  # warm-up
    t0 = time.perf_counter()
    out = llm.create_completion("The history of", max_tokens=n_tokens, temperature=0.0)
    dt = time.perf_counter() - t0
    llm.close()
    return out["usage"]["completion_tokens"] / dt


def measure_speeds(
    files: dict[str, Path], path: Path, n_tokens: int, threads: int, rounds: int,
    speed: Callable[[Path, int, int], float] = generation_speed,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, float]:  # fmt: skip
    """Generation speed of every file (keyed by sha256): the median of `rounds` round-robin rounds.

    On a shared machine two sittings differ more than two files do (byte-identical files measured
    106 and 168 tok/s an hour apart), so speeds are only compared within one sitting: the whole set
    is measured together, and measured again whenever a file joins it. Cached in `path`.
    """
    from windq.files import atomic_write_text

    setup = {"tokens": n_tokens, "threads": threads, "rounds": rounds}
    if path.exists():
        cached = json.loads(path.read_text())
        if cached["setup"] == setup and files.keys() <= cached["tok_s"].keys():
            return {sha: cached["tok_s"][sha] for sha in files}
    runs: dict[str, list[float]] = {sha: [] for sha in files}
    for i in range(rounds):  # round-robin, so that a slow spell of the machine hits every file alike
        for sha, f in files.items():
            runs[sha].append(speed(f, n_tokens, threads))
        if progress:
            progress(i + 1, rounds)
    tok_s = {sha: statistics.median(v) for sha, v in runs.items()}
    atomic_write_text(path, json.dumps({"setup": setup, "tok_s": tok_s, "runs": runs}, indent=1))
    return tok_s


def size_at_equal_ppl(ppl: float, stock: list[Row]) -> float | None:
    """Size llama.cpp's mixes need for `ppl`, interpolated on their Pareto front (log PPL vs MB)."""
    pts = pareto_front([(r.size_mb, r.ppl) for r in stock])  # PPL falls as size grows
    if len(pts) < 2 or not pts[-1][1] <= ppl <= pts[0][1]:
        return None
    for (m0, p0), (m1, p1) in zip(pts, pts[1:]):
        if p1 <= ppl <= p0:
            f = (np.log(p0) - np.log(ppl)) / max(np.log(p0) - np.log(p1), 1e-12)
            return m0 + f * (m1 - m0)
    return None


def front_kld_at(mb: float, stock: list[Row]) -> float | None:
    """llama.cpp's KLD at `mb` megabytes, interpolated on its mixes' Pareto front (log KLD vs MB);
    None outside the front's range, where there is nothing to compare with."""
    pts = pareto_front([(r.size_mb, r.kld) for r in stock])
    for (m0, k0), (m1, k1) in zip(pts, pts[1:]):
        if m0 <= mb <= m1:
            f = (mb - m0) / max(m1 - m0, 1e-12)
            if k1 <= 0:  # a mix that is the source, copied (KLD 0): no logarithm to interpolate in
                return k0 + f * (k1 - k0)
            return float(np.exp(np.log(k0) + f * (np.log(k1) - np.log(k0))))
    return None


def best_within(mb: float, rows: list[Row]) -> Row | None:
    """The row of lowest KLD among `rows` of `mb` megabytes or fewer."""
    fits = [r for r in rows if r.size_mb <= mb]
    return min(fits, key=lambda r: r.kld) if fits else None


class EvalCache:
    """Per-chunk scores of one file against one reference, grown one chunk at a time.

    Chunk i's tokens do not depend on how many chunks a run asks for, so a 12-chunk run's scores
    are the first 12 of a 128-chunk run's, and an interrupted evaluation loses at most one chunk.
    """

    FIELDS = ("nll", "kld", "agree", "load_s", "decode_s", "score_s", "ref_s")

    def __init__(self, folder: Path, file_sha: str, ref_sha: str, text: str, ctx: int):
        key = hashlib.sha256(f"{file_sha}|{ref_sha}|{text}|{ctx}".encode()).hexdigest()[:16]
        self.path = folder / f"{key}.npz"
        self.data: dict[str, list] = {k: [] for k in self.FIELDS}
        if self.path.exists():
            z = load_arrays(self.path)
            self.data = {k: list(z[k]) for k in self.FIELDS}

    def __len__(self) -> int:
        return len(self.data["nll"])

    def append(self, scores, **seconds: float) -> None:
        from windq.files import atomic_output

        self.data["nll"].append(scores.nll)
        self.data["kld"].append(scores.kld)
        self.data["agree"].append(scores.agree)
        for k, v in seconds.items():
            self.data[k].append(v)
        with atomic_output(self.path) as tmp, open(tmp, "wb") as f:
            np.savez(f, **{k: np.asarray(v) for k, v in self.data.items()})

    def scores(self, n: int) -> list:
        from windq.export.scoring import ChunkScores

        return [ChunkScores(*(self.data[k][i] for k in ("nll", "kld", "agree"))) for i in range(n)]

    def seconds(self, n: int) -> dict[str, float]:
        return {k: float(np.sum(self.data[k][:n])) for k in ("load_s", "decode_s", "score_s", "ref_s")}


def evaluate_lockstep(
    files: list[Path], caches: list[EvalCache], chunks: np.ndarray, ref: Path, threads: int,
    progress: Callable[[int, int], None] | None = None,
) -> None:  # fmt: skip
    """Bring every file's cache to len(chunks) chunks, all files in lockstep, chunk by chunk.

    The reference is decoded once per chunk for all files, and every file is loaded for its
    chunk and closed after it (mmap from the page cache: a few per cent of a decode), so memory
    stays that of one model however many files there are, and at any moment every file has been
    scored on the same tokens.
    """
    from windq.export.scoring import Runner, log_softmax, score_logprobs

    ctx = chunks.shape[1]
    start = min((len(c) for c in caches), default=len(chunks))
    if start >= len(chunks):
        return
    ref_runner = Runner(ref, ctx, threads)
    try:
        for i in range(start, len(chunks)):
            todo = [(f, c) for f, c in zip(files, caches) if len(c) == i]
            t0 = time.perf_counter()
            lp_ref = log_softmax(ref_runner.scored_logits(chunks[i]))
            ref_share = (time.perf_counter() - t0) / max(len(todo), 1)
            for f, c in todo:
                t0 = time.perf_counter()
                r = Runner(f, ctx, threads)
                t1 = time.perf_counter()
                try:
                    logits = r.scored_logits(chunks[i])
                finally:
                    r.close()
                t2 = time.perf_counter()
                s = score_logprobs(log_softmax(logits), chunks[i][ctx // 2 + 1 :], lp_ref)
                c.append(s, load_s=t1 - t0, decode_s=t2 - t1, score_s=time.perf_counter() - t2, ref_s=ref_share)
            if progress:
                progress(i + 1, len(chunks))
    finally:
        ref_runner.close()


def run_bench(cfg: BenchConfig, out: str | Path, progress: Callable[[str], None] | None = None) -> dict:
    """Build every file (cached), evaluate them all in lockstep (cached per chunk), report."""
    from windq.export.scoring import summarize
    from windq.models.gguf_model import GGUFModel
    from windq.models.sources import resolve_model, resolve_text
    from windq.models.tokenizer import token_chunks

    for method in cfg.methods:
        parse_method(method)  # a bad method, variant or policy is refused before anything is built
    policy_sha = None
    if any("policy" in parse_method(m)[2] for m in cfg.methods):
        from windq.errors import InputError
        from windq.pipeline.ppo import load_policy

        if cfg.policy is None:
            raise InputError("bench method ppo+policy needs --policy FILE (a policy saved by `windq plan --save-policy`)")
        load_policy(cfg.policy)
        policy_sha = hashlib.sha256(Path(cfg.policy).read_bytes()).hexdigest()
    for variant in cfg.variants:
        split_width(variant)
    say = progress or (lambda _msg: None)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    timer = Timer(out / "stages.json")
    src = GGUFModel(resolve_model(cfg.model))
    built, fidelity = _build_all(cfg, out, src, timer, say, policy_sha)

    text = resolve_text(cfg.text, "evaluation")
    ctx = 512
    chunks = token_chunks(src.path, text.content, ctx, max_chunks=cfg.chunks, min_chunks=1, text_name=text.name)
    n = len(chunks)
    # a plan can come out byte-identical to another (PPO that keeps its knapsack warm start): one evaluation each
    files = {b.sha256: out / b.file for b in built if not b.unreachable}
    caches = {sha: EvalCache(out / "evals", sha, src.sha256, text.name, ctx) for sha in files}
    (out / "evals").mkdir(parents=True, exist_ok=True)
    start, t0 = min((len(c) for c in caches.values()), default=n), time.perf_counter()
    say(f"evaluate {len(files)} files on {n} chunks of {ctx} (from chunk {start})")

    def chunk_done(i: int, total: int) -> None:
        per = (time.perf_counter() - t0) / (i - start)
        say(f"chunk {i}/{total} ({per / 60:.1f} min per chunk, about {per * (total - i) / 60:.0f} min left)")

    evaluate_lockstep(list(files.values()), list(caches.values()), chunks, src.path, cfg.threads, progress=chunk_done)
    say(f"generation speed of {len(files)} files, {cfg.speed_rounds} rounds")
    speeds = measure_speeds(files, out / "speed.json", cfg.speed_tokens, cfg.threads, cfg.speed_rounds,
                            progress=lambda i, n: say(f"speed round {i}/{n}"))  # fmt: skip

    rows = []
    for b in built:
        if b.unreachable:
            rows.append(Row(b.variant, b.method, b.budget, *[float("nan")] * 6, 0, {"unreachable": True}))
            continue
        c = caches[b.sha256]
        r = summarize(b.file, c.scores(n), ctx=ctx, text_name=text.name, ref=src.path)
        secs = c.seconds(n)
        seconds = {**b.seconds, "eval": sum(secs.values()), "decode": secs["decode_s"]}
        rows.append(Row(b.variant, b.method, b.budget, b.size_mb, b.bpw, r.ppl, r.kld, r.top1, speeds[b.sha256], r.n_scored, seconds,
                        r.ppl_stderr, b.chosen, b.held_in))  # fmt: skip
    return _report(cfg, out, rows, timer, fidelity)


class ResultCache:
    """JSON results in a folder, one file per key (named by the key's hash), written atomically: what
    a resumed bench reads instead of recomputing."""

    def __init__(self, folder: Path):
        self.folder = folder

    def _path(self, key: str) -> Path:
        return self.folder / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"

    def __contains__(self, key: str) -> bool:
        return self._path(key).exists()

    def get(self, key: str, make: Callable[[], dict]) -> dict:
        """The result stored under `key`, or `make()`'s, stored first."""
        from windq.files import atomic_write_text

        path = self._path(key)
        if not path.exists():
            atomic_write_text(path, json.dumps(make()))
        return json.loads(path.read_text())


def _build_all(
    cfg: BenchConfig, out: Path, src, timer: Timer, say: Callable[[str], None], policy_sha: str | None
) -> tuple[list[Built], list[dict]]:
    """Every stock mix and every plan of the config, exported once, and the fidelity rows asked
    for; cached in OUT/results (a ppo+policy plan keyed by the policy file's hash too)."""

    from windq.errors import BudgetError
    from windq.export.quantize import export_gguf, quantize_bare, quantize_stock_mix
    from windq.models.align import align_gguf
    from windq.models.gguf_model import GGUFModel, file_sha256
    from windq.models.sources import resolve_text
    from windq.pipeline.calibrate import CalibrationConfig, calibrate, pad_calibration, save_calibration
    from windq.pipeline.imatrix import load_imatrix
    from windq.pipeline.planner import PlanConfig, load_tables, run_planner, tables_path
    from windq.pipeline.split import SPLIT_MODEL_FILE, SPLIT_STATS, split_workspace

    (out / "results").mkdir(parents=True, exist_ok=True)
    (out / "gguf").mkdir(exist_ok=True)
    # one imatrix for everything, from the unaligned model; the aligned twin gets it zero-padded
    stats = {"unaligned": out / "stats-unaligned", "aligned": out / "stats-aligned"}
    if not (stats["unaligned"] / CalibrationFiles.IMATRIX).exists():
        say("calibrate")
        cal = timer("calibrate", calibrate, src, resolve_text(cfg.text, "calibration"), CalibrationConfig(tokens=cfg.calib_tokens))
        save_calibration(cal, stats["unaligned"], src.architecture)
    models = {"unaligned": src}
    if "aligned" in cfg.variants:
        aligned_path = out / "gguf" / "aligned-f32.gguf"
        if not aligned_path.exists():
            say("align")
            timer("align", align_gguf, src, aligned_path)
        models["aligned"] = GGUFModel(aligned_path)
        if not (stats["aligned"] / CalibrationFiles.IMATRIX).exists():
            pad_calibration(stats["unaligned"], stats["aligned"], models["aligned"])
    for variant in cfg.variants:
        salient = split_width(variant)
        if salient is None:
            continue
        work = out / f"split-{salient}"
        if not (work / SPLIT_STATS / CalibrationFiles.META).exists():  # the last file split_workspace writes
            say(f"split {salient}")
            timer(f"split ({salient})", split_workspace, src, stats["unaligned"], salient, work)
        models[variant], stats[variant] = GGUFModel(work / SPLIT_MODEL_FILE), work / SPLIT_STATS

    results = ResultCache(out / "results")

    def cached(key: str, make: Callable[[], Built]) -> Built:
        return Built(**results.get(key, lambda: asdict(make())))

    def finish(b: Built, path: Path) -> Built:
        m = GGUFModel(path)
        b.file, b.sha256 = str(path.relative_to(out)), file_sha256(path)
        b.size_mb, b.bpw = os.path.getsize(path) / 1e6, bits_per_weight(m.nbytes, m.n_real_weights)
        return b

    built: list[Built] = []
    for variant in cfg.variants:
        m = models[variant]
        im = load_imatrix(stats[variant] / CalibrationFiles.IMATRIX, m)
        base = f"{m.sha256}|{im.sha256()}"
        if cfg.budgets and cfg.methods and not tables_path(m, stats[variant], im.sha256()).is_file():
            say(f"sensitivity tables {variant}")
            timer(f"tables ({variant})", load_tables, m, stats[variant], im.data, im.sha256(), threads=cfg.threads)
        # llama.cpp's mixes are rivals of the source's layouts; on the split layout they would be
        # its MoE rules applied to a model it does not know is dense
        for mix in cfg.mixes if split_width(variant) is None else ():
            def stock(mix=mix, m=m, im=im, variant=variant) -> Built:
                say(f"quantize {variant} {mix}")
                path = out / "gguf" / f"{variant}-stock-{mix}.gguf"
                t0 = time.perf_counter()
                quantize_stock_mix(m, mix, path, imatrix=im.data)
                return finish(Built(variant, f"llama.cpp:{mix}", None, seconds={"quantize": time.perf_counter() - t0}), path)

            built.append(cached(f"{base}|stock|{mix}", stock))
        for budget in cfg.budgets:
            for method in (m for m in cfg.methods if runs_on(variant, m)):
                name, gran, mods = parse_method(method)
                def plan_and_export(name=name, gran=gran, mods=mods, budget=budget, m=m, im=im, variant=variant, method=method) -> Built:
                    say(f"plan {variant} {method} {budget}")
                    t0 = time.perf_counter()
                    try:
                        res = run_planner(m, stats[variant], PlanConfig(
                            bpw=budget, method=name, granularity=gran, episodes=cfg.ppo_episodes, threads=cfg.threads,
                            objective=cfg.objective, verify="verify" in mods, exclude_source="exclude" in mods,
                            policy=cfg.policy if "policy" in mods else None))  # fmt: skip
                    except BudgetError:
                        return Built(variant, method, budget, unreachable=True)
                    plan_s = time.perf_counter() - t0
                    path = out / "gguf" / f"{variant.replace(':', '')}-{method.replace(':', '')}-{budget}.gguf"
                    t0 = time.perf_counter()
                    export_gguf(m, res.plan, path, imatrix=im.data)
                    export_s = time.perf_counter() - t0
                    # the same quantization as a bare llama.cpp call, for the export overhead ratio
                    with tempfile.TemporaryDirectory(dir=out / "gguf") as tmp:
                        t0 = time.perf_counter()
                        quantize_bare(m, res.plan, Path(tmp) / "bare.gguf", imatrix=im.data)
                        bare_s = time.perf_counter() - t0
                    verified = res.plan.provenance.get("verified") or {}
                    b = Built(variant, method, budget, seconds={"plan": plan_s, "export": export_s, "bare_quantize": bare_s},
                              chosen=verified.get("chosen", ""), held_in=verified.get("candidates", []))  # fmt: skip
                    return finish(b, path)

                key = f"{base}|{method}|{budget}|{cfg.ppo_episodes}|{cfg.objective}" + (f"|{policy_sha}" if "policy" in mods else "")
                if name == "ppo":  # a PPO row from before it collected several episodes per update is not reused
                    from windq.pipeline.ppo import episodes_per_update

                    key += f"|per-update{episodes_per_update(cfg.ppo_episodes)}"
                built.append(cached(key, plan_and_export))
    fidelity = []
    for variant in cfg.variants if cfg.fidelity_rivals else ():
        if split_width(variant) is not None:
            continue  # the real loss does not run the split layout
        fidelity += _fidelity_rows(cfg, variant, models[variant], stats[variant], results, say)
    return built, fidelity


def _fidelity_rows(cfg: BenchConfig, variant: str, m, statsdir: Path, results: "ResultCache", say: Callable[[str], None]) -> list[dict]:
    """`windq fidelity` at every budget, once per source-type setting the methods use: one judge per
    setting for all its uncached budgets."""
    from windq.pipeline import fidelity as fidelity_
    from windq.pipeline.imatrix import load_imatrix

    im = load_imatrix(statsdir / CalibrationFiles.IMATRIX, m)
    rows = []
    for excluded in sorted({"exclude" in parse_method(x)[2] for x in cfg.methods}):
        def key(budget: float) -> str:
            return f"{m.sha256}|{im.sha256()}|fidelity|{budget}|{excluded}|{cfg.fidelity_rivals}|{cfg.objective}"

        def measure(todo: list[float]) -> dict[float, dict]:
            say(f"fidelity {variant} {', '.join(map(str, todo))}{' source excluded' if excluded else ''}")
            done = fidelity_.run(m, statsdir, todo, rivals=cfg.fidelity_rivals, objectives=(cfg.objective,),
                                 exclude_source=excluded, threads=cfg.threads, skip_unreachable=True)  # fmt: skip
            got = {r.bpw: {"plans": len(r.real), "tokens": r.tokens, "spearman": r.spearman, "split_half": r.judge_split_half,
                           "optimum_rank": r.optimum_rank,
                           "spread": float(r.real.max() / r.real.min() - 1) if r.real.min() > 0 else float("nan")}
                   for r in done}  # fmt: skip
            return {b: got.get(b, {"unreachable": True}) for b in todo}

        # the budgets not measured before are measured together, with one judge
        todo = [b for b in cfg.budgets if key(b) not in results]
        measured = measure(todo) if todo else {}
        for b in cfg.budgets:
            rows.append({"variant": variant, "budget": b, "excluded": excluded, **results.get(key(b), lambda b=b: measured[b])})
    return rows


def _report(cfg: BenchConfig, out: Path, rows: list[Row], timer: Timer, fidelity: list[dict] = ()) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from windq.files import atomic_output, atomic_write_text
    from windq.pipeline.fidelity import judge_ceiling

    ok = [r for r in rows if not r.seconds.get("unreachable")]
    stock = [r for r in ok if r.method.startswith("llama.cpp:")]
    n_scored = max((r.n_scored for r in ok), default=0)  # evaluated in lockstep: the same tokens for every file
    lines = [
        f"{cfg.model} ({', '.join(cfg.variants)}); held-out `{cfg.text}` text, {n_scored:,} scored tokens per file "
        "(512-token chunks, second half scored); KLD against the source. Every file is scored on the "
        "same tokens, so differences between files are less noisy than each PPL's standard error.",
        "",
        "| variant | method | budget | size (MB) | bits/real weight | PPL ± s.e. | KLD | top-1 | gen tok/s (2 thr) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(ok, key=lambda r: (r.variant, r.bpw)):
        lines.append(
            f"| {r.variant} | {r.method}{f' → {r.chosen}' if r.chosen else ''} | {'—' if r.budget is None else f'{r.budget:g}'} | {r.size_mb:.2f} | {r.bpw:.3f} "
            f"| {r.ppl:.3f} ± {r.ppl_stderr:.2f} | {r.kld:.4f} | {100 * r.top1:.1f} % | {r.gen_tok_s:.1f} |"
        )
    unreachable = [f"{r.variant} {r.method} @ {r.budget:g}" for r in rows if r.seconds.get("unreachable")]
    if unreachable:
        lines.append(f"\nUnreachable budgets (refused by the planner): {', '.join(unreachable)}")
    not_run = [f"{v} {m}" for v in cfg.variants for m in cfg.methods if not runs_on(v, m)]
    if not_run:
        lines.append(f"\nNot run (the verification and PPO's real loss need torch, which the split layout does not run in): {', '.join(not_run)}")

    # the FFN split (#21) against the same method's dense plan at the same budget
    pairs = [(r, d) for r in ok if split_width(r.variant) for d in ok
             if d.variant == "unaligned" and d.method == r.method and d.budget == r.budget]  # fmt: skip
    if pairs:
        lines += ["", "FFN split against the dense file of the same method and budget (unaligned):", "",
                  "| variant | method | budget | split: MB, KLD, PPL | dense: MB, KLD, PPL | KLD split ÷ dense | gen tok/s split ÷ dense |",
                  "|---|---|---:|---|---|---:|---:|"]  # fmt: skip
        for r, d in sorted(pairs, key=lambda p: (p[0].variant, p[0].method, p[0].budget)):
            lines.append(
                f"| {r.variant} | {r.method} | {r.budget:g} | {r.size_mb:.2f}, {r.kld:.4f}, {r.ppl:.3f} | {d.size_mb:.2f}, {d.kld:.4f}, {d.ppl:.3f} "
                f"| {r.kld / d.kld:.3f} | {r.gen_tok_s / d.gen_tok_s:.3f} |"
            )

    # the verified choices: what each +verify plan was measured against on held-in tokens
    verified = [r for r in ok if r.held_in]
    if verified:
        lines += ["", "Verified choices (`+verify`): every candidate's real KL on the held-in judge chunks (RealLoss), lowest first.", "",
                  "| variant | method | budget | candidates: held-in KL (bits/weight) |", "|---|---|---:|---|"]  # fmt: skip
        for r in sorted(verified, key=lambda r: (r.variant, r.method, r.budget)):
            cands = "; ".join(f"{c['label']}: {c['kl']:.4f} ({c['bpw']:.3f})" for c in r.held_in)
            lines.append(f"| {r.variant} | {r.method} | {r.budget:g} | {cands} |")
        # does the held-in judge rank plans as llama.cpp does on held-out text? every candidate
        # this bench also evaluated (matched by its exact bits per weight) pairs the two measures
        lines += ["", "Judge agreement: Spearman rank correlation between a verification's held-in KL and the held-out KLD "
                  "llama.cpp measured, over the candidates the bench also evaluated.", "",
                  "| variant | method | budget | candidates matched | Spearman |", "|---|---|---:|---:|---:|"]  # fmt: skip
        for r in sorted(verified, key=lambda r: (r.variant, r.method, r.budget)):
            pairs = judge_pairs(r, ok)
            rho = spearman([a for a, _ in pairs], [b for _, b in pairs]) if len(pairs) >= 3 else float("nan")
            lines.append(f"| {r.variant} | {r.method} | {r.budget:g} | {len(pairs)} of {len(r.held_in)} | {rho:.2f} |")

    # every windq plan against the simplest rivals of equal or smaller size (either variant), and
    # against llama.cpp's front at equal bytes (the planner issue's target: 25 % below it)
    uniform = [r for r in ok if r.method.split("+")[0] == "uniform"]
    planned = [r for r in ok if r not in stock and r not in uniform]
    if planned:
        lines += ["", "windq's plans against the rivals of equal or smaller size (any variant): the lowest-KLD uniform plan and "
                  "llama.cpp mix; and llama.cpp's KLD at the same size on its mixes' Pareto front (interpolated in log KLD).", "",
                  "| variant | method | budget | MB | KLD | best uniform ≤ MB: method, MB, KLD | best mix ≤ MB: mix, MB, KLD "
                  "| front's KLD at MB | KLD ÷ front |", "|---|---|---:|---:|---:|---|---|---:|---:|"]  # fmt: skip
        for r in sorted(planned, key=lambda r: (r.variant, r.method, r.budget or 0)):
            cells = []
            for rival in (best_within(r.size_mb, uniform), best_within(r.size_mb, stock)):
                cells.append("none fits" if rival is None else f"{rival.variant} {rival.method}{f' → {rival.chosen}' if rival.chosen else ''}, {rival.size_mb:.2f}, {rival.kld:.4f}")
            front = front_kld_at(r.size_mb, stock)
            lines.append(f"| {r.variant} | {r.method} | {'—' if r.budget is None else f'{r.budget:g}'} | {r.size_mb:.2f} | {r.kld:.4f} | {cells[0]} | {cells[1]} "
                         f"| {'outside the front' if front is None else f'{front:.4f}'} | {'—' if front is None else f'{r.kld / front:.3f}'} |")  # fmt: skip

    # does the knapsack's objective rank near-optimal plans as the real loss does? (target ≥ 0.9)
    if fidelity:
        lines += ["", f"Fidelity (`windq fidelity`, objective `{cfg.objective}`): the knapsack's optimum and {cfg.fidelity_rivals} near-optimal "
                  "rivals measured by the real KL on the held-in judge tokens; Spearman between predicted and real, the judge's "
                  "split-half agreement (its own noise floor), the judge's ceiling (about the Spearman a perfect objective could reach "
                  "on these tokens, √(2r/(1+r)) for split-half r), the optimum's rank and how far the worst plan is above the best.", "",
                  "| variant | source type | budget | plans | Spearman | judge split-half | judge ceiling | optimum's rank | worst ÷ best − 1 |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
        for f in sorted(fidelity, key=lambda f: (f["variant"], f["excluded"], f["budget"])):
            src_type = "excluded" if f["excluded"] else "allowed"
            if f.get("unreachable"):
                lines.append(f"| {f['variant']} | {src_type} | {f['budget']:g} | unreachable | | | | | |")
                continue
            lines.append(f"| {f['variant']} | {src_type} | {f['budget']:g} | {f['plans']} | {f['spearman']:.2f} | {f['split_half']:.2f} "
                         f"| {judge_ceiling(f['split_half']):.2f} | {f['optimum_rank']} | {100 * f['spread']:.1f} % |")  # fmt: skip

    # size at equal PPL: windq's best plan at each budget against llama.cpp's best mixes
    lines += ["", "| budget | windq best (variant, method) | size (MB) | PPL | llama.cpp size at that PPL (MB) | ratio |", "|---:|---|---:|---:|---:|---:|"]
    ratios = {}
    for b in cfg.budgets:
        cands = [r for r in ok if r.budget == b]
        if not cands:
            continue
        best = min(cands, key=lambda r: r.ppl)
        ref = size_at_equal_ppl(best.ppl, stock)
        ratio = None if ref is None else best.size_mb / ref
        ratios[b] = ratio
        lines.append(
            f"| {b:g} | {best.variant} {best.method} | {best.size_mb:.2f} | {best.ppl:.3f} | "
            f"{'outside llama.cpp range' if ref is None else f'{ref:.2f}'} | {'—' if ratio is None else f'{ratio:.3f}'} |"
        )

    # wall times and ratios (medians over the runs of each stage)
    med = lambda xs: statistics.median(xs) if xs else float("nan")  # noqa: E731
    plan_rows = [r for r in ok if "plan" in r.seconds]
    export_ratio = med([r.seconds["export"] / r.seconds["bare_quantize"] for r in plan_rows if r.seconds.get("bare_quantize")])
    eval_ratio = med([r.seconds["eval"] / r.seconds["decode"] for r in ok])
    stage = {k: med(v) for k, v in timer.times.items()}
    stage["llama.cpp quantize of a stock mix (median)"] = med([r.seconds["quantize"] for r in ok if "quantize" in r.seconds])
    for name in sorted({r.method for r in plan_rows}):
        stage[f"plan {name} (median)"] = med([r.seconds["plan"] for r in plan_rows if r.method == name])
    stage.update({
        "export (median)": med([r.seconds["export"] for r in plan_rows]),
        "bare llama_model_quantize, same overrides (median)": med([r.seconds["bare_quantize"] for r in plan_rows]),
        "eval of one file with KLD (median)": med([r.seconds["eval"] for r in ok]),
        "llama.cpp decode within it (median)": med([r.seconds["decode"] for r in ok]),
    })  # fmt: skip
    lines += ["", "| stage | wall time (s) |", "|---|---:|"] + [f"| {k} | {v:.1f} |" for k, v in stage.items()]
    lines += [
        "",
        f"export ÷ bare `llama_model_quantize` with the same overrides (median over plans): {export_ratio:.2f}",
        f"eval (load, decode, scoring, share of the reference's decode) ÷ llama.cpp's decode of the same file (median over files): {eval_ratio:.2f}",
    ]
    table = "\n".join(lines) + "\n"
    atomic_write_text(out / "bench.md", table)

    # three fronts a reader can tell apart, one panel per variant: windq's plans (every method but
    # uniform), the uniform plans, llama.cpp's mixes; each the lower envelope of its points, solid
    # with the source type allowed, dashed with it excluded (+exclude)
    fronts = {
        "windq": dict(color="tab:blue", marker="o"),
        "uniform": dict(color="tab:orange", marker="^"),
        "llama.cpp mixes": dict(color="black", marker="s"),
    }

    def front_of(r: Row) -> str:
        return "llama.cpp mixes" if r.method.startswith("llama.cpp") else "uniform" if r.method.startswith("uniform") else "windq"

    for metric, fname in (("ppl", "pareto-ppl.png"), ("kld", "pareto-kld.png")):
        fig, axes = plt.subplots(1, len(cfg.variants), figsize=(6.5 * len(cfg.variants), 4.5), squeeze=False)
        for ax, variant in zip(axes[0], cfg.variants):
            for front, style in fronts.items():
                for excluded in (False, True):
                    pts = [(r.bpw, getattr(r, metric)) for r in ok if r.variant == variant and front_of(r) == front
                           and ("+exclude" in r.method) == excluded]  # fmt: skip
                    env = pareto_front(pts)
                    if not env:
                        continue
                    ax.scatter(*zip(*pts), s=12, alpha=0.35, color=style["color"], marker=style["marker"])
                    label = front + (" (source type excluded)" if excluded else "")
                    ax.plot(*zip(*env), linestyle="--" if excluded else "-", label=label, **style)
            ax.set_title(variant)
            ax.set_xlabel("bits per real weight")
            ax.set_ylabel("PPL" if metric == "ppl" else "KLD vs source (nats/token)")
            ax.set_yscale("log")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        with atomic_output(out / fname) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
        plt.close(fig)
    summary = {"rows": [asdict(r) for r in rows], "fidelity": list(fidelity), "ratios": ratios, "stages": stage, "export_ratio": export_ratio,
               "eval_ratio": eval_ratio, "config": asdict(cfg)}  # fmt: skip
    atomic_write_text(out / "bench.json", json.dumps(summary, indent=1, default=str))
    return {"table": table, **summary}

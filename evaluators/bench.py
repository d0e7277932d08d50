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
    speed_tokens: int = 64
    threads: int = 2


def quick_config(model: str = "default") -> BenchConfig:
    """A CI-sized run: one budget, two mixes, few chunks."""
    return BenchConfig(
        model=model, budgets=(5.0,), methods=("uniform", "knapsack", "ppo"), mixes=("Q8_0", "Q4_K_M"),
        variants=("unaligned", "aligned"), calib_tokens=1024, chunks=2, ppo_episodes=1, speed_tokens=8,
    )  # fmt: skip


@dataclass
class Row:
    variant: str
    method: str  # "llama.cpp:MIX" or windq method[@granularity]
    budget: float | None
    size_mb: float
    bpw: float  # bits per real weight
    ppl: float
    kld: float
    top1: float
    gen_tok_s: float
    n_scored: int
    seconds: dict = field(default_factory=dict)


class Timer:
    def __init__(self):
        self.times: dict[str, list[float]] = {}

    def __call__(self, stage: str, fn: Callable, *a, **kw):
        t0 = time.perf_counter()
        out = fn(*a, **kw)
        self.times.setdefault(stage, []).append(time.perf_counter() - t0)
        return out


def generation_speed(path: Path, n_tokens: int, threads: int) -> float:
    """Tokens per second of greedy generation, one token at a time (llama.cpp, `threads` threads)."""
    from llama_cpp import Llama

    from windq.export import llama

    llama.llama_cpp()
    llm = Llama(model_path=str(path), n_ctx=256, n_threads=threads, n_threads_batch=threads, verbose=False)
    llm.create_completion("The history of", max_tokens=4, temperature=0.0)  # warm-up
    t0 = time.perf_counter()
    out = llm.create_completion("The history of", max_tokens=n_tokens, temperature=0.0)
    dt = time.perf_counter() - t0
    llm.close()
    return out["usage"]["completion_tokens"] / dt


def raw_decode_seconds(path: Path, tokens: np.ndarray, ctx: int, threads: int | None) -> float:
    """llama.cpp's own decode of the same chunks with no windq scoring: the floor eval can reach."""
    from windq.evaluators.perplexity import Runner

    r = Runner(path, ctx, threads)
    t0 = time.perf_counter()
    for i in range(len(tokens) // ctx):
        r.llm.reset()
        r.llm.eval(tokens[i * ctx : (i + 1) * ctx].tolist())
    dt = time.perf_counter() - t0
    r.close()
    return dt


def size_at_equal_ppl(ppl: float, stock: list[Row]) -> float | None:
    """Size llama.cpp's mixes need for `ppl`, interpolated on their Pareto front (log PPL vs MB)."""
    front = sorted((r.size_mb, r.ppl) for r in stock)
    pts = []
    for mb, p in front:  # keep the Pareto front: PPL falls as size grows
        if not pts or p < pts[-1][1]:
            pts.append((mb, p))
    if len(pts) < 2 or not pts[-1][1] <= ppl <= pts[0][1]:
        return None
    for (m0, p0), (m1, p1) in zip(pts, pts[1:]):
        if p1 <= ppl <= p0:
            f = (np.log(p0) - np.log(ppl)) / max(np.log(p0) - np.log(p1), 1e-12)
            return m0 + f * (m1 - m0)
    return None


def run_bench(cfg: BenchConfig, out: str | Path, progress: Callable[[str], None] | None = None) -> dict:
    import gguf

    from windq.evaluators.perplexity import evaluate
    from windq.files import atomic_output, atomic_write_text
    from windq.export import llama, registry
    from windq.export.quantize import export_gguf
    from windq.models.align import align_gguf
    from windq.models.gguf_model import GGUFModel
    from windq.models.sources import resolve_model, resolve_text
    from windq.models.tokenizer import Tokenizer
    from windq.pipeline.calibrate import CalibrationConfig, calibrate, pad_calibration, save_calibration
    from windq.pipeline.imatrix import load_imatrix
    from windq.pipeline.planner import PlanConfig, run_planner

    say = progress or (lambda _msg: None)
    out = Path(out)
    (out / "results").mkdir(parents=True, exist_ok=True)
    (out / "gguf").mkdir(exist_ok=True)
    timer = Timer()
    src = GGUFModel(resolve_model(cfg.model))
    text = resolve_text(cfg.text, "evaluation")

    # one imatrix for everything, from the unaligned model; the aligned twin gets it zero-padded
    stats = {"unaligned": out / "stats-unaligned", "aligned": out / "stats-aligned"}
    if not (stats["unaligned"] / "imatrix.gguf").exists():
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
        if not (stats["aligned"] / "imatrix.gguf").exists():
            pad_calibration(stats["unaligned"], stats["aligned"], models["aligned"])

    def cached(key: str, make: Callable[[], Row]) -> Row:
        path = out / "results" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
        if path.exists():
            return Row(**json.loads(path.read_text()))
        row = make()
        atomic_write_text(path, json.dumps(asdict(row)))
        return row

    def measure(variant: str, method: str, budget: float | None, gguf_path: Path, seconds: dict) -> Row:
        say(f"eval {variant} {method} {budget or ''}")
        t0 = time.perf_counter()
        r = evaluate(gguf_path, text.content, text_name=text.name, max_chunks=cfg.chunks, ref_path=src.path, threads=cfg.threads)
        seconds["eval"] = time.perf_counter() - t0
        m = GGUFModel(gguf_path)
        speed = generation_speed(gguf_path, cfg.speed_tokens, cfg.threads)
        return Row(variant, method, budget, os.path.getsize(gguf_path) / 1e6, m.nbytes * 8 / m.n_real_weights,
                   r.ppl, r.kld, r.top1, speed, r.n_scored, seconds)  # fmt: skip

    rows: list[Row] = []
    for variant in cfg.variants:
        m = models[variant]
        im = load_imatrix(stats[variant] / "imatrix.gguf", m)
        for mix in cfg.mixes:
            def stock(mix=mix, m=m, im=im, variant=variant) -> Row:
                path = out / "gguf" / f"{variant}-stock-{mix}.gguf"
                t0 = time.perf_counter()
                with atomic_output(path) as tmp:  # an interrupted run leaves no half-written mix behind
                    llama.quantize_file(str(m.path), str(tmp), ftype=int(gguf.LlamaFileType[f"MOSTLY_{mix}"]), imatrix=im.data)
                return measure(variant, f"llama.cpp:{mix}", None, path, {"quantize": time.perf_counter() - t0})

            rows.append(cached(f"{m.sha256}|stock|{mix}|{cfg.chunks}|{cfg.text}", stock))
        for budget in cfg.budgets:
            for method in cfg.methods:
                name, _, gran = method.partition("@")
                def plan_and_eval(name=name, gran=gran or "tensor", budget=budget, m=m, im=im, variant=variant, method=method) -> Row:
                    from windq.errors import BudgetError

                    t0 = time.perf_counter()
                    try:
                        res = run_planner(m, stats[variant], PlanConfig(
                            bpw=budget, method=name, granularity=gran, episodes=cfg.ppo_episodes, threads=cfg.threads))  # fmt: skip
                    except BudgetError:
                        return Row(variant, method, budget, float("nan"), float("nan"), float("nan"), float("nan"),
                                   float("nan"), float("nan"), 0, {"unreachable": True})  # fmt: skip
                    plan_s = time.perf_counter() - t0
                    path = out / "gguf" / f"{variant}-{method.replace(':', '')}-{budget}.gguf"
                    t0 = time.perf_counter()
                    export_gguf(m, res.plan, path, imatrix=im.data)
                    export_s = time.perf_counter() - t0
                    # the same quantization as a bare llama.cpp call, for the export overhead ratio
                    with tempfile.TemporaryDirectory(dir=out / "gguf") as tmp:
                        t0 = time.perf_counter()
                        llama.quantize_file(str(m.path), str(Path(tmp) / "bare.gguf"), ftype=llama.ftype_for("Q8_0"), pure=True,
                                            overrides={n: registry.get(t).id for n, t in res.plan.tensors.items()},
                                            imatrix=im.data)  # fmt: skip
                        bare_s = time.perf_counter() - t0
                    return measure(variant, method, budget, path, {"plan": plan_s, "export": export_s, "bare_quantize": bare_s})

                rows.append(cached(f"{m.sha256}|{method}|{budget}|{cfg.chunks}|{cfg.ppo_episodes}|{cfg.text}", plan_and_eval))

    # the floor for eval: raw decode of the same tokens by llama.cpp
    tok = Tokenizer(src.path)
    tokens = tok.tokenize(text.content, max_tokens=max(cfg.chunks, 2) * 512)
    tok.close()
    raw = raw_decode_seconds(src.path, tokens[: cfg.chunks * 512], 512, cfg.threads)
    return _report(cfg, out, rows, timer, raw)


def _report(cfg: BenchConfig, out: Path, rows: list[Row], timer: Timer, raw_decode_s: float) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if not r.seconds.get("unreachable")]
    stock = [r for r in ok if r.method.startswith("llama.cpp:")]
    lines = [
        "| variant | method | budget | size (MB) | bits/real weight | PPL | KLD | top-1 | gen tok/s (2 thr) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(ok, key=lambda r: (r.variant, r.bpw)):
        lines.append(
            f"| {r.variant} | {r.method} | {'—' if r.budget is None else f'{r.budget:g}'} | {r.size_mb:.2f} | {r.bpw:.3f} "
            f"| {r.ppl:.3f} | {r.kld:.4f} | {100 * r.top1:.1f} % | {r.gen_tok_s:.1f} |"
        )
    unreachable = [f"{r.variant} {r.method} @ {r.budget:g}" for r in rows if r.seconds.get("unreachable")]
    if unreachable:
        lines.append(f"\nUnreachable budgets (refused by the planner): {', '.join(unreachable)}")

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
    eval_s = med([r.seconds["eval"] for r in ok if r.variant == "unaligned"])
    stage = {k: med(v) for k, v in timer.times.items()}
    stage.update({
        "plan (median)": med([r.seconds["plan"] for r in plan_rows]),
        "export (median)": med([r.seconds["export"] for r in plan_rows]),
        "eval with KLD (median, unaligned)": eval_s,
        "raw llama.cpp decode of the same tokens": raw_decode_s,
    })  # fmt: skip
    for name in {r.method for r in plan_rows}:
        stage[f"plan {name} (median)"] = med([r.seconds["plan"] for r in plan_rows if r.method == name])
    lines += ["", "| stage | wall time (s) |", "|---|---:|"] + [f"| {k} | {v:.1f} |" for k, v in stage.items()]
    lines += [
        "",
        f"export ÷ bare `llama_model_quantize` with the same overrides (median): {export_ratio:.2f}",
        f"eval with KLD (model + reference) ÷ raw decode of one model: {eval_s / raw_decode_s:.2f}",
    ]
    table = "\n".join(lines) + "\n"
    (out / "bench.md").write_text(table)

    for metric, fname in (("ppl", "pareto-ppl.png"), ("kld", "pareto-kld.png")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for variant in cfg.variants:
            for method in sorted({r.method for r in ok if r.variant == variant and not r.method.startswith("llama.cpp")}):
                pts = sorted((r.bpw, getattr(r, metric)) for r in ok if r.variant == variant and r.method == method)
                ax.plot(*zip(*pts), marker="o", label=f"windq {method} ({variant})")
            pts = sorted((r.bpw, getattr(r, metric)) for r in stock if r.variant == variant)
            if pts:
                ax.plot(*zip(*pts), marker="s", linestyle=":", label=f"llama.cpp mixes ({variant})")
        ax.set_xlabel("bits per real weight")
        ax.set_ylabel("PPL" if metric == "ppl" else "KLD vs source (nats/token)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)
    summary = {"rows": [asdict(r) for r in rows], "ratios": ratios, "stages": stage, "export_ratio": export_ratio,
               "eval_ratio": eval_s / raw_decode_s, "config": asdict(cfg)}  # fmt: skip
    (out / "bench.json").write_text(json.dumps(summary, indent=1, default=str))
    return {"table": table, **summary}

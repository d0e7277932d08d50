"""Alignment as a planner choice: plan the model as it is and zero-padded (`windq align`), at the
same budget in bits per real weight, and keep whichever llama.cpp finds closer to the source.

Padding lets K and IQ types fit rows they otherwise cannot, but the padded weights are stored too
(a third more on SmolLM2), so which wins depends on the model and the budget. The proxy error
cannot settle it (at low bits it misleads), so both plans are exported and their KL divergence from
the source is measured by llama.cpp on held-in calibration tokens, never on the evaluation text.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from windq.errors import BudgetError, InputError, UnsupportedModelError
from windq.export.quantize import export_gguf
from windq.export.scoring import evaluate_chunks
from windq.models.align import aligned_geometry, align_gguf, geometry
from windq.models.gguf_model import GGUFModel
from windq.keys import CalibrationFiles, Keys
from windq.pipeline.calibrate import load_judge_tokens, pad_calibration
from windq.pipeline.imatrix import load_imatrix, read_imatrix
from windq.plan import Plan
from windq.pipeline.planner import PlanConfig, PlannerResult, check_calibration_folder, run_planner

ALIGNED_MODEL_FILE = "model.gguf"


@dataclass(frozen=True)
class Candidate:
    align: int | None  # None: the model as it is
    kld: float | None  # mean KL(source ‖ plan) on held-in tokens; None when the budget is unreachable
    ppl: float | None
    achieved_bpw: float | None
    unreachable: str | None = None


def aligned_statsdir(statsdir: Path, to: int = 256) -> Path:
    """The aligned twin's calibration folder, inside the model's own."""
    return Path(statsdir) / f"aligned-{to}"


def aligned_workspace(model: GGUFModel, statsdir: str | Path, to: int = 256) -> tuple[GGUFModel, Path]:
    """The aligned twin of `model` and its calibration folder, kept under STATS/aligned-TO/ and
    remade whenever the unaligned calibration changes."""
    statsdir = Path(statsdir)
    check_calibration_folder(statsdir)  # before writing an aligned model into it
    work = aligned_statsdir(statsdir, to)
    path = work / ALIGNED_MODEL_FILE
    meta = work / CalibrationFiles.META
    if not path.is_file() or GGUFModel(path).field(Keys.Twin.SOURCE_TYPES) is None:
        align_gguf(model, path, to)  # new, or made before twins recorded their source's types
    aligned = GGUFModel(path)
    source_sha = read_imatrix(statsdir / CalibrationFiles.IMATRIX).sha256()
    if not meta.is_file() or json.loads(meta.read_text()).get("padded_from_imatrix_sha256") != source_sha:
        pad_calibration(statsdir, work, aligned)
    return aligned, work


def can_align(model: GGUFModel, to: int = 256) -> bool:
    """Whether padding would change anything: a llama model with some width not a multiple of `to`."""
    try:
        g = geometry(model)
    except UnsupportedModelError:
        return False
    return aligned_geometry(g, to) != g


def plan_with_alignment(
    model: GGUFModel,
    statsdir: str | Path,
    cfg: PlanConfig,
    *,
    to: int = 256,
    chunks: int = 8,
    progress: Callable[[str, int, int], None] | None = None,
) -> tuple[PlannerResult, GGUFModel, list[Candidate]]:
    """Both plans at `cfg.bpw`; returns the better one, the model it is for, and what was measured."""
    statsdir = Path(statsdir)
    aligned, work = aligned_workspace(model, statsdir, to)
    options = [(None, model, statsdir), (to, aligned, work)]
    results: dict[int | None, PlannerResult] = {}
    unreachable: dict[int | None, str] = {}
    for align, m, stats in options:
        try:
            results[align] = run_planner(m, stats, cfg, progress)
        except BudgetError as e:
            unreachable[align] = str(e)
    if not results:
        raise BudgetError(f"as it is, {unreachable[None]}; aligned to {to}, {unreachable[to]}")

    measured: dict[int | None, tuple[float, float]] = {}
    tokens = load_judge_tokens(statsdir)[:chunks]
    if len(results) == 2:
        with tempfile.TemporaryDirectory() as tmp:
            paths = []
            for align, m, stats in options:
                path = Path(tmp) / f"align-{align}.gguf"
                export_gguf(m, results[align].plan, path, imatrix=load_imatrix(stats / CalibrationFiles.IMATRIX, m).data, threads=cfg.threads)
                paths.append(path)
            bar = (lambda d, t: progress("alignment", d, t)) if progress else None
            evals = evaluate_chunks(paths, tokens, text_name="held-in calibration tokens", ref_path=model.path, threads=cfg.threads, progress=bar)
        measured = {align: (r.kld, r.ppl) for (align, _, _), r in zip(options, evals)}
        best = min(measured, key=lambda a: measured[a][0])
    else:
        best = next(iter(results))

    candidates = [
        Candidate(
            align, *measured.get(align, (None, None)),
            achieved_bpw=results[align].plan.achieved_bpw if align in results else None, unreachable=unreachable.get(align),
        )  # fmt: skip
        for align, _, _ in options
    ]
    chosen = results[best]
    plan = chosen.plan
    prov = dict(plan.provenance)
    prov["alignment"] = {
        "chosen": best,
        "measured_on": f"{len(tokens)} held-in calibration chunks, KLD vs the source by llama.cpp" if measured else None,
        "candidates": [dataclasses.asdict(c) for c in candidates],
    }
    chosen.plan = plan = dataclasses.replace(plan, provenance=prov)
    if best:
        chosen.plan = with_align_provenance(plan, model, to)
    return chosen, aligned if best else model, candidates


def with_align_provenance(plan: Plan, source: GGUFModel, to: int = 256) -> Plan:
    """A plan for the aligned model, recording how `windq export` remakes that model from `source`."""
    prov = {**plan.provenance, "align": {"to": to, "source_sha256": source.sha256, "source_name": source.path.name}}
    return dataclasses.replace(plan, provenance=prov)


@dataclass
class Planned:
    """What `windq plan` (and `windq quantize`) made: the result, the model it is for (the source
    or its aligned twin) with that model's calibration folder, and the alignment candidates
    measured when both were planned."""

    result: PlannerResult
    model: GGUFModel
    statsdir: Path
    alignment: list[Candidate]


def plan_model(
    model: GGUFModel, statsdir: str | Path, cfg: PlanConfig, align: str | int = "auto", progress: Callable[[str, int, int], None] | None = None
) -> Planned:
    """Plan `model` as it is (`none`), aligned to a width, or both and keep the better (`auto`;
    only where alignment changes something)."""
    statsdir = Path(statsdir)
    if align == "none" or (align == "auto" and not can_align(model)):
        return Planned(run_planner(model, statsdir, cfg, progress), model, statsdir, [])
    if isinstance(align, int):
        aligned, work = aligned_workspace(model, statsdir, align)
        result = run_planner(aligned, work, cfg, progress)
        result.plan = with_align_provenance(result.plan, model, align)
        return Planned(result, aligned, work, [])
    if align != "auto":
        raise InputError(f"--align {align}: use auto, none or a width such as 256")
    result, chosen, candidates = plan_with_alignment(model, statsdir, cfg, progress=progress)
    return Planned(result, chosen, aligned_statsdir(statsdir) if chosen is not model else statsdir, candidates)

"""`windq quantize`: what a person with a size budget types. Calibrate (cached by model and text),
plan, verify, export, and check the file that comes out.

The budget is either bits per weight (as `windq plan --bpw`) or a size for the whole file,
metadata included (`--size 60MB`). A size is turned into a tensor budget by subtracting the
metadata the source carries plus a margin for what llama.cpp's quantizer adds (its own keys, the
alignment padding after every tensor); the written file is then measured, and if it is still over
the size the plan is made again with the excess taken off. Nothing is written to the output path
until a file that fits has been checked.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from windq.errors import BudgetError, InputError
from windq.export.quantize import ExportReport, export_gguf
from windq.keys import CalibrationFiles
from windq.models.gguf_model import GGUFModel
from windq.models.sources import Text
from windq.pipeline.alignment import Planned, plan_model
from windq.pipeline.calibrate import CalibrationConfig, calibrate, save_calibration
from windq.pipeline.imatrix import load_imatrix
from windq.pipeline.planner import PlanConfig, check_calibration_folder
from windq.plan import Plan

# per tensor, llama.cpp pads the data to the file's alignment (32 bytes by default); a file
# also gains the quantizer's own keys (file type, imatrix name, entry and chunk counts)
_PAD_PER_TENSOR = 32
_QUANTIZER_KEYS = 4096
_ATTEMPTS = 3  # plans made for a --size before giving up (each one is a little smaller)


@dataclass(frozen=True)
class Budget:
    """Either whole-file bytes or bits per weight (over every tensor's bytes), never both."""

    size: int | None = None
    bpw: float | None = None

    def __post_init__(self):
        if (self.size is None) == (self.bpw is None):
            raise InputError("give the budget as a size (--size 60MB) or as bits per weight (--bpw 4.5), one of them")
        if self.size is not None and self.size <= 0 or self.bpw is not None and self.bpw <= 0:
            raise InputError("the budget must be positive")


@dataclass
class QuantizeResult:
    path: Path
    export: ExportReport
    plan: Plan
    budget: Budget
    planned_bpw: float  # the tensor budget the final plan was made for
    statsdir: Path  # the calibration used (a cache folder unless one was given)
    calibrated: bool  # whether this run calibrated (False: found in the cache)
    attempts: int  # plans made (more than 1 when a --size needed the excess taken off)
    seconds: dict[str, float] = field(default_factory=dict)  # wall time per stage
    planned: Planned | None = None


def default_cache_dir() -> Path:
    """Where calibrations are kept between runs: $XDG_CACHE_HOME/windq/calibrations."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "windq" / "calibrations"


def calibration_key(model: GGUFModel, text: Text, cfg: CalibrationConfig) -> str:
    """What a calibration depends on: the model's bytes, the text's, and the settings (threads
    and streaming change nothing but speed and memory, so they are left out)."""
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("threads", "stream")}
    blob = json.dumps({"model": model.sha256, "text": text.sha256, "settings": settings}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cached_calibration(
    model: GGUFModel, text: Text, cfg: CalibrationConfig, cache: str | Path, progress: Callable[[int, int], None] | None = None
) -> tuple[Path, bool]:
    """The calibration folder for (model, text, cfg) under `cache`, made if missing. A folder is
    made under a temporary name and renamed when complete, so an interrupted run leaves none
    behind that a later run would trust. Returns (folder, whether it was made now)."""
    cache = Path(cache)
    folder = cache / f"{model.path.stem[:48]}-{calibration_key(model, text, cfg)}"
    if folder.is_dir():
        check_calibration_folder(folder)
        return folder, False
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".partial", dir=cache))
    try:
        save_calibration(calibrate(model, text, cfg, progress=progress), tmp, model.architecture)
        try:
            os.rename(tmp, folder)
        except OSError:  # another run finished the same calibration first: keep that one
            if not folder.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder, True


def file_overhead(model: GGUFModel) -> int:
    """Bytes of a quantized file that are not tensor data: the source's metadata and tensor index,
    with room for the quantizer's keys and per-tensor padding."""
    source_meta = model.path.stat().st_size - model.nbytes
    return max(source_meta, 0) + _QUANTIZER_KEYS + _PAD_PER_TENSOR * len(model.tensors)


def bpw_for_size(model: GGUFModel, size: int, excess: int = 0) -> float:
    """The tensor budget, in bits per real weight, that leaves a file of at most `size` bytes."""
    tensor_bytes = size - file_overhead(model) - excess
    if tensor_bytes <= 0:
        raise BudgetError(f"{size:,} bytes is less than the file's metadata alone ({file_overhead(model):,} bytes)")
    return tensor_bytes * 8 / model.n_real_weights


def quantize(
    model: GGUFModel,
    text: Text,
    out: str | Path,
    budget: Budget,
    plan_cfg: PlanConfig,
    *,
    calibration: CalibrationConfig = CalibrationConfig(),
    statsdir: str | Path | None = None,
    cache: str | Path | None = None,
    align: str | int = "auto",
    progress: Callable[[str, int, int], None] | None = None,
) -> QuantizeResult:
    """Calibrate (unless `statsdir` is given or the cache has it), plan within the budget, export
    through llama.cpp, check, and only then put the file at `out`. `plan_cfg.bpw` is ignored: the
    budget decides it."""
    out = Path(out)
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    calibrated = False
    if statsdir is None:
        bar = (lambda d, n: progress("calibrate", d, n)) if progress else None
        statsdir, calibrated = cached_calibration(model, text, calibration, cache or default_cache_dir(), bar)
    statsdir = Path(statsdir)
    check_calibration_folder(statsdir)
    seconds["calibrate"] = time.perf_counter() - t

    excess = 0
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:  # beside `out`, so the final rename stays on one disk
        for attempt in range(1, _ATTEMPTS + 1):
            bpw = budget.bpw if budget.bpw is not None else bpw_for_size(model, budget.size, excess)
            t = time.perf_counter()
            planned = plan_model(model, statsdir, dataclasses.replace(plan_cfg, bpw=bpw), align, progress)
            seconds["plan"] = seconds.get("plan", 0.0) + time.perf_counter() - t
            t = time.perf_counter()
            imatrix = load_imatrix(planned.statsdir / CalibrationFiles.IMATRIX, planned.model).data
            report = export_gguf(planned.model, planned.result.plan, Path(tmp) / out.name, imatrix=imatrix, threads=plan_cfg.threads)
            seconds["export"] = seconds.get("export", 0.0) + time.perf_counter() - t
            if budget.size is None or report.file_bytes <= budget.size:
                break
            # twice the excess: padding moves with the plan, so taking off exactly what was over can land a few bytes over again
            excess += 2 * (report.file_bytes - budget.size)
        else:
            raise BudgetError(f"after {_ATTEMPTS} plans the file is still {report.file_bytes - budget.size:,} bytes over {budget.size:,}")
        os.replace(report.path, out)
    report = dataclasses.replace(report, path=out)
    return QuantizeResult(out, report, planned.result.plan, budget, bpw, statsdir, calibrated, attempts=attempt, seconds=seconds, planned=planned)

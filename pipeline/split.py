"""The FFN-split twin as something the planner can plan (#21): the split model (models/ffn_split.py)
and a calibration folder for it, derived from the source's without running anything again.

The split model computes the same function, so every activation it sees is one the source saw:
a split tensor's statistics are its source tensor's, sliced the way its weights were. Gate and up
keep every input column (their rows are neurons), so they keep the source's imatrix and column
statistics and take the rows of its Fisher; down's columns are neurons, so it takes those columns
of every per-column statistic and of its Fisher.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from windq.files import atomic_output, atomic_write_text, load_arrays
from windq.keys import CalibrationFiles
from windq.models.ffn_split import Part, SplitReport, neuron_order, source_parts, split_ffn_gguf
from windq.models.gguf_model import GGUFModel
from windq.pipeline.calibrate import FisherStats, load_fisher, load_judge_tokens, load_tokens, save_fisher
from windq.pipeline.imatrix import Imatrix, load_imatrix, read_imatrix, save_imatrix
from windq.pipeline.planner import check_calibration_folder

SPLIT_MODEL_FILE = "model.gguf"
SPLIT_STATS = "stats"


def _cols(v: np.ndarray, part: Part | None) -> np.ndarray:
    return v if part is None or part.cols is None else v[part.cols]


def _rows(v: np.ndarray, part: Part | None) -> np.ndarray:
    return v if part is None or part.rows is None else v[part.rows]


def split_calibration(src_dir: str | Path, dst_dir: str | Path, split: GGUFModel) -> Path:
    """The source's calibration folder `src_dir`, for its split twin `split`, in `dst_dir`."""
    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    parts = source_parts(split)
    # split tensor → its source tensor (itself where it was not split)
    names = {n: parts[n].source if n in parts else n for n in split.tensors}

    im = read_imatrix(src_dir / CalibrationFiles.IMATRIX)
    planned = [n for n in names if names[n] in im.sums]
    sums = {n: _cols(im.sums[names[n]], parts.get(n)) for n in planned}
    counts = {n: im.counts[names[n]] for n in planned}
    save_imatrix(
        Imatrix(sums=sums, counts=counts, datasets=list(im.datasets), chunk_count=im.chunk_count, chunk_size=im.chunk_size),
        dst_dir / CalibrationFiles.IMATRIX, split.architecture,
    )  # fmt: skip

    acts_src = load_arrays(src_dir / CalibrationFiles.ACTIVATIONS)  # keys "tensor|statistic"
    acts = {}
    for n in planned:
        for key, v in acts_src.items():
            tensor, stat = key.split("|")
            if tensor == names[n]:
                acts[f"{n}|{stat}"] = _cols(v, parts.get(n))
    with atomic_output(dst_dir / CalibrationFiles.ACTIVATIONS) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **acts)

    fisher = load_fisher(src_dir)
    save_fisher(
        {n: FisherStats(rows=_rows(fisher[names[n]].rows, parts.get(n)), cols=_cols(fisher[names[n]].cols, parts.get(n)))
         for n in split.tensors if names[n] in fisher},
        dst_dir / CalibrationFiles.FISHER,
    )  # fmt: skip
    for name, load in ((CalibrationFiles.TOKENS, load_tokens), (CalibrationFiles.JUDGE_TOKENS, load_judge_tokens)):
        with atomic_output(dst_dir / name) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, load(src_dir))
    meta = json.loads((src_dir / CalibrationFiles.META).read_text())
    meta.update(model=split.path.name, model_sha256=split.sha256, architecture=split.architecture, split_from=str(src_dir),
                split_from_imatrix_sha256=im.sha256())  # fmt: skip
    atomic_write_text(dst_dir / CalibrationFiles.META, json.dumps(meta, indent=1) + "\n")
    return dst_dir


def split_workspace(model: GGUFModel, statsdir: str | Path, salient: int, out: str | Path) -> tuple[SplitReport, Path]:
    """OUT/model.gguf, `model` split at `salient` neurons per FFN with each layer's most salient
    neurons (by its calibration) in the first group, and OUT/stats, its calibration folder."""
    statsdir, out = Path(statsdir), Path(out)
    check_calibration_folder(statsdir)
    im = load_imatrix(statsdir / CalibrationFiles.IMATRIX, model)
    out.mkdir(parents=True, exist_ok=True)
    report = split_ffn_gguf(model, out / SPLIT_MODEL_FILE, salient, neuron_order(model, im.data))
    stats = split_calibration(statsdir, out / SPLIT_STATS, GGUFModel(report.path))
    return report, stats

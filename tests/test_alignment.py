"""Alignment as a planner choice: both plans at one budget, the one closer to the source kept."""

from __future__ import annotations

import json

import numpy as np
import pytest

from helpers import assert_one_line_error, windq
from windq.export.scoring import evaluate_chunks
from windq.models.gguf_model import GGUFModel
from windq.models.sources import Text
from windq.models.synthetic import SyntheticConfig, write_synthetic_gguf
from windq.pipeline.alignment import aligned_workspace, can_align, plan_with_alignment
from windq.pipeline.calibrate import CalibrationConfig, calibrate, load_judge_tokens, load_tokens, save_calibration
from windq.pipeline.imatrix import read_imatrix
from windq.pipeline.planner import PlanConfig

# every test here plans, exports and measures both sides through llama.cpp
pytestmark = pytest.mark.slow


# 448 wide (→ 512), 7 heads (→ 8), ffn 960 (→ 1024): padding costs about a fifth, as on many edge models
NEAR = SyntheticConfig(n_embd=448, n_head=7, n_head_kv=7, n_ff=960)


@pytest.fixture(scope="module")
def near_calibrated(tmp_path_factory, sample_text):
    d = tmp_path_factory.mktemp("nearcal")
    src = GGUFModel(write_synthetic_gguf(d / "near.gguf", NEAR))
    cal = calibrate(src, Text("sample", sample_text), CalibrationConfig(tokens=1024, ctx=128, threads=2))
    save_calibration(cal, d / "stats", src.architecture)
    return src, d / "stats"


def test_can_align_only_where_padding_changes_something(near_calibrated, synthetic_gguf):
    assert can_align(near_calibrated[0])
    assert not can_align(GGUFModel(synthetic_gguf))  # every width already a multiple of 256


def test_padded_calibration_is_the_unaligned_one_plus_zeros(near_calibrated):
    src, stats = near_calibrated
    aligned, work = aligned_workspace(src, stats)
    a, b = read_imatrix(stats / "imatrix.gguf"), read_imatrix(work / "imatrix.gguf")
    for name, v in a.data.items():
        w = b.data[name]
        assert np.array_equal(w[: len(v)], v) and not w[len(v) :].any()
    assert np.array_equal(load_tokens(stats), load_tokens(work))
    # reused while the unaligned calibration is unchanged
    mtime = (work / "imatrix.gguf").stat().st_mtime_ns
    aligned_workspace(src, stats)
    assert (work / "imatrix.gguf").stat().st_mtime_ns == mtime


def test_budget_only_alignment_reaches_picks_alignment(near_calibrated):
    """Unaligned, the rows take only 32-blocks (≥ 4.5 bits); aligned, IQ2/Q2_K reach lower."""
    src, stats = near_calibrated
    res, model, cands = plan_with_alignment(src, stats, PlanConfig(bpw=4.3, threads=2))
    assert model.is_aligned and res.plan.provenance["align"]["source_sha256"] == src.sha256
    assert cands[0].unreachable and cands[1].kld is None  # nothing to compare: no measurement
    assert res.plan.achieved_bpw <= 4.3


def test_choice_is_the_lower_measured_kld_and_export_reproduces_it(near_calibrated, tmp_path):
    src, stats = near_calibrated
    cfg = PlanConfig(bpw=6.0, threads=2)
    res, model, cands = plan_with_alignment(src, stats, cfg, chunks=4)
    assert all(c.kld is not None and c.unreachable is None for c in cands)
    best = min(cands, key=lambda c: c.kld)
    assert (res.plan.provenance.get("align") or {}).get("to") == best.align
    assert res.plan.provenance["alignment"]["chosen"] == best.align

    # the plan exported from the *unaligned* file (export re-aligns if the plan says so) measures
    # exactly what the planner measured
    plan_path = tmp_path / "plan.json"
    plan_path.write_text(res.plan.to_json())
    out = tmp_path / "chosen.gguf"
    r = windq("export", str(src.path), "--plan", str(plan_path), "--gguf", str(out), "--imatrix", str(stats / "imatrix.gguf"), "--threads", "2")
    assert r.returncode == 0, r.stderr
    [again] = evaluate_chunks([out], load_judge_tokens(stats)[:4], ref_path=src.path, threads=2)
    assert again.kld == best.kld


def test_cli_plan_reports_both_candidates(near_calibrated, tmp_path):
    src, stats = near_calibrated
    out = tmp_path / "p.json"
    r = windq("plan", str(src.path), "--stats", str(stats), "--bpw", "4.3", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "as it is:" in r.stdout and "chosen: aligned to 256" in r.stdout
    assert json.loads(out.read_text())["provenance"]["align"]["to"] == 256
    r = windq("plan", str(src.path), "--stats", str(stats), "--bpw", "4.3", "--align", "none", "--out", str(out))
    assert_one_line_error(r, "cannot be reached")
    r = windq("plan", str(src.path), "--stats", str(stats), "--bpw", "1.0", "--out", str(out))
    assert_one_line_error(r, "as it is,", "aligned to 256,", "cannot be reached")

"""The scale bench (evaluators/scale.py, the README's scale table) runs every stage as the CLI on a
synthetic model, records wall time and peak anonymous memory per stage, and reuses what it has
measured when run again."""

from __future__ import annotations

import json

import pytest

from windq.evaluators import scale
from windq.models.gguf_model import GGUFModel


@pytest.mark.slow
def test_scale_bench_measures_every_stage_and_resumes(tmp_path, capsys):
    scale.main(["--sizes", "256x2", "--tokens", "256", "--out", str(tmp_path)])
    results = json.loads((tmp_path / "scale.json").read_text())
    row = results["256x2"]
    assert list(row["stages"]) == ["calibrate --stream", "plan (tables from 256 rows)", "knapsack plan (tables cached)", "export",
                                   "ppo (one episode)", "verify (one mix)"]  # fmt: skip
    assert all(st["seconds"] > 0 and st["peak_anon_mb"] > 0 for st in row["stages"].values())
    assert not (tmp_path / "256x2" / "model.gguf").exists()  # removed after measuring: the biggest file
    plan = json.loads((tmp_path / "256x2" / "plan.json").read_text())
    out = GGUFModel(tmp_path / "256x2" / "out.gguf")
    assert {t: out.tensors[t].type_name for t in plan["tensors"]} == plan["tensors"]
    ppo = json.loads((tmp_path / "256x2" / "plan-ppo.json").read_text())["provenance"]["ppo"]
    assert ppo["episodes"] == 1 and ppo["kl"] is not None  # the streamed real loss judged it
    verified = json.loads((tmp_path / "256x2" / "plan-verified.json").read_text())["provenance"]["verified"]
    assert "llama.cpp Q4_K_M" in {c["label"] for c in verified["candidates"]}
    assert "| calibrate --stream |" in capsys.readouterr().out
    # a second run with the same size measures nothing again (the model is not even rebuilt)
    scale.main(["--sizes", "256x2", "--tokens", "256", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "scale.json").read_text()) == results
    assert not (tmp_path / "256x2" / "model.gguf").exists()

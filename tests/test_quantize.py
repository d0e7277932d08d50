"""`windq quantize`: a size in, a checked GGUF out, the calibration cached between runs."""

import dataclasses
import os

import pytest

from windq.errors import BudgetError, InputError
from windq.models.gguf_model import GGUFModel
from windq.models.sources import wiki_text
from windq.pipeline.calibrate import CalibrationConfig
from windq.pipeline.planner import PlanConfig
from windq.pipeline.quantize import Budget, bpw_for_size, calibration_key, file_overhead, quantize
from tests.helpers import assert_one_line_error, windq

SMALL = CalibrationConfig(tokens=512, ctx=128, fisher_chunks=1, judge_chunks=2)
CFG = PlanConfig(bpw=0.0)  # verification is the slow test's (default model) and test_verify's


@pytest.fixture(scope="module")
def synth_size(synthetic_gguf):
    """A size between the synthetic model's smallest and largest plan: 5 bits per weight plus its metadata."""
    m = GGUFModel(synthetic_gguf)
    return file_overhead(m) + int(5.0 * m.n_real_weights / 8)


@pytest.mark.slow  # calibrates, plans and exports twice (4 s); make test runs it, make test-fast does not
def test_a_size_budget_gives_a_file_within_it_and_the_calibration_is_cached(synthetic_gguf, synth_size, tmp_path):
    m, text, cache = GGUFModel(synthetic_gguf), wiki_text("calibration"), tmp_path / "cache"
    first = quantize(m, text, tmp_path / "a.gguf", Budget(size=synth_size), CFG, calibration=SMALL, cache=cache, align="none")
    assert first.calibrated and first.export.file_bytes == (tmp_path / "a.gguf").stat().st_size <= synth_size
    # the file holds what the verified plan says, tensor by tensor
    written = GGUFModel(tmp_path / "a.gguf")
    assert {n: written.tensors[n].type_name for n in first.plan.tensors} == first.plan.tensors
    second = quantize(m, text, tmp_path / "b.gguf", Budget(size=synth_size), CFG, calibration=SMALL, cache=cache, align="none")
    assert not second.calibrated and second.statsdir == first.statsdir
    assert second.plan.tensors == first.plan.tensors
    assert [p.name for p in cache.iterdir()] == [first.statsdir.name]  # no partial folder left
    # other text or other settings, other calibration; threads change nothing
    key = calibration_key(m, text, SMALL)
    assert calibration_key(m, wiki_text("evaluation"), SMALL) != key
    assert calibration_key(m, text, dataclasses.replace(SMALL, tokens=1024)) != key
    assert calibration_key(m, text, dataclasses.replace(SMALL, threads=1)) == key


@pytest.mark.slow  # calibrates through the CLI (4 s); make test runs it, make test-fast does not
def test_a_size_too_small_is_refused_and_nothing_is_written(synthetic_gguf, tmp_path):
    m = GGUFModel(synthetic_gguf)
    with pytest.raises(BudgetError):
        quantize(m, wiki_text("calibration"), tmp_path / "x.gguf", Budget(size=file_overhead(m) + 100), CFG,
                 calibration=SMALL, cache=tmp_path / "cache", align="none")  # fmt: skip
    assert not (tmp_path / "x.gguf").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name != "cache"] == []  # no temporary file left beside it
    with pytest.raises(BudgetError):
        bpw_for_size(m, 1000)


def test_the_budget_is_a_size_or_bits_never_both():
    for bad in ({}, {"size": 10, "bpw": 4.0}, {"size": 0}, {"bpw": -1.0}):
        with pytest.raises(InputError):
            Budget(**bad)


def test_cli_refuses_a_bad_size_in_one_line(tmp_path):
    assert_one_line_error(windq("quantize", "default", "--size", "60 parsecs", "-o", tmp_path / "x.gguf"), "size '60 parsecs'")
    assert_one_line_error(windq("quantize", "default", "-o", tmp_path / "x.gguf"), "--size", "--bpw")
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.slow
def test_quantize_end_to_end_on_the_default_model(tmp_path):
    """What the README promises: one command, a size, a file that fits and llama.cpp runs."""
    out = tmp_path / "smol.gguf"
    args = ("quantize", "default", "--size", "95MB", "-o", out, "--cache", tmp_path / "cache", "--tokens", "2048",
            "--align", "none", "--types", "Q8_0,Q6_K,Q5_1,Q5_0,Q4_1,Q4_0", "--verify-mixes", "Q4_0,Q5_0", "--verify-tokens", "512")  # fmt: skip
    r = windq(*args)
    assert r.returncode == 0, r.stderr
    # the verification's table: at 95 MB (5.54 bits) llama.cpp's Q4_0 mix (5.36 bits: Q4_1 on 3 tensors, Q8_0
    # embedding) fits; Q5_0's (over 6) does not
    assert "llama.cpp Q4_0" in r.stdout and "uniform" in r.stdout and "llama.cpp Q5_0" not in r.stdout
    assert 0 < out.stat().st_size <= 95_000_000 and "made now" in r.stdout
    ev = windq("eval", out, "--ref", "default", "--chunks", "2", "--json")
    assert ev.returncode == 0, ev.stderr
    r2 = windq(*args[:4], "-o", tmp_path / "again.gguf", *args[6:])
    assert r2.returncode == 0 and "cached" in r2.stdout
    assert (tmp_path / "again.gguf").read_bytes() == out.read_bytes()  # same calibration, same plan, same bytes
    assert os.listdir(tmp_path / "cache") and not [p for p in os.listdir(tmp_path) if p.endswith(".partial")]

"""Errors that used to escape as tracebacks, or be swallowed: each is now one line, or recorded."""

import numpy as np
import pytest
from helpers import assert_one_line_error, windq

from windq import llamacpp
from windq.errors import CalibrationError, ExportError, IllegalTypeError, InputError, PlanError
from windq.export import llama_quantize
from windq.models.gguf_model import GGUFModel
from windq.models.sources import wiki_text
from windq.models.synthetic import SyntheticConfig, write_synthetic_gguf
from windq.pipeline.allocate import Problem, Unit, solve_lagrangian
from windq.pipeline.imatrix import Imatrix
from windq.pipeline.planner import PlanConfig, run_planner
from windq.plan import uniform_plan, validate


def test_a_corrupt_imatrix_is_one_line(tmp_path, synthetic_gguf):
    bad = tmp_path / "imatrix.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 40)
    plan = tmp_path / "plan.json"
    plan.write_text(uniform_plan(GGUFModel(synthetic_gguf), "Q8_0").to_json())
    r = windq("export", synthetic_gguf, "--plan", plan, "--imatrix", bad, "--gguf", tmp_path / "out.gguf")
    assert_one_line_error(r, "imatrix.gguf: unreadable imatrix GGUF")
    assert not (tmp_path / "out.gguf").exists()


def test_identity_is_checked_before_anything_else(tmp_path, synthetic_gguf):
    """A plan for another model, with a type that would not fit this one: the message names the
    real cause (another model), not the type."""
    wide = GGUFModel(write_synthetic_gguf(tmp_path / "odd.gguf", SyntheticConfig(n_embd=192, n_head=3, n_head_kv=1, n_ff=320)))
    plan = uniform_plan(GGUFModel(synthetic_gguf), "Q4_K")  # Q4_K does not fit 192-wide rows
    with pytest.raises(PlanError, match="made for another model"):
        validate(plan, wide)


def test_an_imatrix_entry_that_saw_no_tokens_is_refused():
    im = Imatrix(sums={"blk.0.attn_q.weight": np.ones(4)}, counts={"blk.0.attn_q.weight": 0})
    with pytest.raises(CalibrationError, match="blk.0.attn_q.weight saw no tokens"):
        im.data


@pytest.mark.slow  # builds a second calibration's tables (5 s); make test runs it, make test-fast does not
def test_missing_importance_is_recorded_in_the_plan(synthetic_gguf, synthetic_stats):
    res = run_planner(GGUFModel(synthetic_gguf), synthetic_stats, PlanConfig(bpw=5.0))
    sub = res.plan.provenance["importance_substituted"]
    assert sub["tensors"] == ["token_embd.weight"]  # llama-imatrix (and windq) collect nothing for it


def test_lagrangian_with_non_finite_errors_raises_instead_of_returning_the_cheapest_plan():
    units = tuple(Unit(f"t{i}", 0, ("A", "B"), np.array([10, 20]), np.array([np.inf, 0.0])) for i in range(3))
    with pytest.raises(PlanError, match="non-finite"):
        solve_lagrangian(Problem(units, 0, 100, "tensor"), 45)


def test_llama_cpp_failures_carry_their_own_reason(tmp_path, synthetic_gguf):
    """The reason comes from the failing call's own log lines, never an older error's."""
    fake = tmp_path / "first-bad.gguf"
    fake.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(InputError, match="first-bad.gguf: llama.cpp could not load the model"):
        llamacpp.load_llama(fake)
    missing = tmp_path / "second.gguf"
    with pytest.raises(ExportError) as e:
        llama_quantize.quantize_file(str(missing), str(tmp_path / "out.gguf"), ftype=llama_quantize.ftype_for("Q8_0"))
    assert "second.gguf" in str(e.value) and "first-bad" not in str(e.value)
    assert "\n" not in str(e.value)


def test_reason_prefers_the_root_cause():
    lines = ["llama_model_load: error loading model: unknown pre-tokenizer type: 'nope'", "llama_model_load_from_file_impl: failed to load model"]
    assert llamacpp.reason(lines) == lines[0]
    assert llamacpp.reason([]) == "llama.cpp gave no reason"


def test_an_unknown_text_split_is_an_input_error():
    with pytest.raises(InputError, match="calibration and evaluation"):
        wiki_text("train")


def test_quantizing_without_required_importance_is_a_typed_error():
    from windq import ggml, registry

    with pytest.raises(IllegalTypeError, match="without importance data"):
        ggml.quantize(registry.get("IQ2_XXS").id, np.ones((1, 256), np.float32))
    with pytest.raises(CalibrationError, match="another model"):
        ggml.quantize(registry.get("Q8_0").id, np.ones((1, 256), np.float32), np.ones(128, np.float32))
    with pytest.raises(CalibrationError, match="another model"):  # two experts' importance for a dense matrix
        ggml.quantize(registry.get("Q8_0").id, np.ones((2, 256), np.float32), np.ones(512, np.float32))
    with pytest.raises(CalibrationError, match="another model"):  # one expert's for two
        ggml.quantize(registry.get("Q8_0").id, np.ones((2, 256), np.float32), np.ones(256, np.float32), experts=2)

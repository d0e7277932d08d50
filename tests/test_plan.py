import json

import pytest

from windq.errors import IllegalTypeError, InputError, PlanError
from windq.models.gguf_model import GGUFModel
from windq.plan import bits_per_weight, file_bytes, load_plan, make_plan, save_plan, uniform_plan, validate


def test_save_load_round_trip(synthetic_gguf, tmp_path):
    m = GGUFModel(synthetic_gguf)
    tensors = {t.name: ("Q4_K" if i % 2 else "Q8_0") for i, t in enumerate(m.quantizable())}
    plan = make_plan(m, tensors, method="manual", budget_bpw=7.0, provenance={"seed": 3})
    path = save_plan(plan, tmp_path / "plan.json")
    assert load_plan(path) == plan
    assert json.loads(path.read_text())["schema_version"] == 1


def test_achieved_bits_count_every_byte(synthetic_gguf):
    m = GGUFModel(synthetic_gguf)
    plan = uniform_plan(m, "Q8_0")
    norms = sum(t.nbytes for t in m.tensors.values() if t.name not in plan.tensors)
    weights = sum(t.n_elements for t in m.quantizable())
    assert file_bytes(m, plan.tensors) == norms + weights // 32 * 34
    assert plan.achieved_bpw == pytest.approx(bits_per_weight(m, plan.tensors))
    assert 8.5 < plan.achieved_bpw < 8.6  # F32 norms add a little above Q8_0's 8.5


def test_validate_refuses_unknown_missing_and_illegal(synthetic_gguf):
    m = GGUFModel(synthetic_gguf)
    good = uniform_plan(m, "Q4_K")
    validate(good, m)

    extra = make_plan(m, {**good.tensors, "blk.7.attn_q.weight": "Q8_0"}, method="manual")
    with pytest.raises(PlanError, match="blk.7.attn_q.weight"):
        validate(extra, m)

    missing = dict(good.tensors)
    missing.pop("blk.1.ffn_up.weight")
    with pytest.raises(PlanError, match="blk.1.ffn_up.weight"):
        validate(make_plan(m, missing, method="manual"), m)

    norm = make_plan(m, {**good.tensors, "blk.0.attn_norm.weight": "Q8_0"}, method="manual")
    with pytest.raises(PlanError, match="never quantizes"):
        validate(norm, m)

    iq = make_plan(m, {**good.tensors, "blk.0.attn_q.weight": "IQ2_XXS"}, method="manual")
    with pytest.raises(IllegalTypeError, match="imatrix"):
        validate(iq, m)
    validate(iq, m, imatrix_tensors={"blk.0.attn_q.weight"})

    # ggml itself aborts on IQ2_XXS without data, so even token_embd (which llama.cpp exempts) needs it
    emb = make_plan(m, {**good.tensors, "token_embd.weight": "IQ2_XXS"}, method="manual")
    with pytest.raises(IllegalTypeError, match="token_embd.weight"):
        validate(emb, m, imatrix_tensors={"blk.0.attn_q.weight"})
    # IQ3_XXS: llama.cpp's own exemption for token_embd holds and ggml does not need data
    validate(make_plan(m, {**good.tensors, "token_embd.weight": "IQ3_XXS"}, method="manual"), m)


def test_load_rejects_typos_and_unknown_types(tmp_path, synthetic_gguf):
    m = GGUFModel(synthetic_gguf)
    d = json.loads(uniform_plan(m, "Q8_0").to_json())
    d["budget_bwp"] = 3.0
    (tmp_path / "typo.json").write_text(json.dumps(d))
    with pytest.raises(PlanError, match="budget_bwp"):
        load_plan(tmp_path / "typo.json")

    d = json.loads(uniform_plan(m, "Q8_0").to_json())
    d["tensors"]["blk.0.attn_q.weight"] = "Q9_9"
    (tmp_path / "badtype.json").write_text(json.dumps(d))
    with pytest.raises(PlanError, match="badtype.json: .*unknown quant type 'Q9_9'"):
        load_plan(tmp_path / "badtype.json")

    (tmp_path / "notjson.json").write_text("hello")
    with pytest.raises(InputError):
        load_plan(tmp_path / "notjson.json")


def test_plan_for_another_model_is_refused(synthetic_gguf, tmp_path):
    from windq.models.synthetic import SyntheticConfig, write_synthetic_gguf

    other = GGUFModel(write_synthetic_gguf(tmp_path / "other.gguf", SyntheticConfig(seed=1)))
    plan = uniform_plan(GGUFModel(synthetic_gguf), "Q8_0")
    with pytest.raises(PlanError, match="another model"):
        validate(plan, other)

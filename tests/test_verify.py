"""The predictor's inputs, the verified choice and the fidelity figure, on the synthetic model."""

import pytest

from windq.errors import InputError
from windq.models.gguf_model import GGUFModel
from windq.pipeline import fidelity
from windq.pipeline.calibrate import load_fisher, load_judge_tokens, load_tokens
from windq.pipeline.planner import PlanConfig, run_planner
from windq.sizes import parse_size


def test_sizes_take_decimal_and_binary_units():
    assert parse_size("60MB") == 60_000_000
    assert parse_size("1.5 GiB") == 3 * 2**29
    assert parse_size("800kb") == 800_000
    assert parse_size("512B") == 512
    for bad in ("60", "60 MiBs", "MB", "-1MB", "0MB"):
        with pytest.raises(InputError):
            parse_size(bad)


def test_spearman_is_rank_correlation():
    assert fidelity.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert fidelity.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert fidelity.spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)


def test_judge_chunks_are_not_the_imatrix_tokens(synthetic_stats):
    judge, tokens = load_judge_tokens(synthetic_stats), load_tokens(synthetic_stats)
    assert len(judge) == 8 and judge.shape[1] == tokens.shape[1]
    assert not any((j == t).all() for j in judge for t in tokens)


def test_judge_refuses_more_tokens_than_the_folder_holds(synthetic_stats):
    from windq.errors import CalibrationError
    from windq.pipeline.planner import judge_sequences

    judge = load_judge_tokens(synthetic_stats)
    per = min(256, judge.shape[1])
    assert judge_sequences(judge, None).shape == judge_sequences(judge, len(judge) * per).shape == (len(judge), per)
    assert judge_sequences(judge, per + 1).shape == (2, per)  # whole sequences, never a cut one
    with pytest.raises(CalibrationError, match=f"--judge-chunks {len(judge) + 1}"):
        judge_sequences(judge, len(judge) * per + 1)  # once silently measured on fewer tokens


def test_ppo_beside_the_verification_is_refused_more_tokens_than_the_folder_holds(synthetic_gguf, synthetic_stats):
    """The verification takes every judge token by default; PPO's own request is checked too, not
    cut to the verification's judge."""
    from windq.errors import CalibrationError

    held = load_judge_tokens(synthetic_stats).size
    with pytest.raises(CalibrationError, match=f"{2 * held} judge tokens asked for"):
        run_planner(GGUFModel(synthetic_gguf), synthetic_stats, PlanConfig(bpw=4.0, method="ppo", episodes=1, verify=True, real_loss_tokens=2 * held))


def test_fisher_covers_every_planned_tensor_in_gguf_orientation(synthetic_gguf, synthetic_stats):
    m = GGUFModel(synthetic_gguf)
    fisher = load_fisher(synthetic_stats)
    for t in m.quantizable():
        f = fisher[t.name]
        assert f.cols.shape == (t.n_per_row,) and f.rows.shape == (t.n_elements // t.n_per_row,)
        assert (f.rows >= 0).all() and f.rows.sum() > 0
        assert f.rows.sum() == pytest.approx(f.cols.sum(), rel=1e-3)  # both are the Fisher's total


@pytest.mark.slow
def test_verified_plan_is_the_best_measured_candidate_within_budget(synthetic_gguf, synthetic_stats):
    m = GGUFModel(synthetic_gguf)
    r = run_planner(m, synthetic_stats, PlanConfig(bpw=5.0, objective="kl", verify=True, verify_tokens=512))
    v = r.plan.provenance["verified"]
    kls = [c["kl"] for c in v["candidates"]]
    assert kls == sorted(kls) and v["chosen"] == v["candidates"][0]["label"]
    labels = " ".join(c["label"] for c in v["candidates"])
    assert "windq knapsack" in labels and "uniform" in labels and "llama.cpp" in labels
    assert all(c["bpw"] <= 5.0 + 1e-9 for c in v["candidates"])
    assert r.plan.achieved_bpw <= 5.0 + 1e-9


@pytest.mark.slow  # 11 plans' real KL in torch (7 s); make test runs it, make test-fast does not
def test_fidelity_command_measures_the_optimum_and_its_rivals(synthetic_gguf, synthetic_stats):
    import json

    from tests.helpers import assert_one_line_error, windq

    r = windq("fidelity", synthetic_gguf, "--stats", synthetic_stats, "--bpw", "4.5,5.0", "--objective", "kl", "--rivals", "3", "--tokens", "512", "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [(row["bpw"], row["objective"]) for row in rows] == [(4.5, "kl"), (5.0, "kl")]
    for row in rows:
        assert row["plans"] == len(row["real_kl"]) == len(row["predicted"]) == 4  # the optimum and 3 rivals
        assert min(row["real_kl"]) >= 0 and -1 <= row["spearman"] <= 1 and 1 <= row["optimum_rank"] <= 4
        assert row["predicted"][0] == min(row["predicted"])  # the first plan is the objective's optimum
        assert max(row["bits"]) <= row["bpw"] + 1e-9
        assert -1 <= row["judge_split_half"] <= 1 and row["tokens"] == 512  # two sequences: one per half
        assert 0 <= row["judge_ceiling"] <= 1
    assert_one_line_error(windq("fidelity", synthetic_gguf, "--stats", synthetic_stats, "--bpw", "5", "--objective", "mse"), "mse")


def test_fidelity_refuses_an_unreachable_budget_or_leaves_it_out(synthetic_gguf, synthetic_stats):
    from windq.errors import BudgetError
    from windq.models.gguf_model import GGUFModel

    m = GGUFModel(synthetic_gguf)
    with pytest.raises(BudgetError):
        fidelity.run(m, synthetic_stats, [0.5], rivals=1)
    assert fidelity.run(m, synthetic_stats, [0.5], rivals=1, skip_unreachable=True) == []  # and no judge built


def test_fidelity_judge_split_half_compares_the_judge_with_itself(monkeypatch):
    """Each plan's KL is the mean over the judge's sequences; the split-half figure ranks the plans
    on either half of them: 1 when both halves order the plans alike, -1 when they reverse it."""
    from types import SimpleNamespace

    import numpy as np

    plans = [np.array([0]), np.array([1]), np.array([2])]
    p = SimpleNamespace(error_of=lambda c: float(c[0]), bpw=lambda b: 4.0, bytes_of=lambda c: 0)
    monkeypatch.setattr(fidelity, "rival_plans", lambda *a, **k: plans)
    monkeypatch.setattr(fidelity.allocate, "tensor_types", lambda _p, c: {"t": str(int(c[0]))})
    agree = {"0": [1.0, 1.0, 2.0, 2.0], "1": [2.0, 2.0, 3.0, 3.0], "2": [3.0, 3.0, 4.0, 4.0]}
    r = fidelity.measure(p, 4.0, lambda types: np.array(agree[types["t"]]), rivals=2)
    assert r.real.tolist() == [1.5, 2.5, 3.5] and r.judge_split_half == pytest.approx(1.0) and r.spearman == pytest.approx(1.0)
    assert r.judge_ceiling == pytest.approx(1.0)
    disagree = {"0": [1.0, 3.0], "1": [2.0, 2.0], "2": [3.0, 1.0]}
    r = fidelity.measure(p, 4.0, lambda types: np.array(disagree[types["t"]]), rivals=2)
    assert r.judge_split_half == pytest.approx(-1.0) and r.judge_ceiling == 0.0
    # halves that half agree (Spearman 0.5): a whole judge of reliability 2/3, a ceiling of √(2/3)
    partly = {"0": [1.0, 1.0], "1": [2.0, 3.0], "2": [3.0, 2.0]}
    r = fidelity.measure(p, 4.0, lambda types: np.array(partly[types["t"]]), rivals=2)
    assert r.judge_split_half == pytest.approx(0.5) and r.judge_ceiling == pytest.approx((2 / 3) ** 0.5)

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env
from helpers import allocation_env

from windq.models.gguf_model import GGUFModel
from windq.models.sources import wiki_text
from windq.pipeline import allocate, ppo
from windq.pipeline.calibrate import CalibrationConfig, calibrate, save_calibration
from windq.plan import validate
from windq.pipeline.planner import PlanConfig, run_planner


@pytest.fixture
def statsdir(synthetic_stats):
    return synthetic_stats


def _open_env(n_units: int = 12) -> ppo.AllocationEnv:
    """An env on a made-up problem where every offered type is a legal, affordable option for every
    unit (budget: the most expensive plan), so nothing is ever masked: gymnasium's checker, which
    steps with blind `action_space.sample()`, can run it exactly as MaskablePPO's env is built."""
    rng = np.random.default_rng(0)
    kinds = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"]
    bits = np.array([ppo.registry.get(t).bits_per_weight for t in ppo.TYPES])
    units = []
    for i in range(n_units):
        name = f"blk.{i // len(kinds)}.{kinds[i % len(kinds)]}.weight"
        nbytes = (bits * 256 * 256 / 8).astype(np.int64)
        units.append(allocate.Unit(name, 0, tuple(ppo.TYPES), nbytes, rng.random() * 2.0 ** -bits))
    p = allocate.Problem(tuple(units), 0, n_units * 256 * 256, "tensor")
    stats = {u.tensor: np.abs(rng.standard_normal((2, 256))) for u in units}
    importance = {u.tensor: rng.random(256) for u in units}
    return ppo.AllocationEnv(p, ppo.unit_features(p, stats, importance), p.reachable_bpw()[1])


def test_env_passes_gymnasiums_checker_as_it_is():
    env = _open_env()
    assert env.action_masks().all()
    check_env(env, skip_render_check=True)


def test_masks_keep_every_episode_in_budget(synthetic_gguf, statsdir):
    env = allocation_env(synthetic_gguf, statsdir, bpw=3.0)
    rng = np.random.default_rng(0)
    for _ in range(30):
        env.reset()
        done = False
        while not done:
            mask = env.action_masks()
            assert mask.any()
            _, _, done, _, _ = env.step(int(rng.choice(np.flatnonzero(mask))))
        assert env.spent <= env.budget
    with pytest.raises(ValueError, match="masked"):
        env.reset()
        env.step(ppo.TYPES.index("F32"))  # far over a 3-bit budget


def test_ppo_learns_on_its_own(synthetic_gguf, statsdir):
    """No warm start and no knapsack seed: the greedy plan of a policy trained for 20 episodes on
    the proxy reward beats the same policy untrained and the average random plan (measured:
    891 against 2293 and 1561)."""
    env = allocation_env(synthetic_gguf, statsdir, bpw=4.0)
    untrained = env.p.error_of(ppo.apply_policy(ppo.make_model(env, 0, env.n_units), env).choice)
    model, _ = ppo.train(env, episodes=20, seed=0, warm_start=False)
    learned = ppo.apply_policy(model, env).choice
    assert env.p.bytes_of(learned) <= env.budget
    rng = np.random.default_rng(0)
    random_mean = np.mean([env.p.error_of(allocate.random_plan(env.p, 4.0, rng)) for _ in range(20)])
    assert env.p.error_of(learned) < 0.6 * untrained
    assert env.p.error_of(learned) < random_mean


def test_ppo_plans_are_legal_and_in_budget(synthetic_gguf, statsdir):
    m = GGUFModel(synthetic_gguf)
    res = run_planner(m, statsdir, PlanConfig(bpw=4.0, method="ppo", episodes=2, seed=1, real_loss_tokens=0))
    validate(res.plan, m, imatrix_tensors=set(res.plan.tensors))
    assert res.plan.achieved_bpw <= 4.0


@pytest.mark.slow  # a long end-to-end run through llama.cpp
def test_seeded_runs_reproduce_and_policies_transfer(synthetic_gguf, statsdir, tmp_path):
    m = GGUFModel(synthetic_gguf)
    cfg = PlanConfig(bpw=4.0, method="ppo", episodes=2, seed=3, real_loss_tokens=64)
    a, b = run_planner(m, statsdir, cfg), run_planner(m, statsdir, cfg)
    assert a.plan.tensors == b.plan.tensors
    assert a.ppo.kl is not None and a.ppo.kl >= 0
    ppo.save_policy(a.policy, tmp_path / "policy.safetensors")
    # zero-shot transfer: a model with another depth and other weights, at another budget
    from windq.models.synthetic import SyntheticConfig, write_synthetic_gguf

    other = GGUFModel(write_synthetic_gguf(tmp_path / "other.gguf", SyntheticConfig(n_layer=3, seed=5)))
    cal = calibrate(other, wiki_text("calibration"), CalibrationConfig(tokens=256, ctx=128))
    other_stats = save_calibration(cal, tmp_path / "other-stats")
    applied = run_planner(other, other_stats, PlanConfig(bpw=3.5, method="ppo", policy=str(tmp_path / "policy.safetensors")))
    assert applied.plan.achieved_bpw <= 3.5 and len(applied.plan.tensors) == len(other.quantizable())
    validate(applied.plan, other, imatrix_tensors=set(applied.plan.tensors))


def test_chunk_plans_report_projection_cost(synthetic_gguf, statsdir):
    m = GGUFModel(synthetic_gguf)
    res = run_planner(m, statsdir, PlanConfig(bpw=4.0, method="knapsack", granularity="chunk:256"))
    assert res.chunk_proxy_error <= res.proxy_error
    assert res.plan.achieved_bpw <= 4.0
    assert set(res.plan.provenance["chunk_types"]) == set(res.plan.tensors)


def test_unit_features_give_every_tensor_its_own_kind(synthetic_gguf, statsdir):
    env = allocation_env(synthetic_gguf, statsdir)
    names = ppo.observation_names()
    kinds = [n.removeprefix("kind:") for n in names if n.startswith("kind:")]
    start = names.index("kind:" + kinds[0])
    for u, row in zip(env.p.units, env.features.static):
        one_hot = row[start : start + len(kinds)]
        assert one_hot.sum() == 1, u.tensor
        want = u.tensor.removesuffix(".weight").split(".")[-1]
        assert kinds[int(one_hot.argmax())] == want, u.tensor  # attn_output is not output

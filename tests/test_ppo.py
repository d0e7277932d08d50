import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env
from helpers import allocation_env

from windq.models.gguf_model import GGUFModel
from windq.models.sources import wiki_text
from windq.pipeline import allocate, ppo
from windq.pipeline.calibrate import CalibrationConfig, calibrate, save_calibration
from windq.pipeline.plan import validate
from windq.pipeline.planner import PlanConfig, run_planner


@pytest.fixture
def statsdir(synthetic_stats):
    return synthetic_stats


class _MaskedSampling(gym.spaces.Discrete):
    """check_env steps with blind `action_space.sample()`; the env refuses masked actions by design
    (tested below), so here the checker samples as MaskablePPO acts: among the legal actions."""

    def __init__(self, env):
        super().__init__(env.action_space.n)
        self.env = env

    def sample(self, mask=None, probability=None):
        return super().sample(mask=self.env.action_masks().astype(np.int8))


def test_env_passes_gymnasiums_checker(synthetic_gguf, statsdir):
    env = allocation_env(synthetic_gguf, statsdir)
    env.action_space = _MaskedSampling(env)
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


def test_ppo_beats_uniform_and_random_on_the_proxy(synthetic_gguf, statsdir):
    m = GGUFModel(synthetic_gguf)
    cfg = dict(bpw=4.0, real_loss_tokens=0)
    res = run_planner(m, statsdir, PlanConfig(method="ppo", episodes=4, seed=1, **cfg))
    validate(res.plan, m, imatrix_tensors=set(res.plan.tensors))
    assert res.plan.achieved_bpw <= 4.0
    uni = run_planner(m, statsdir, PlanConfig(method="uniform", **cfg))
    rand = [run_planner(m, statsdir, PlanConfig(method="random", seed=s, **cfg)).proxy_error for s in range(5)]
    assert res.proxy_error < uni.proxy_error
    assert res.proxy_error < min(rand)


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

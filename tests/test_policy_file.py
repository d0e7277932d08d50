"""A policy file is data: `--policy` never unpickles, and refuses anything but windq's own format (#16)."""

import base64
import io
import json
import os
import zipfile

import numpy as np
import pytest
import torch

from helpers import allocation_env, assert_one_line_error, windq
from windq.errors import InputError
from windq.files import load_arrays
from windq.models.gguf_model import GGUFModel
from windq.pipeline import ppo
from windq.pipeline.planner import PlanConfig, run_planner


class _Touch:
    """Unpickling this runs `touch PATH`: what a hostile policy file would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def crafted_sb3_zip(path, marker):
    """The file from the issue: an sb3-style zip whose `data` JSON carries a cloudpickled payload."""
    import cloudpickle

    payload = base64.b64encode(cloudpickle.dumps(_Touch(marker))).decode()
    data = {"policy_class": {":type:": "<class 'x'>", ":serialized:": payload}}
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("data", json.dumps(data))
    return path


def test_the_crafted_file_is_live_under_sb3s_own_loader(tmp_path):
    """So the refusal below is tested against a file that really runs code when unpickled."""
    from sb3_contrib import MaskablePPO

    marker = tmp_path / "owned-by-sb3"
    with pytest.raises(Exception):
        MaskablePPO.load(crafted_sb3_zip(tmp_path / "evil.zip", marker), device="cpu")
    assert marker.exists()


def test_plan_refuses_a_crafted_policy_without_running_it(tmp_path, synthetic_gguf, synthetic_stats):
    marker = tmp_path / "MARKER"
    evil = crafted_sb3_zip(tmp_path / "evil.zip", marker)
    out = tmp_path / "plan.json"
    r = windq("plan", synthetic_gguf, "--stats", synthetic_stats, "--bpw", "4", "--method", "ppo", "--align", "none",
              "--policy", evil, "--out", out)  # fmt: skip
    assert_one_line_error(r, str(evil), "stable-baselines3", "windq-policy")
    assert not marker.exists()
    assert not out.exists()
    # the same bytes under a safetensors name are refused too (by content, not by name)
    renamed = evil.rename(tmp_path / "evil.safetensors")
    with pytest.raises(InputError, match="stable-baselines3"):
        ppo.load_policy(renamed)
    assert not marker.exists()


@pytest.mark.slow  # trains PPO (5 s); make test runs it, make test-fast does not
def test_policy_round_trip_plans_the_same(tmp_path, synthetic_gguf, synthetic_stats):
    m = GGUFModel(synthetic_gguf)
    trained = run_planner(m, synthetic_stats, PlanConfig(bpw=4.0, method="ppo", episodes=2, seed=5, real_loss_tokens=0))
    path = ppo.save_policy(trained.policy, tmp_path / "policy.safetensors")
    loaded = ppo.load_policy(path)
    for k, v in trained.policy.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    env = allocation_env(synthetic_gguf, synthetic_stats, bpw=4.0)
    want = ppo.apply_policy(trained.policy, env).choice
    assert np.array_equal(ppo.apply_policy(loaded, env).choice, want)
    applied = run_planner(m, synthetic_stats, PlanConfig(bpw=4.0, method="ppo", policy=str(path), real_loss_tokens=0))
    assert list(applied.plan.tensors.values()) == [env.p.units[i].types[c] for i, c in enumerate(want)]
    assert applied.plan.provenance["ppo"]["policy"] == str(path)


def _rewrite_header(src, dst, change):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), framework="pt") as f:
        header = json.loads(f.metadata()["windq_policy"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    change(header, tensors)
    save_file(tensors, str(dst), metadata={"windq_policy": json.dumps(header)})
    return dst


def test_policies_for_another_layout_or_network_are_refused(tmp_path, synthetic_gguf, synthetic_stats):
    m = GGUFModel(synthetic_gguf)
    trained = run_planner(m, synthetic_stats, PlanConfig(bpw=4.0, method="ppo", episodes=1, real_loss_tokens=0))
    good = ppo.save_policy(trained.policy, tmp_path / "good.safetensors")

    def older_layout(h, t):
        h["observation"]["version"] = ppo.OBS_LAYOUT_VERSION - 1

    def renamed_feature(h, t):
        h["observation"]["features"][0] = "depth"

    def other_types(h, t):
        h["actions"] = h["actions"][:-1]

    def wrong_tensor(h, t):
        t["action_net.weight"] = t["action_net.weight"][:, :3].contiguous()

    cases = {older_layout: "observation layout", renamed_feature: "observation layout", other_types: "other types",
             wrong_tensor: "do not match"}  # fmt: skip
    for change, fragment in cases.items():
        bad = _rewrite_header(good, tmp_path / f"{change.__name__}.safetensors", change)
        with pytest.raises(InputError, match=fragment):
            ppo.load_policy(bad)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(InputError, match="not a windq policy file"):
        ppo.load_policy(junk)
    r = windq("plan", synthetic_gguf, "--stats", synthetic_stats, "--bpw", "4", "--method", "ppo", "--align", "none",
              "--policy", tmp_path / "older_layout.safetensors", "--out", tmp_path / "plan.json")  # fmt: skip
    assert_one_line_error(r, f"observation layout windq-unit v{ppo.OBS_LAYOUT_VERSION - 1}", "train a new one")


def test_observation_names_describe_every_slot(synthetic_gguf, synthetic_stats):
    env = allocation_env(synthetic_gguf, synthetic_stats)
    assert env.observation_space.shape == (len(ppo.observation_names()),)
    assert len(set(ppo.observation_names())) == len(ppo.observation_names())


def test_npz_with_pickled_objects_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "MARKER"
    buf = io.BytesIO()
    np.savez(buf, evil=np.array([_Touch(marker)], dtype=object))
    path = tmp_path / "activations.npz"
    path.write_bytes(buf.getvalue())
    with pytest.raises(InputError, match="plain arrays"):
        load_arrays(path)
    assert not marker.exists()

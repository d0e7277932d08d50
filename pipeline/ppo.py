"""A MaskablePPO planner: a policy that walks the units of a model in order and picks a ggml type
for each, under the global bit budget (after WINDQuant, RAMP and DynaQuant).

- One step per unit (tensor or column chunk), in model order.
- Observation: where the unit sits (layer, position, tensor kind), its size, importance and weight
  statistics, the proxy error of every type on it, and the budget state.
- Action: a ggml type. Types illegal for the unit, or unaffordable given the cheapest cost of the
  units still to come, are masked (the env owns `action_masks()`), so every episode ends in budget.
- Reward: −Δ(proxy error) at each step, normalised by the error scale of the model, plus at the end
  of an episode, when a real-loss function is given, −w·KL(reference ‖ plan)/KL(knapsack plan):
  the loss of a fake-quantized torch model on held-in calibration tokens.

The knapsack optimum of the additive proxy is the warm start: the policy is first fitted to its
actions (behaviour cloning), then PPO improves on the combined reward. The plan returned is the best
of the trained policy's greedy rollout and the best episode seen while training, by that reward.
Observations have the same length for every model (one slot per offered type), so a saved policy
applies to another model (`--policy FILE`, zero-shot transfer).

A saved policy is data only: one safetensors file holding the network's tensors, with a JSON header
in its metadata naming what rebuilds the network (observation layout and version, feature names,
action types, layer sizes). Loading constructs the policy from the header and copies the tensors
in; nothing is unpickled, so a policy file someone shares cannot run code (an sb3 zip could).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import gguf
import gymnasium as gym
import numpy as np

from windq import __version__, registry
from windq.errors import InputError
from windq.files import atomic_output
from windq.models.gguf_model import LAYER_KINDS, kind_name, tensor_kind
from windq.pipeline.allocate import Problem, knapsack

TYPES = registry.OFFERED  # the action space: one action per offered type, the same for every model
KINDS = tuple(kind_name(k) for k in (gguf.MODEL_TENSOR.TOKEN_EMBD, gguf.MODEL_TENSOR.OUTPUT, *LAYER_KINDS))
_EPS = 1e-12
_OBS_BOUND = 10.0  # features are scaled to about [-2, 2]; the bound only guards outliers


# The observation layout: what each slot of an observation means. A saved policy records it, and
# one made for another layout is refused: bump the version whenever a feature changes meaning.
OBS_LAYOUT = "windq-unit"
OBS_LAYOUT_VERSION = 2  # 2: exact tensor kinds (1 gave attn_output the output head's one-hot)
NET_ARCH = (64, 64)  # hidden layers of the policy and value networks (sb3's MlpPolicy, tanh)


def observation_names() -> list[str]:
    """The name of every slot of an observation, in order (`unit_features` + the budget state)."""
    return [
        "position", "unit_index", "log_bytes",
        *(f"kind:{k}" for k in (*KINDS, "other")),
        "importance_mean", "importance_spread", "weight_std", "weight_spread", "activation_mean", "activation_spread",
        *(f"error:{t}" for t in TYPES), "worst_error",
        "budget_left_of_room", "budget_left", "bits_spent", "budget_bpw",
    ]  # fmt: skip


@dataclass(frozen=True)
class UnitFeatures:
    """Model-independent features of every unit, computed once per model."""

    static: np.ndarray  # [n_units, n_static]


def _kind(tensor: str) -> int:
    """The tensor's slot in the kind one-hot: its exact gguf kind (layout 1 matched substrings, so
    every `attn_output.weight` took the output head's slot), or the last slot for any other kind."""
    kind = tensor_kind(tensor)
    name = kind_name(kind) if kind is not None else None
    return KINDS.index(name) if name in KINDS else len(KINDS)


def _layer(tensor: str) -> int | None:
    parts = tensor.split(".")
    return int(parts[1]) if parts[0] == "blk" else None


def unit_features(
    p: Problem,
    weight_stats: Mapping[str, np.ndarray],
    importance: Mapping[str, np.ndarray],
    activations: Mapping[str, Mapping[str, np.ndarray]] | None = None,
    chunk_cols: Mapping[str, np.ndarray] | None = None,
) -> UnitFeatures:
    """weight_stats[tensor]: per column [std, max|w|] (2 × n); importance[tensor]: per column m_j;
    activations[tensor]: {"abs_mean", "abs_max"} per column; chunk_cols: widths of each tensor's chunks."""
    layers = [_layer(u.tensor) for u in p.units]
    n_layers = max([l for l in layers if l is not None], default=0) + 1
    rows = []
    for i, u in enumerate(p.units):
        cols = slice(None)
        if chunk_cols is not None and u.tensor in chunk_cols and len(chunk_cols[u.tensor]) > 1:
            edges = np.concatenate([[0], np.cumsum(chunk_cols[u.tensor])])
            cols = slice(int(edges[u.chunk]), int(edges[u.chunk + 1]))
        layer = layers[i]
        pos = -0.1 if _kind(u.tensor) == 0 else (1.1 if layer is None else layer / max(1, n_layers - 1))
        kind = np.zeros(len(KINDS) + 1)
        kind[_kind(u.tensor)] = 1
        ws = weight_stats[u.tensor][:, cols]
        imp = importance.get(u.tensor)
        # an MoE tensor's importance, one row per expert: the experts' mean per column
        imp = np.ones(ws.shape[1]) if imp is None else imp.reshape(-1, weight_stats[u.tensor].shape[1]).mean(0)[cols]
        act = (activations or {}).get(u.tensor)
        if act is not None:
            am, ax = act["abs_mean"][cols], act["abs_max"][cols]
            act_f = [math.log10(am.mean() + _EPS) / 4, math.log10(ax.max() / (am.mean() + _EPS) + 1) / 4]
        else:
            act_f = [0.0, 0.0]
        # the proxy error of every offered type, relative to the unit's worst legal one (log scale)
        err = np.full(len(TYPES), 1.0)
        worst = float(u.error.max()) + _EPS
        for t, e in zip(u.types, u.error):
            err[TYPES.index(t)] = math.log10(e / worst + _EPS) / 12
        rows.append(np.concatenate([
            [pos, i / max(1, len(p.units) - 1), math.log10(float(u.nbytes.max()) + 1) / 9],
            kind,
            [math.log10(imp.mean() + _EPS) / 4, math.log10(imp.max() / (imp.mean() + _EPS) + 1) / 4],
            [math.log10(ws[0].mean() + _EPS) / 4, math.log10(ws[1].max() / (ws[0].mean() + _EPS) + 1) / 4],
            act_f,
            err,
            [math.log10(worst) / 12],
        ]))  # fmt: skip
    return UnitFeatures(np.asarray(rows, dtype=np.float32))


class AllocationEnv(gym.Env):
    metadata = {"render_modes": []}

    def __init__(
        self,
        problem: Problem,
        features: UnitFeatures,
        bpw: float,
        *,
        real_loss: Callable[[np.ndarray], float] | None = None,
        real_loss_scale: float = 1.0,
        real_loss_weight: float = 1.0,
    ):
        super().__init__()
        self.p = problem
        self.features = features
        self.bpw = bpw
        self.budget = problem.check_budget(bpw)
        self.real_loss = real_loss
        self.real_loss_scale = real_loss_scale
        self.real_loss_weight = real_loss_weight
        n = len(problem.units)
        maxs = np.array([u.nbytes.max() for u in problem.units], dtype=np.int64)
        self.min_rest = problem.min_rest()  # cheapest cost after unit i
        self.max_rest = np.concatenate([np.cumsum(maxs[::-1])[::-1][1:], [0]])
        # error scale: the summed error of the cheapest choice of every unit, so an episode's
        # proxy return lies in about [-1, 0] whatever the model
        self.error_scale = float(sum(u.error.max() for u in problem.units)) + _EPS
        self.type_index = [np.array([TYPES.index(t) for t in u.types]) for u in problem.units]
        n_obs = features.static.shape[1] + 4
        self.observation_space = gym.spaces.Box(-_OBS_BOUND, _OBS_BOUND, shape=(n_obs,), dtype=np.float32)
        self.action_space = gym.spaces.Discrete(len(TYPES))
        self.n_units = n
        self.best: tuple[float, np.ndarray] | None = None  # best episode seen: (return, choice)
        self._reset_state()

    def _reset_state(self) -> None:
        self.i = 0
        self.spent = self.p.fixed_bytes
        self.choice = np.zeros(self.n_units, dtype=np.int64)
        self.proxy_return = 0.0

    def _obs(self) -> np.ndarray:
        i = min(self.i, self.n_units - 1)
        left = self.budget - self.spent - self.min_rest[i]
        room = max(1, self.max_rest[i] + self.p.units[i].nbytes.max() - self.min_rest[i] - self.p.units[i].nbytes.min())
        done_w = self.spent - self.p.fixed_bytes
        return np.concatenate([
            self.features.static[i],
            [left / room, left / max(1, self.budget), self.p.bpw(done_w), self.bpw / 16],
        ]).clip(-_OBS_BOUND, _OBS_BOUND).astype(np.float32)  # fmt: skip

    def action_masks(self) -> np.ndarray:
        mask = np.zeros(len(TYPES), dtype=bool)
        if self.i >= self.n_units:
            return mask
        u = self.p.units[self.i]
        ok = self.spent + u.nbytes + self.min_rest[self.i] <= self.budget
        mask[self.type_index[self.i][ok]] = True
        return mask

    def reset(self, *, seed: int | None = None, options=None):
        super().reset(seed=seed)
        self._reset_state()
        return self._obs(), {}

    def step(self, action: int):
        u = self.p.units[self.i]
        where = np.flatnonzero(self.type_index[self.i] == int(action))
        if len(where) == 0 or not self.action_masks()[int(action)]:
            raise ValueError(f"action {TYPES[int(action)]} is masked for unit {u.tensor}#{u.chunk}")
        c = int(where[0])
        self.choice[self.i] = c
        self.spent += int(u.nbytes[c])
        reward = -float(u.error[c]) / self.error_scale
        self.proxy_return += reward
        self.i += 1
        terminated = self.i >= self.n_units
        info = {}
        if terminated:
            total = self.proxy_return
            if self.real_loss is not None:
                kl = self.real_loss(self.choice)
                reward -= self.real_loss_weight * kl / self.real_loss_scale
                total -= self.real_loss_weight * kl / self.real_loss_scale
                info["kl"] = kl
            info["return"] = total
            if self.best is None or total > self.best[0]:
                self.best = (total, self.choice.copy())
        return self._obs(), reward, terminated, False, info

    def episode_return(self, choice: np.ndarray) -> tuple[float, float | None]:
        """The return an episode taking `choice` gets, and its KL (None without a real loss)."""
        proxy = -self.p.error_of(choice) / self.error_scale
        if self.real_loss is None:
            return proxy, None
        kl = self.real_loss(choice)
        return proxy - self.real_loss_weight * kl / self.real_loss_scale, kl


def rollout(env: AllocationEnv, model, *, expert: np.ndarray | None = None, deterministic: bool = True):
    """One episode: the policy's choices (or `expert`'s); returns (choice, observations, masks, actions)."""
    obs, _ = env.reset()
    observations, masks, actions = [], [], []
    done = False
    while not done:
        mask = env.action_masks()
        if expert is not None:
            a = int(env.type_index[env.i][expert[env.i]])
        else:
            a, _ = model.predict(obs, action_masks=mask, deterministic=deterministic)
            a = int(a)
        observations.append(obs)
        masks.append(mask)
        actions.append(a)
        obs, _, done, _, _ = env.step(a)
    return env.choice.copy(), np.array(observations), np.array(masks), np.array(actions)


def behaviour_clone(model, env: AllocationEnv, expert: np.ndarray, epochs: int = 200) -> None:
    """Fit the policy to the knapsack's actions: the warm start."""
    import torch

    _, obs, masks, actions = rollout(env, model, expert=expert)
    obs_t = torch.as_tensor(obs)
    act_t = torch.as_tensor(actions)
    policy = model.policy
    policy.set_training_mode(True)
    for _ in range(epochs):
        _, log_prob, _ = policy.evaluate_actions(obs_t, act_t, action_masks=masks)
        loss = -log_prob.mean()
        policy.optimizer.zero_grad()
        loss.backward()
        policy.optimizer.step()
    policy.set_training_mode(False)


@dataclass(frozen=True)
class PPOResult:
    choice: np.ndarray
    source: str  # "policy" or "best-episode"
    episode_return: float
    kl: float | None
    knapsack_return: float
    knapsack_kl: float | None
    episodes: int


EPISODES_PER_UPDATE = 4  # episodes collected before each policy update (fewer when fewer are asked for)


def episodes_per_update(episodes: int) -> int:
    return max(1, min(EPISODES_PER_UPDATE, episodes))


def make_model(env: AllocationEnv, seed: int, n_steps: int):
    """sb3's MaskablePPO over `env`, updating after every `n_steps` steps.

    Why several episodes per update: sb3 normalises advantages within each minibatch. With one
    episode per update, every step of the batch shares the episode-end real-KL term, and the
    normalisation takes it out again: the policy learnt only the per-step proxy and its greedy
    plan kept the highest type until the budget forced the last units down (measured on the
    made-up problem of tests/test_ppo.py: greedy KL 1.306 against the warm start's 1.216, every
    seed). With 4 episodes per update and sb3's default 10 epochs its greedy plan beat the warm
    start for seeds 0-3 (0.806)."""
    from sb3_contrib import MaskablePPO

    return MaskablePPO(
        "MlpPolicy", env, seed=seed, n_steps=n_steps, batch_size=min(64, n_steps), n_epochs=10,
        learning_rate=3e-4, gamma=1.0, gae_lambda=0.95, ent_coef=0.01, verbose=0, device="cpu",
        policy_kwargs={"net_arch": list(NET_ARCH)},
    )  # fmt: skip


def train(
    env: AllocationEnv,
    *,
    episodes: int = 20,
    seed: int = 0,
    warm_start: bool = True,
    progress: Callable[[int, int], None] | None = None,
):
    """Train a MaskablePPO policy on `env`; returns (model, PPOResult). The policy is updated after
    every `episodes_per_update(episodes)` episodes, so `episodes` is rounded up to a multiple of
    that (the result says how many ran)."""
    import torch
    from stable_baselines3.common.callbacks import BaseCallback

    torch.manual_seed(seed)
    env.reset(seed=seed)
    expert = knapsack(env.p, env.bpw)
    knap_return, knap_kl = env.episode_return(expert)
    per_update = episodes_per_update(episodes)
    episodes = -(-episodes // per_update) * per_update
    model = make_model(env, seed, n_steps=per_update * env.n_units)
    if warm_start:
        behaviour_clone(model, env, expert)
    env.best = (knap_return, expert.copy()) if warm_start else None

    class _Progress(BaseCallback):
        def _on_step(self) -> bool:
            if progress:
                progress(min(self.num_timesteps, episodes * env.n_units), episodes * env.n_units)
            return True

    if episodes > 0:
        model.learn(total_timesteps=episodes * env.n_units, callback=_Progress())
    result = apply_policy(model, env)
    if env.best is not None and env.best[0] > result.episode_return:
        ret, choice = env.best
        _, kl = env.episode_return(choice) if env.real_loss is not None else (ret, None)
        result = PPOResult(choice, "best-episode", ret, kl, knap_return, knap_kl, episodes)
    else:
        result = PPOResult(result.choice, "policy", result.episode_return, result.kl, knap_return, knap_kl, episodes)
    return model, result


def apply_policy(model, env: AllocationEnv) -> PPOResult:
    """The policy's greedy plan for `env` (also for a model it was not trained on)."""
    choice, *_ = rollout(env, model)
    ret, kl = env.episode_return(choice)
    return PPOResult(choice, "policy", ret, kl, float("nan"), None, 0)


POLICY_FORMAT = "windq-policy"
POLICY_FORMAT_VERSION = 1
_HEADER_KEY = "windq_policy"  # the safetensors metadata entry holding the JSON header


def policy_header() -> dict:
    return {
        "format": POLICY_FORMAT,
        "format_version": POLICY_FORMAT_VERSION,
        "windq_version": __version__,
        "observation": {"layout": OBS_LAYOUT, "version": OBS_LAYOUT_VERSION, "features": observation_names()},
        "actions": list(TYPES),
        "network": {"policy": "MaskableActorCriticPolicy", "net_arch": list(NET_ARCH), "activation": "tanh"},
    }


def save_policy(policy, path: str | Path) -> Path:
    """Write a policy (a MaskablePPO's `.policy`) as safetensors with the JSON header above."""
    from safetensors.torch import save_file

    if policy.observation_space.shape != (len(observation_names()),):
        raise ValueError(f"observation of shape {policy.observation_space.shape} does not match observation_names()")
    tensors = {k: v.detach().cpu().contiguous() for k, v in policy.state_dict().items()}
    with atomic_output(path) as tmp:
        save_file(tensors, str(tmp), metadata={_HEADER_KEY: json.dumps(policy_header())})
    return Path(path)


def load_policy(path: str | Path):
    """The policy saved by `save_policy`, rebuilt from its header; refuses anything else in one line."""
    import torch
    from safetensors import SafetensorError, safe_open
    from sb3_contrib.common.maskable.policies import MaskableActorCriticPolicy

    path = Path(path)
    expects = f"windq reads only its own policy format (safetensors with a {POLICY_FORMAT} header, from `windq plan --save-policy`)"
    try:
        magic = path.read_bytes()[:4]
    except OSError as e:
        raise InputError(f"{path}: cannot read the policy file ({e.strerror})") from None
    if magic == b"PK\x03\x04":
        raise InputError(f"{path}: a zip (stable-baselines3's format, which unpickles code); {expects}")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = json.loads((f.metadata() or {})[_HEADER_KEY])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, KeyError, ValueError, OSError):
        raise InputError(f"{path}: not a windq policy file; {expects}") from None
    if not isinstance(header, dict) or header.get("format") != POLICY_FORMAT or header.get("format_version") != POLICY_FORMAT_VERSION:
        raise InputError(f"{path}: not a {POLICY_FORMAT} v{POLICY_FORMAT_VERSION} file; {expects}")
    obs, net = header.get("observation") or {}, header.get("network") or {}
    if (obs.get("layout"), obs.get("version"), obs.get("features")) != (OBS_LAYOUT, OBS_LAYOUT_VERSION, observation_names()):
        raise InputError(
            f"{path}: a policy for observation layout {obs.get('layout')} v{obs.get('version')} "
            f"(windq {header.get('windq_version')}); this windq observes {OBS_LAYOUT} v{OBS_LAYOUT_VERSION}: train a new one"
        )
    if header.get("actions") != list(TYPES):
        raise InputError(f"{path}: a policy choosing among other types ({header.get('actions')}); this windq offers {list(TYPES)}")
    arch = net.get("net_arch")
    if net.get("activation") != "tanh" or not (isinstance(arch, list) and arch and all(isinstance(n, int) and 0 < n <= 4096 for n in arch)):
        raise InputError(f"{path}: a network this windq cannot build ({net}); {expects}")
    n_obs = len(observation_names())
    policy = MaskableActorCriticPolicy(
        gym.spaces.Box(-_OBS_BOUND, _OBS_BOUND, shape=(n_obs,), dtype=np.float32), gym.spaces.Discrete(len(TYPES)),
        lambda _: 0.0, net_arch=list(arch), activation_fn=torch.nn.Tanh,
    )  # fmt: skip
    try:
        policy.load_state_dict(tensors, strict=True)
    except RuntimeError:
        raise InputError(f"{path}: its tensors do not match the network its header describes; {expects}") from None
    policy.set_training_mode(False)
    return policy

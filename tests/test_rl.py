"""Meta-RL foundations: meta-environments and their checker, plug-ins, policies, rollouts, estimators."""

from __future__ import annotations

import itertools
import math
import sys
import textwrap

import gymnasium as gym
import numpy as np
import pytest
import torch

import bilevel_ray.rl as rl
from bilevel_ray.rl.core import check_meta_env
from bilevel_ray.rl.estimators import (advantages, baseline_features, dice_surrogate, discounted_returns,
                                       fit_linear_baseline, gae)
from bilevel_ray.rl.policies import CategoricalMLPPolicy, GaussianMLPPolicy, make_policy
from bilevel_ray.rl.rollouts import RolloutSampler, concat_episodes

pytestmark = pytest.mark.filterwarnings("ignore:.*settotalmass.*", "ignore::UserWarning")


# ---------------------------------------------------------------- environments

@pytest.mark.parametrize("env_id", rl.meta_env_ids())
def test_every_meta_env_passes_gymnasium_and_task_checks(env_id):
    env = rl.make_env(env_id)
    check_meta_env(env, seed=3)
    tasks = env.unwrapped.sample_tasks(5, seed=1)
    assert len(tasks) == 5 and all(isinstance(v, float) for t in tasks for v in t.values())


def _steps(env, task, actions, seed=0):
    rl.set_env_task(env, task)
    env.reset(seed=seed)
    return [env.step(a) for a in actions]


def test_navigation_reward_is_minus_distance_to_goal_with_clipped_moves():
    env = rl.make_env("BilevelRay/Navigation2D-v0")
    actions = [np.array([0.05, -0.3], np.float32), np.array([0.1, 0.02], np.float32), np.array([-1.0, 1.0], np.float32)]
    for task in ({"goal_x": 0.3, "goal_y": -0.2}, {"goal_x": -0.4, "goal_y": 0.45}):
        pos = np.zeros(2)
        for a, (obs, r, term, trunc, info) in zip(actions, _steps(env, task, actions)):
            pos = pos + np.clip(a.astype(np.float64), -0.1, 0.1)
            assert np.allclose(obs, pos, atol=1e-6)
            assert r == pytest.approx(-math.hypot(pos[0] - task["goal_x"], pos[1] - task["goal_y"]), abs=1e-9)
            assert not term and not trunc


def test_navigation_terminates_within_tolerance_of_the_goal_as_in_the_maml_paper():
    from bilevel_ray.rl.navigation import Navigation2DVectorEnv

    task, near, far = {"goal_x": 0.15, "goal_y": 0.0}, np.array([0.1, 0.004]), np.array([0.1, 0.02])
    for tolerance, ends in ((0.01, True), (0.0, False)):
        env = rl.make_env("BilevelRay/Navigation2D-v0", task=task, goal_tolerance=tolerance)
        env.reset(seed=0)
        assert env.step(far)[2] is False
        _, r, term, trunc, _ = env.step(np.array([0.05, -0.016]))  # now at (0.15, 0.004): within 0.01 in x and y
        assert term is ends and trunc is False and r == pytest.approx(-0.004, abs=1e-9)
    vec = Navigation2DVectorEnv(2, max_episode_steps=5)
    vec.set_tasks([{"goal_x": 0.1, "goal_y": 0.0}, {"goal_x": 0.3, "goal_y": 0.0}])
    vec.reset(seed=0)
    obs, _, term, trunc, _ = vec.step(np.stack([near, near]))
    assert term.tolist() == [True, False] and not trunc.any() and np.allclose(obs[0], near)
    assert np.allclose(vec.step(np.stack([far, far]))[0], [far, near + far])  # the finished copy restarted
    with pytest.raises(ValueError, match=r"env.goal_tolerance: must be in \[0, 1\)"):
        rl.make_env("BilevelRay/Navigation2D-v0", goal_tolerance=-0.1)


def test_sampler_maps_box_actions_from_the_policys_units_and_clips():
    """``normalize_actions``: the policy's action a moves the environment by center + half-width · a (std 1
    spans the box); without it the action is the move. Either way the move is clipped to the box and the
    episodes keep the policy's own actions and log-probabilities."""
    tasks = [{"goal_x": 0.3, "goal_y": -0.2}]
    for normalize, scale in ((True, 0.1), (False, 1.0)):
        sampler = RolloutSampler("BilevelRay/Navigation2D-v0", horizon=6, hidden=(8,), normalize_actions=normalize)
        params = sampler.policy.init(seed=0)
        eps = sampler.sample(params, tasks, 5, seed=0)
        moves = eps.obs[1:] - eps.obs[:-1]
        assert torch.allclose(moves, (scale * eps.actions[:-1]).clamp(-0.1, 0.1), atol=1e-6)
        assert torch.allclose(sampler.policy.log_prob(params, eps.obs, eps.actions), eps.log_probs, atol=1e-5)
    unit = RolloutSampler("BilevelRay/HalfCheetahVel-v0", horizon=2, hidden=(4,))  # a [-1, 1] box: unchanged
    a = np.array([0.3, -2.0, 0.5, 1.5, 0.0, -0.7])
    assert np.array_equal(unit.env_actions(a), np.clip(a, -1, 1).astype(np.float32))


def test_navigation_renders_rgb_array():
    env = gym.make("BilevelRay/Navigation2D-v0", render_mode="rgb_array")
    env.reset(seed=0)
    env.step(np.array([0.1, 0.1], np.float32))
    img = env.render()
    assert img.shape == (128, 128, 3) and img.dtype == np.uint8 and (img == [220, 30, 30]).all(-1).any()


@pytest.mark.parametrize("env_id,tasks,formula", [
    ("BilevelRay/HalfCheetahVel-v0", ({"velocity": 0.4}, {"velocity": 1.7}),
     lambda task, info: -abs(info["x_velocity"] - task["velocity"]) + info["reward_ctrl"]),
    ("BilevelRay/HalfCheetahDir-v0", ({"direction": 1.0}, {"direction": -1.0}),
     lambda task, info: task["direction"] * info["x_velocity"] + info["reward_ctrl"]),
    ("BilevelRay/AntDir-v0", ({"direction": 1.0}, {"direction": -1.0}),
     lambda task, info: task["direction"] * info["x_velocity"] + info["reward_survive"] + info["reward_ctrl"]
     + info["reward_contact"]),
])
def test_locomotion_reward_follows_the_task(env_id, tasks, formula):
    env = rl.make_env(env_id)
    env.action_space.seed(0)
    actions = [env.action_space.sample() for _ in range(8)]
    weight = env.unwrapped._ctrl_cost_weight
    runs = []
    for task in tasks:
        rewards = []
        for a, (obs, r, term, trunc, info) in zip(actions, _steps(env, task, actions)):
            assert r == pytest.approx(formula(task, info), abs=1e-9)
            assert info["reward_ctrl"] == pytest.approx(-weight * float(np.sum(np.square(a))), rel=1e-5)
            rewards.append((r, info["x_velocity"]))
        runs.append(rewards)
    # same seed and actions: same motion, and only the task term of the reward differs
    for (r0, v0), (r1, v1) in zip(*runs):
        assert v0 == v1
        if "direction" in tasks[0]:
            assert r0 - r1 == pytest.approx(2 * v0, abs=1e-9)
        else:
            assert r0 - r1 == pytest.approx(abs(v0 - 1.7) - abs(v0 - 0.4), abs=1e-9)
    if env_id.endswith("HalfCheetahVel-v0"):
        assert env.unwrapped._ctrl_cost_weight == 0.05


def test_random_pendulum_dynamics_follow_the_task():
    env = rl.make_env("BilevelRay/PendulumRandom-v0")
    task = {"length": 1.7, "mass": 0.6, "gravity": 7.0}
    rl.set_env_task(env, task)
    env.reset(seed=0)
    th, thdot = env.unwrapped.state
    u = 1.3
    obs, r, *_ = env.step(np.array([u], np.float32))
    expect = thdot + (3 * task["gravity"] / (2 * task["length"]) * np.sin(th)
                      + 3.0 / (task["mass"] * task["length"] ** 2) * u) * 0.05
    expect = np.clip(expect, -8, 8)
    assert obs[2] == pytest.approx(expect, rel=1e-5)
    norm = ((th + np.pi) % (2 * np.pi)) - np.pi
    assert r == pytest.approx(-(norm ** 2 + 0.1 * thdot ** 2 + 0.001 * u ** 2), rel=1e-5)


def test_random_cartpole_dynamics_follow_the_task():
    env = rl.make_env("BilevelRay/CartPoleRandom-v0")
    task = {"pole_length": 0.9, "pole_mass": 0.3, "gravity": 12.0}
    rl.set_env_task(env, task)
    env.reset(seed=1)
    x, x_dot, th, th_dot = env.unwrapped.state
    obs, r, *_ = env.step(1)
    total = 1.0 + task["pole_mass"]
    temp = (10.0 + task["pole_mass"] * task["pole_length"] * th_dot ** 2 * np.sin(th)) / total
    th_acc = (task["gravity"] * np.sin(th) - np.cos(th) * temp) / (
        task["pole_length"] * (4 / 3 - task["pole_mass"] * np.cos(th) ** 2 / total))
    assert obs[3] == pytest.approx(th_dot + 0.02 * th_acc, rel=1e-5)
    assert r == 1.0


@pytest.mark.parametrize("env_id,task,match", [
    ("BilevelRay/Navigation2D-v0", {"goal_x": 0.1}, "task keys must be"),
    ("BilevelRay/Navigation2D-v0", {"goal_x": 0.1, "goal_y": 5.0}, r"task\['goal_y'\] must be in"),
    ("BilevelRay/Navigation2D-v0", [0.1, 0.2], "task must be a dict"),
    ("BilevelRay/HalfCheetahDir-v0", {"direction": 0.5}, "must be -1 or 1"),
    ("BilevelRay/HalfCheetahVel-v0", {"velocity": "fast"}, "must be a number"),
    ("BilevelRay/PendulumRandom-v0", {"length": 1.0, "mass": float("nan"), "gravity": 9.0}, r"task\['mass'\]"),
])
def test_bad_tasks_are_refused_by_name_and_keep_the_current_task(env_id, task, match):
    env = rl.make_env(env_id)
    before = rl.get_env_task(env)
    with pytest.raises(ValueError, match=match) as err:
        rl.set_env_task(env, task)
    assert "\n" not in str(err.value)
    assert rl.get_env_task(env) == before


def test_make_refuses_unknown_and_non_meta_envs():
    with pytest.raises(ValueError, match="env.id: unknown environment 'Nope-v0'; meta-environments: BilevelRay/"):
        rl.make_env("Nope-v0")
    with pytest.raises(TypeError, match="not a meta-environment"):
        rl.make_env("CartPole-v1")


class _NoEffect(gym.Env):
    observation_space = gym.spaces.Box(-1, 1, (1,), np.float32)
    action_space = gym.spaces.Box(-1, 1, (1,), np.float32)

    def __init__(self):
        self.task = {"k": 0.0}

    def sample_tasks(self, n, *, seed):
        return [{"k": float(v)} for v in np.random.default_rng(seed).random(n)]

    def set_task(self, task):
        if set(task) != {"k"}:
            raise ValueError("bad task")
        self.task = dict(task)

    def get_task(self):
        return dict(self.task)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return np.zeros(1, np.float32), {}

    def step(self, action):
        return np.zeros(1, np.float32), 0.0, False, False, {}


class _PositionalSeed(_NoEffect):
    def sample_tasks(self, n, seed):
        return super().sample_tasks(n, seed=seed)


class _Unseeded(_NoEffect):
    def sample_tasks(self, n, *, seed):
        return [{"k": float(v)} for v in np.random.random(n)]


@pytest.mark.parametrize("cls,match", [
    (_NoEffect, "changes neither rewards nor observations"),
    (_PositionalSeed, "seed must be a keyword-only argument"),
    (_Unseeded, "the same seed gave different tasks"),
])
def test_checker_names_the_defect_of_a_broken_plugin(cls, match):
    with pytest.raises((TypeError, ValueError), match=match):
        check_meta_env(cls())


def test_plugins_register_through_entry_points(tmp_path, monkeypatch):
    """A real installed-package layout (a module and a dist-info with entry points) on sys.path."""
    (tmp_path / "my_meta_envs.py").write_text(textwrap.dedent("""
        import numpy as np, gymnasium as gym
        class GoalLine(gym.Env):
            observation_space = gym.spaces.Box(-10, 10, (1,), np.float32)
            action_space = gym.spaces.Box(-1, 1, (1,), np.float32)
            def __init__(self):
                self.task, self.x = {"goal": 0.0}, 0.0
            def sample_tasks(self, n, *, seed):
                return [{"goal": float(g)} for g in np.random.default_rng(seed).uniform(-1, 1, n)]
            def set_task(self, task):
                if set(task) != {"goal"}:
                    raise ValueError("task keys must be ['goal']")
                self.task = {"goal": float(task["goal"])}
            def get_task(self):
                return dict(self.task)
            def reset(self, *, seed=None, options=None):
                super().reset(seed=seed)
                self.x = 0.0
                return np.array([self.x], np.float32), {}
            def step(self, action):
                self.x = float(np.clip(self.x + float(np.clip(action[0], -1, 1)), -10, 10))
                return np.array([self.x], np.float32), -abs(self.x - self.task["goal"]), False, False, {}
        def register_more():
            gym.register(id="MyNs/GoalLineLong-v0", entry_point=GoalLine, max_episode_steps=50)
    """))
    dist = tmp_path / "my_meta_envs-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-meta-envs\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[bilevel_ray.meta_envs]\nMyNs/GoalLine-v0 = my_meta_envs:GoalLine\nmore = my_meta_envs:register_more\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        added = rl.load_plugins()
        assert {"MyNs/GoalLine-v0", "MyNs/GoalLineLong-v0"} <= set(added)
        env = rl.make_env("MyNs/GoalLine-v0", task={"goal": 0.5})
        check_meta_env(env)
        assert rl.get_env_task(env) == {"goal": 0.5}
        assert rl.make_env("MyNs/GoalLineLong-v0").spec.max_episode_steps == 50
    finally:
        for env_id in ("MyNs/GoalLine-v0", "MyNs/GoalLineLong-v0"):
            gym.registry.pop(env_id, None)
        sys.modules.pop("my_meta_envs", None)


# ---------------------------------------------------------------- policies and rollouts

def test_policies_sample_from_their_distribution():
    torch.manual_seed(0)
    gauss = GaussianMLPPolicy(3, 2, (8,), init_std=0.5)
    p = gauss.init(seed=1, dtype=torch.float64)
    obs = torch.randn(5, 3, dtype=torch.float64)
    noise = torch.randn(5, 2, dtype=torch.float64)
    dist = gauss.distribution(p, obs)
    actions, logp = gauss.sample(p, obs, noise)
    assert torch.allclose(actions, dist.mean + 0.5 * noise)
    assert torch.allclose(logp, dist.log_prob(actions)) and torch.equal(logp, gauss.log_prob(p, obs, actions))
    cat = CategoricalMLPPolicy(3, 4, (8,))
    q = cat.init(seed=2, dtype=torch.float64)
    q["layer1.weight"] = q["layer1.weight"] * 300  # a non-uniform policy
    o = torch.randn(1, 3, dtype=torch.float64).expand(40000, 3)
    probs = cat.distribution(q, o[:1]).probs[0]
    draws, logp = cat.sample(q, o, torch.rand(40000, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    assert torch.allclose(logp, probs.log()[draws]) and torch.equal(logp, cat.log_prob(q, o, draws))
    freq = torch.bincount(draws, minlength=4).double() / 40000
    assert probs.max() > 0.3 and probs.min() < 0.2
    assert torch.allclose(freq, probs, atol=4 * math.sqrt(0.25 / 40000))


def test_make_policy_follows_the_spaces():
    assert isinstance(make_policy(gym.spaces.Box(-1, 1, (4,)), gym.spaces.Discrete(2)), CategoricalMLPPolicy)
    assert make_policy(gym.spaces.Box(-1, 1, (4,)), gym.spaces.Box(-1, 1, (3,)), (16,)).act_dim == 3
    with pytest.raises(ValueError, match="env.action_space: must be Discrete or a flat Box"):
        make_policy(gym.spaces.Box(-1, 1, (4,)), gym.spaces.MultiBinary(3))
    with pytest.raises(ValueError, match="policy.hidden"):
        GaussianMLPPolicy(2, 2, (0,))


def test_rollouts_are_reproducible_and_independent_of_how_requests_are_split():
    # width 8: on the machine where this was found, a float32 matmul of that width rounded differently
    # for different row counts (widths 16 and 32 did not)
    sampler = RolloutSampler("BilevelRay/Navigation2D-v0", horizon=30, hidden=(8,))
    params = sampler.policy.init(seed=0)
    tasks = sampler.sample_tasks(4, seed=7)
    whole = sampler.sample(params, tasks, 3, seed=11)
    assert whole.obs.shape == (30, 12, 2) and whole.actions.shape == (30, 12, 2) and whole.steps == 360
    assert whole.task.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    # each observation is the position after the previous actions (in units of the ±0.1 box, clipped)
    moves = torch.clamp(0.1 * whole.actions.double(), -0.1, 0.1).cumsum(0)[:-1]
    assert torch.allclose(whole.obs[1:].double(), moves, atol=1e-5) and (whole.obs[0] == 0).all()
    again = sampler.sample(params, tasks, 3, seed=11)
    halves = concat_episodes([sampler.sample(params, tasks[:2], 3, seed=11),
                              sampler.sample(params, tasks[2:], 3, seed=11, first_episode=6)])
    # split unevenly, as Ray rollout workers split a request: bitwise the same (the policy's matmuls
    # run per task, so their float rounding does not depend on how many episodes share a request)
    uneven = concat_episodes([sampler.sample(params, tasks[:1], 3, seed=11),
                              sampler.sample(params, tasks[1:], 3, seed=11, first_episode=3)])
    for a, b, c, d in zip(whole[:5], again[:5], halves[:5], uneven[:5]):
        assert torch.equal(a, b) and torch.equal(a, c) and torch.equal(a, d)
    other = sampler.sample(params, tasks, 3, seed=12)
    assert not torch.equal(whole.actions, other.actions)
    # the rewards are those of the environment for the recorded actions
    for e in (0, 7):
        goal = np.array([tasks[whole.task[e]]["goal_x"], tasks[whole.task[e]]["goal_y"]])
        pos = np.cumsum(np.clip(0.1 * whole.actions[:, e].double().numpy(), -0.1, 0.1), 0)
        assert np.allclose(whole.rewards[:, e].numpy(), -np.linalg.norm(pos - goal, axis=1), atol=1e-5)
    assert torch.allclose(whole.returns, whole.rewards.sum(0))


def test_rollouts_mask_steps_after_termination():
    sampler = RolloutSampler("BilevelRay/CartPoleRandom-v0", hidden=(8,))
    params = sampler.policy.init(seed=0)
    eps = sampler.sample(params, sampler.sample_tasks(2, seed=0), 4, seed=0)
    lengths = eps.mask.sum(0)
    assert (lengths < 200).all() and eps.actions.dtype == torch.long
    # the mask is a prefix of ones, and CartPole pays 1 per step taken
    assert torch.equal(eps.mask.cumprod(0), eps.mask)
    assert torch.equal(eps.returns, lengths)


# ---------------------------------------------------------------- estimators

def test_returns_gae_and_baseline_match_direct_formulas():
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(6, 3, generator=g, dtype=torch.float64)
    mask = torch.ones(6, 3, dtype=torch.float64)
    mask[4:, 1] = 0
    rewards = rewards * mask
    gamma, lam = 0.9, 0.8
    ret = discounted_returns(rewards, mask, gamma)
    for e in range(3):
        for t in range(6):
            expect = sum(gamma ** (k - t) * rewards[k, e] * mask[k, e] for k in range(t, 6)) * mask[t, e]
            assert ret[t, e] == pytest.approx(float(expect))
    values = torch.randn(6, 3, generator=g, dtype=torch.float64)
    assert torch.allclose(gae(rewards, values, mask, gamma, 1.0), (ret - values) * mask)
    adv0 = gae(rewards, values, mask, gamma, 0.0)
    nxt = torch.cat([values[1:] * mask[1:], torch.zeros(1, 3, dtype=torch.float64)])
    assert torch.allclose(adv0, (rewards + gamma * nxt - values) * mask)
    assert torch.allclose(gae(rewards, values, mask, gamma, lam)[:, 0],
                          torch.stack([sum((gamma * lam) ** (k - t) * adv0[k, 0] for k in range(t, 6)) for t in range(6)]))
    # the baseline is a least-squares fit: residuals orthogonal to the features
    obs = torch.randn(6, 3, 2, generator=g, dtype=torch.float64)
    coef = fit_linear_baseline(obs, ret, mask, reg=0.0)
    feats = baseline_features(obs, mask)
    resid = (ret - feats @ coef) * mask
    assert torch.allclose(torch.einsum("te,tef->f", resid, feats), torch.zeros(8, dtype=torch.float64), atol=1e-8)
    adv = advantages(obs, rewards, mask, gamma=gamma, lam=lam)
    assert float((adv * mask).sum()) == pytest.approx(0.0, abs=1e-9)
    assert float((adv ** 2 * mask).sum() / mask.sum()) == pytest.approx(1.0, abs=1e-6)


# A two-step MDP whose expected return is known in closed form: state 0, then state 1 + a0; two actions;
# observations are one-hot states; a linear categorical policy; reward table R0[a0], R1[a0, a1].
R0 = torch.tensor([1.0, -0.5], dtype=torch.float64)
R1 = torch.tensor([[0.3, 2.0], [-1.0, 0.7]], dtype=torch.float64)
ONE_HOT = torch.eye(3, dtype=torch.float64)


def _tiny_policy():
    policy = CategoricalMLPPolicy(3, 2, ())
    params = policy.init(seed=0, dtype=torch.float64)
    params["layer0.weight"] = torch.tensor([[0.4, -0.3, 0.2], [-0.1, 0.5, -0.6]], dtype=torch.float64)
    params["layer0.bias"] = torch.tensor([0.1, -0.2], dtype=torch.float64)
    return policy, params


def _flat(policy, params):
    names = list(params)
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]

    def unflat(theta):
        return {n: t.reshape(s) for n, t, s in zip(names, theta.split(sizes), shapes)}
    return torch.cat([params[n].flatten() for n in names]), unflat


def _exact_return(policy, unflat, theta):
    p = unflat(theta)
    pi0 = policy.distribution(p, ONE_HOT[:1]).probs[0]
    pi1 = policy.distribution(p, ONE_HOT[1:]).probs
    return sum(pi0[a0] * pi1[a0, a1] * (R0[a0] + R1[a0, a1]) for a0 in range(2) for a1 in range(2))


def _trajectory_surrogate(policy, unflat, theta, a0, a1, baseline):
    p = unflat(theta)
    obs = torch.stack([ONE_HOT[0], ONE_HOT[1 + a0]]).unsqueeze(1)
    acts = torch.tensor([[a0], [a1]])
    logp = policy.log_prob(p, obs, acts)
    rewards = torch.stack([R0[a0], R1[a0, a1]]).unsqueeze(1)
    mask = torch.ones(2, 1, dtype=torch.float64)
    adv = discounted_returns(rewards, mask, 1.0) - torch.tensor([[baseline[0]], [baseline[1 + a0]]], dtype=torch.float64)
    return dice_surrogate(logp, adv, mask)


def test_dice_surrogate_gradient_and_hessian_are_exact_in_expectation():
    """Σ_τ p(τ) S_τ(θ) with p detached has the gradient and Hessian of the closed-form return, for any
    state baseline: the surrogate's first and second derivatives are unbiased."""
    policy, params = _tiny_policy()
    theta, unflat = _flat(policy, params)
    baseline = (0.7, -0.3, 1.1)

    def expected_surrogate(th):
        p = unflat(th)
        pi0 = policy.distribution(p, ONE_HOT[:1]).probs[0].detach()
        pi1 = policy.distribution(p, ONE_HOT[1:]).probs.detach()
        return sum(pi0[a0] * pi1[a0, a1] * _trajectory_surrogate(policy, unflat, th, a0, a1, baseline)
                   for a0, a1 in itertools.product(range(2), range(2)))

    exact = lambda th: _exact_return(policy, unflat, th)  # noqa: E731
    assert float(expected_surrogate(theta)) == pytest.approx(0.0, abs=1e-12)
    g_exact = torch.autograd.functional.jacobian(exact, theta)
    g_sur = torch.autograd.functional.jacobian(expected_surrogate, theta)
    assert torch.allclose(g_sur, g_exact, atol=1e-12)
    assert g_exact.abs().max() > 0.1
    h_exact = torch.autograd.functional.hessian(exact, theta)
    h_sur = torch.autograd.functional.hessian(expected_surrogate, theta)
    assert torch.allclose(h_sur, h_exact, atol=1e-12)
    assert h_exact.abs().max() > 0.05


class _TinyMDP(gym.Env):
    """The same two-step MDP as a gymnasium meta-environment (the task scales the rewards)."""

    observation_space = gym.spaces.Box(0, 1, (3,), np.float64)
    action_space = gym.spaces.Discrete(2)

    def __init__(self):
        self.task, self.t, self.a0 = {"scale": 1.0}, 0, 0

    def sample_tasks(self, n, *, seed):
        return [{"scale": float(s)} for s in np.random.default_rng(seed).uniform(0.5, 2, n)]

    def set_task(self, task):
        self.task = {"scale": float(task["scale"])}

    def get_task(self):
        return dict(self.task)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return ONE_HOT[0].numpy(), {}

    def step(self, action):
        a = int(action)
        s = self.task["scale"]
        if self.t == 0:
            self.t, self.a0 = 1, a
            return ONE_HOT[1 + a].numpy(), s * float(R0[a]), False, False, {}
        return ONE_HOT[0].numpy(), s * float(R1[self.a0, a]), True, False, {}


def test_sampled_surrogate_gradient_matches_the_closed_form_policy_gradient():
    """Through the real rollout path: the Monte-Carlo surrogate gradient is within 4 standard errors of
    the analytic gradient in every coordinate."""
    gym.register(id="TestNs/TinyMDP-v0", entry_point=_TinyMDP, max_episode_steps=2)
    try:
        policy, params = _tiny_policy()
        sampler = RolloutSampler("TestNs/TinyMDP-v0", policy=policy)
        n = 3000
        eps = sampler.sample(params, [{"scale": 1.0}], n, seed=0)
        theta, unflat = _flat(policy, params)
        adv = discounted_returns(eps.rewards, eps.mask, 1.0)
        th = theta.clone().requires_grad_(True)
        logp = policy.log_prob(unflat(th), eps.obs, eps.actions)
        # per-episode gradients Σ_t ∇log π_t A_t, for the standard error
        jac = torch.autograd.functional.jacobian(
            lambda t: (policy.log_prob(unflat(t), eps.obs, eps.actions) * adv * eps.mask).sum(0), theta,
            vectorize=True)
        mean, se = jac.mean(0), jac.std(0) / math.sqrt(n)
        grad = torch.autograd.grad(dice_surrogate(logp, adv, eps.mask), th)[0]
        assert torch.allclose(grad, mean, atol=1e-10)
        g_exact = torch.autograd.functional.jacobian(lambda t: _exact_return(policy, unflat, t), theta)
        assert ((grad - g_exact).abs() <= 4 * se + 1e-12).all(), (grad, g_exact, se)
    finally:
        gym.registry.pop("TestNs/TinyMDP-v0", None)


def test_surrogate_hvp_matches_finite_differences_of_its_gradient():
    """DiCE's ⊡ is the importance weight of the sampling policy: moving θ with the episodes and the
    sampling policy fixed, the gradient's finite differences give the surrogate's HVP."""
    sampler = RolloutSampler("BilevelRay/Navigation2D-v0", horizon=20, hidden=(8,))
    policy = sampler.policy
    params = {k: v.double() for k, v in policy.init(seed=0).items()}
    eps = sampler.sample(params, sampler.sample_tasks(2, seed=0), 5, seed=0)
    adv = advantages(eps.obs, eps.rewards, eps.mask)
    theta, unflat = _flat(policy, params)
    behaviour = policy.log_prob(params, eps.obs, eps.actions).detach()

    def grad(th, behaviour_log_probs=None):
        th = th.detach().requires_grad_(True)
        logp = policy.log_prob(unflat(th), eps.obs, eps.actions)
        s = dice_surrogate(logp, adv, eps.mask, behaviour_log_probs)
        return torch.autograd.grad(s, th, create_graph=True)[0], th

    v = torch.randn(theta.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    g, th = grad(theta)
    assert torch.allclose(g, grad(theta, behaviour)[0])
    hvp = torch.autograd.grad(g @ v, th)[0]
    h = 1e-5
    fd = (grad(theta + h * v, behaviour)[0] - grad(theta - h * v, behaviour)[0]) / (2 * h)
    assert hvp.norm() > 1e-2
    assert torch.allclose(hvp, fd.detach(), rtol=1e-6, atol=1e-8)
    # the score-product terms matter: without them (differencing the plain gradient) it differs
    fd_plain = (grad(theta + h * v)[0] - grad(theta - h * v)[0]) / (2 * h)
    assert (fd_plain - hvp).norm() > 0.1 * hvp.norm()


def test_soft_clipped_importance_weights_keep_gradient_and_hessian_at_the_sampling_policy():
    sampler = RolloutSampler("BilevelRay/Navigation2D-v0", horizon=20, hidden=(8,))
    policy = sampler.policy
    params = {k: v.double() for k, v in policy.init(seed=0).items()}
    eps = sampler.sample(params, sampler.sample_tasks(2, seed=0), 5, seed=0)
    adv = advantages(eps.obs, eps.rewards, eps.mask)
    theta, unflat = _flat(policy, params)

    def surrogate(th, clip):
        return dice_surrogate(policy.log_prob(unflat(th), eps.obs, eps.actions), adv, eps.mask, eps.log_probs, clip)

    for fn in (torch.autograd.functional.jacobian, torch.autograd.functional.hessian):
        exact, clipped = fn(lambda t: surrogate(t, None), theta), fn(lambda t: surrogate(t, 0.5), theta)
        assert torch.allclose(exact, clipped, atol=1e-12) and exact.abs().max() > 1e-3
    far = theta + 3.0 * torch.randn(theta.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    log_ratio = torch.cumsum((policy.log_prob(unflat(far), eps.obs, eps.actions) - eps.log_probs) * eps.mask, 0)
    assert log_ratio.abs().max() > 5  # far from the sampling policy the raw weights explode ...
    bound = float(adv.abs().max() * eps.mask.sum(0).max()) * (math.exp(0.5) + 1)
    assert abs(float(surrogate(far, 0.5))) <= bound  # ... the clipped ones stay below e^c


def test_native_vector_navigation_matches_the_single_environment_bit_for_bit():
    """gymnasium's vector_entry_point of 2-D navigation gives the same episodes as a SyncVectorEnv of the
    registered environment (positions, rewards, termination, truncation), and splits by task like it."""
    from bilevel_ray.rl.navigation import Navigation2DVectorEnv

    for kwargs in ({"goal_tolerance": 0.0}, {"goal_tolerance": 0.2}):  # never, and often at different steps
        sampler = RolloutSampler("BilevelRay/Navigation2D-v0", hidden=(8,), env_kwargs=kwargs)
        params = sampler.policy.init(seed=0)
        tasks = sampler.sample_tasks(3, seed=0)
        native = sampler.sample(params, tasks, 4, seed=1)
        assert isinstance(sampler._vector_env(12), Navigation2DVectorEnv)
        sampler._vecs[12] = gym.vector.SyncVectorEnv(
            [lambda: rl.make_env("BilevelRay/Navigation2D-v0", **kwargs) for _ in range(12)])
        reference = sampler.sample(params, tasks, 4, seed=1)
        assert torch.equal(native.mask, reference.mask) and torch.equal(native.task, reference.task)
        live = native.mask.bool()  # after an episode ends the two autoreset differently; those steps are masked
        for name in ("obs", "actions", "rewards", "log_probs"):
            assert torch.equal(getattr(native, name)[live], getattr(reference, name)[live]), name
        lengths = native.mask.sum(0)
        ends = len(set(lengths.tolist())) >= 4 if kwargs["goal_tolerance"] else bool(native.mask.all())
        assert native.mask.shape[0] == 100 and ends
    vec = Navigation2DVectorEnv(2, max_episode_steps=3, goal_tolerance=0.0)
    with pytest.raises(ValueError, match=r"Navigation2DVectorEnv.set_task: task\['goal_y'\] must be in"):
        vec.set_tasks([{"goal_x": 0.0, "goal_y": 0.0}, {"goal_x": 0.0, "goal_y": 9.0}])
    with pytest.raises(ValueError, match="env.tasks: need 2 tasks, one per sub-environment, got 1"):
        vec.set_tasks([{"goal_x": 0.0, "goal_y": 0.0}])
    vec.reset(seed=0)
    truncated = [vec.step(np.zeros((2, 2)))[3] for _ in range(3)]
    assert [bool(t.all()) for t in truncated] == [False, False, True]


def test_policies_sample_many_tasks_in_one_batched_pass_like_one_by_one():
    sampler = RolloutSampler("BilevelRay/Navigation2D-v0", hidden=(16, 16))
    tasks = sampler.sample_tasks(6, seed=0)
    params = [{k: v + 0.05 * i for k, v in sampler.policy.init(seed=i).items()} for i in range(6)]
    whole = sampler.sample(params, tasks, 3, seed=2)
    part = sampler.sample(params[2:5], tasks[2:5], 3, seed=2, first_episode=6)
    for name in ("obs", "actions", "log_probs", "rewards"):
        assert torch.equal(getattr(whole, name)[:, 6:15], getattr(part, name)), name
    for k in range(6):  # the recorded log-probabilities are the policy's own
        e = whole.of_task(k)
        assert torch.allclose(sampler.policy.log_prob(params[k], e.obs, e.actions), e.log_probs, atol=1e-5)


def test_advantages_of_many_tasks_in_one_pass_equal_each_task_alone():
    sampler = RolloutSampler("BilevelRay/Navigation2D-v0", horizon=30, hidden=(8,))
    eps = sampler.sample(sampler.policy.init(seed=0), sampler.sample_tasks(4, seed=0), 5, seed=3)
    together = advantages(eps.obs, eps.rewards, eps.mask, groups=4)
    alone = torch.cat([advantages(eps.of_task(k).obs, eps.of_task(k).rewards, eps.of_task(k).mask) for k in range(4)], 1)
    assert torch.allclose(together, alone, atol=1e-5)
    with pytest.raises(ValueError, match="rl.groups: 20 episodes do not split into 3 equal groups"):
        advantages(eps.obs, eps.rewards, eps.mask, groups=3)


def test_mujoco_environments_print_no_warning_about_gymnasiums_model_files(capfd):
    import warnings

    from bilevel_ray.rl import locomotion

    env = rl.make_env("BilevelRay/HalfCheetahVel-v0")
    env.close()
    out, err = capfd.readouterr()
    assert "settotalmass" not in out + err
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        locomotion._mujoco_warning("compiler attribute 'settotalmass' is deprecated and will be removed")
        with pytest.raises(RuntimeWarning, match="MuJoCo: Nan, Inf or huge value in QACC"):
            locomotion._mujoco_warning("Nan, Inf or huge value in QACC at DOF 0")

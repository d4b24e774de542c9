"""The MAML form of the meta-RL problem (task ``meta_rl``, ``form: maml``): its hypergradient is MAML's
meta-gradient, the LVC and DiCE estimators against exact Hessians of a tabular problem, the trust
region's bound, agents' local lower levels, and a short navigation run that learns."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from bilevel_ray import oracles, tree
from bilevel_ray.algorithms import make
from bilevel_ray.problem import bind_at
from bilevel_ray.rl.estimators import dice_surrogate, lvc_surrogate
from bilevel_ray.tasks import make_task

# a linear-Gaussian policy (depth 0: mean = W s + b) on short navigation episodes, float64
LINEAR = dict(train_tasks=3, meta_batch=3, episodes=4, horizon=8, width=4, depth=0, eval_tasks=2, eval_episodes=2,
              dtype="float64", reg=2.0, adapt_lr=0.3)


def _maml_meta_gradient(task, x, batch):
    """Reference: autograd through the inner step, x ↦ −mean_k Ŝ'_k(x + α∇Ŝ_k(x)), written out here."""
    from bilevel_ray.rl.estimators import surrogate

    def s(params, eps, adv):
        logp = task.policy.log_prob(params, eps.obs, eps.actions)
        return surrogate(task.estimator, logp, adv, eps.mask, eps.log_probs, task.max_log_ratio) / eps.mask.shape[0]

    theta = {k: v.detach().clone().requires_grad_(True) for k, v in x.items()}
    names = list(theta)
    losses = []
    for pre, pre_adv, post, post_adv in zip(batch.pre, batch.pre_advantages, batch.post, batch.post_advantages):
        grads = torch.autograd.grad(s(theta, pre, pre_adv), [theta[k] for k in names], create_graph=True)
        phi = {k: theta[k] + task.adapt_lr * g for k, g in zip(names, grads)}
        losses.append(-s(phi, post, post_adv))
    return dict(zip(names, torch.autograd.grad(torch.stack(losses).mean(), [theta[k] for k in names])))


@pytest.mark.parametrize("estimator,post", [("lvc", "adapted"), ("dice", "adapted"), ("lvc", "lower")])
def test_maml_form_hypergradient_is_the_maml_meta_gradient(estimator, post):
    task = make_task("meta_rl", **LINEAR, estimator=estimator, post_episodes=post)
    x, y = task.init(seed=0)
    x = {k: v + 0.05 * torch.randn(v.shape, generator=torch.Generator().manual_seed(3), dtype=v.dtype)
         for k, v in x.items()}
    bound = bind_at(task, x, y)
    _, batch = bound.inner.sample(np.random.default_rng(0))
    assert bound.outer.sample(np.random.default_rng(1))[1] is batch  # one meta-batch for both levels
    # y*(x) = x + α∇Ŝ(x), one lower step of 1/λ from any y; post episodes of y* (adapted) or of y (lower)
    ys = tree.axpy(-1 / task.reg, oracles.grad_y(task.g, x, y, batch), y)
    sampled = {n: torch.stack([batch.post_policies[k][n] for k in range(task.train_tasks)]) for n in x}
    assert float(tree.norm(tree.sub(sampled, ys if post == "adapted" else y))) < 1e-12
    assert tree.norm(oracles.grad_y(task.g, x, ys, batch)) < 1e-12
    assert tree.norm(tree.sub(oracles.grad_y(task.g, x, y, batch), tree.scale(tree.sub(y, ys), task.reg))) < 1e-12
    fx, fy = oracles.grad_xy(task.f, x, ys, batch)
    v = tree.scale(fy, 1 / task.reg)  # ∇²_yy g = λI
    assert tree.norm(tree.sub(oracles.hvp(task.g, x, ys, v, batch), fy)) < 1e-12
    hypergrad = tree.sub(fx, oracles.cross(task.g, x, ys, v, batch))
    reference = _maml_meta_gradient(task, x, batch)
    assert float(tree.norm(reference)) > 1e-3
    assert float(tree.norm(tree.sub(hypergrad, reference))) < 1e-5 * float(tree.norm(reference))
    # the curvature term matters: the first-order (FOMAML) direction is far from it
    assert float(tree.norm(tree.sub(fy_mean := tree.tree_map(lambda t: t.sum(0), fy), reference))) > 1e-4
    del fy_mean


def test_dsbo_with_exact_lower_and_linear_steps_takes_the_maml_step():
    """DSBO with lower and linear-system steps of 1/λ, τ = 1 and a plain outer step moves x by exactly
    −α_out × MAML's meta-gradient, from any y and z."""
    task = make_task("meta_rl", **LINEAR)
    algo = make("dsbo", inner_lr=1 / task.reg, linear_lr=1 / task.reg, inner_steps=1, linear_steps=1, tau=1.0,
                outer_lr=0.5)
    x, y = task.init(seed=0)
    y = tree.tree_map(lambda t: t + 0.2, y)
    state = algo.init(bind_at(task, x, y), x, y, seed=0)
    problem = bind_at(task, state.x, state.y, step=0)
    new = algo.step(state, problem)
    _, batch = problem.inner.sample(np.random.default_rng(0))  # the meta-batch the step used
    reference = _maml_meta_gradient(task, x, batch)
    moved = tree.scale(tree.sub(x, new.x), 1 / 0.5)
    assert float(tree.norm(tree.sub(moved, reference))) < 1e-6 * float(tree.norm(reference))


# -- estimators against exact Hessians on a tabular problem ---------------------------------------------
S, A, H = 2, 2, 3


def _tabular(action_dependent: bool):
    rng = np.random.default_rng(0)
    reward = torch.tensor(rng.normal(size=(S, A)), dtype=torch.float64)
    if action_dependent:
        trans = torch.tensor(rng.dirichlet(np.ones(S), size=(S, A)), dtype=torch.float64)  # P[s, a, s']
    else:  # the next state does not depend on the action
        trans = torch.tensor(rng.dirichlet(np.ones(S), size=S), dtype=torch.float64)[:, None].expand(S, A, S)
    return reward, trans


def _trajectories():
    # s_0 = 0; (a_0, s_1, a_1, ..., s_{H-1}, a_{H-1})
    for acts in itertools.product(range(A), repeat=H):
        for states in itertools.product(range(S), repeat=H - 1):
            yield (0, *states), acts


def _exact_hessian(theta, reward, trans):
    def value(th):
        pi = torch.softmax(th, -1)
        total = 0.0
        for states, acts in _trajectories():
            p, ret = 1.0, 0.0
            for t in range(H):
                p = p * pi[states[t], acts[t]]
                ret = ret + reward[states[t], acts[t]]
                if t + 1 < H:
                    p = p * trans[states[t], acts[t], states[t + 1]]
            total = total + p * ret
        return total

    return torch.autograd.functional.hessian(value, theta)


def _estimator_hessian(estimator, theta, reward, trans, episodes):
    """The estimator's Hessian at ``theta`` on a batch of sampled episodes (return-to-go advantages)."""
    pi = torch.softmax(theta, -1).detach().numpy()
    rng = np.random.default_rng(episodes[0])
    n = episodes[1]
    states = np.zeros((H, n), dtype=int)
    acts = np.zeros((H, n), dtype=int)
    for t in range(H):
        u = rng.random(n)
        acts[t] = (u[:, None] > np.cumsum(pi[states[t]], -1)).sum(-1)
        if t + 1 < H:
            p = trans.numpy()[states[t], acts[t]]
            states[t + 1] = (rng.random(n)[:, None] > np.cumsum(p, -1)).sum(-1)
    rewards = reward[states, acts]
    to_go = torch.flip(torch.cumsum(torch.flip(rewards, [0]), 0), [0])
    mask = torch.ones(H, n, dtype=torch.float64)

    def surrogate(th):
        logp = torch.log_softmax(th, -1)[states, acts]
        return estimator(logp, to_go, mask)

    return torch.autograd.functional.hessian(surrogate, theta)


@pytest.mark.parametrize("estimator,action_dependent", [(lvc_surrogate, False), (dice_surrogate, True)])
def test_estimator_hessians_match_the_exact_hessian_within_their_standard_error(estimator, action_dependent):
    """LVC is unbiased where actions do not change later states (the score products it drops have zero
    mean there); DiCE is unbiased on any MDP. Mean of 40 batches of 500 episodes vs the exact Hessian."""
    reward, trans = _tabular(action_dependent)
    theta = torch.tensor([[0.3, -0.2], [-0.5, 0.4]], dtype=torch.float64)
    exact = _exact_hessian(theta, reward, trans).reshape(S * A, S * A)
    draws = torch.stack([_estimator_hessian(estimator, theta, reward, trans, (seed, 500)).reshape(S * A, S * A)
                         for seed in range(40)])
    mean, se = draws.mean(0), draws.std(0) / np.sqrt(len(draws))
    assert float(exact.abs().max()) > 0.05
    assert bool(((mean - exact).abs() <= 4 * se + 1e-9).all()), (mean - exact) / se


def test_lvc_has_lower_variance_and_drops_cross_step_terms_on_a_general_mdp():
    """Where actions move the state, LVC's Hessian is biased (it drops the products of scores at
    different steps) but its spread over batches is smaller than DiCE's."""
    reward, trans = _tabular(True)
    theta = torch.tensor([[0.3, -0.2], [-0.5, 0.4]], dtype=torch.float64)
    spread = {}
    for name, est in (("lvc", lvc_surrogate), ("dice", dice_surrogate)):
        draws = torch.stack([_estimator_hessian(est, theta, reward, trans, (seed, 200)) for seed in range(20)])
        spread[name] = float(draws.std(0).norm())
    assert spread["lvc"] < spread["dice"]


# -- trust region ---------------------------------------------------------------------------------------
SMALL = dict(train_tasks=4, meta_batch=4, episodes=3, horizon=10, width=8, depth=1, eval_tasks=2, eval_episodes=2)


@pytest.mark.parametrize("name,hyper", [
    ("soba", dict(inner_lr=1.0, outer_lr=50.0)),
    ("dsbo", dict(inner_lr=1.0, linear_lr=1.0, inner_steps=1, linear_steps=1, outer_lr=50.0)),
    ("bome", dict(inner_lr=0.5, inner_steps=1, outer_lr=50.0)),
])
def test_trust_region_step_never_exceeds_its_kl_bound(name, hyper):
    task = make_task("meta_rl", **SMALL, reg=1.0)
    x, y = task.init(seed=0)
    for max_kl, bounded in ((0.0, False), (1e-3, True)):
        algo = make(name, **hyper, max_kl=max_kl, trust_steps=30)
        state = algo.init(bind_at(task, x, y), x, y, seed=0)
        state = algo.step(state, bind_at(task, x, y, step=0))  # SOBA's first step has v = 0: x stays
        problem = bind_at(task, state.x, state.y, step=1)
        new = algo.step(state, problem)
        _, batch = problem.inner.sample(np.random.default_rng(0))
        kl = float(task.divergence(state.x, new.x, batch))
        assert (kl <= 1e-3) == bounded, kl
        if bounded:
            assert kl > 0  # a step was taken, inside the region


def test_trust_region_is_refused_where_the_problem_has_no_divergence():
    quad = make_task("quadratic", dim_x=3, dim_y=3)
    x, y = quad.init(seed=0)
    with pytest.raises(ValueError, match="algorithm.max_kl: the trust region needs a problem with divergence"):
        make("soba", max_kl=0.01).init(quad, x, y)


def test_trust_region_holds_per_agent_in_the_simulation():
    from bilevel_ray.config import from_dict
    from bilevel_ray.decentralized.backends import make_backend

    cfg = from_dict({"task": {"name": "meta_rl", **SMALL, "train_tasks": 4, "meta_batch": 2, "reg": 1.0},
                     "algorithm": {"name": "dsbo", "inner_lr": 1.0, "linear_lr": 1.0, "inner_steps": 1,
                                   "linear_steps": 1, "outer_lr": 50.0, "max_kl": 1e-3, "lower_level": "local"},
                     "decentralized": {"agents": 2, "topology": "ring", "backend": "sim"}, "run": {"steps": 1}})
    backend = make_backend(cfg.task, cfg.algorithm, cfg.decentralized, seed=0)
    before = backend.states()
    problem = bind_at(backend.problem, backend.state.x, backend.state.y, step=0, rank=(0, 1))
    backend.step()
    mixed = tree.tree_map(lambda t: torch.tensordot(torch.tensor(backend.mixing_at(0), dtype=t.dtype), t, dims=1),
                          tree.tree_map(lambda *a: torch.stack(a), *[s.x for s in before]))
    rngs = [np.random.default_rng([0, r, 0, 0]) for r in (0, 1)]
    for i, agent in enumerate(problem.agents):
        _, batch = agent.inner.sample(rngs[i])
        kl = float(cfg.task.divergence(tree.tree_map(lambda t: t[i], mixed), backend.states()[i].x, batch))
        assert 0 < kl <= 1e-3


# -- decentralized: each agent's lower level stays its own --------------------------------------------------
def test_local_lower_level_leaves_rows_of_other_agents_tasks_untouched():
    from bilevel_ray.config import from_dict
    from bilevel_ray.decentralized.backends import make_backend

    cfg = from_dict({"task": {"name": "meta_rl", **SMALL, "train_tasks": 6, "meta_batch": 2, "reg": 1.0},
                     "algorithm": {"name": "dsbo", "inner_lr": 1.0, "linear_lr": 1.0, "inner_steps": 1,
                                   "linear_steps": 1, "outer_lr": 0.05, "lower_level": "local"},
                     "decentralized": {"agents": 3, "topology": "ring", "backend": "sim"}, "run": {"steps": 3}})
    backend = make_backend(cfg.task, cfg.algorithm, cfg.decentralized, seed=0)
    y0 = [s.y for s in backend.states()]
    for _ in range(3):
        backend.step()
    shares = cfg.task.shard(3, seed=0)
    for i, state in enumerate(backend.states()):
        owned = set(shares[i][0].indices)
        for k in range(6):
            if k not in owned:
                assert all(torch.equal(state.y[n][k], y0[i][n][k]) for n in state.y), (i, k)
        assert any(not torch.equal(state.y[n][k], y0[i][n][k]) for k in owned for n in state.y)
    assert float(tree.norm(tree.sub(backend.states()[0].x, backend.states()[1].x))) > 0  # x is gossiped, not equal


# -- learning ---------------------------------------------------------------------------------------------
def test_a_short_navigation_run_improves_the_post_adaptation_return():
    from bilevel_ray.config import from_dict
    from bilevel_ray.decentralized.backends import make_backend

    torch.manual_seed(0)
    cfg = from_dict({"task": {"name": "meta_rl", "train_tasks": 8, "meta_batch": 8, "episodes": 8, "width": 32,
                              "depth": 1, "reg": 1.0, "adapt_lr": 0.1, "eval_tasks": 8, "eval_episodes": 8},
                     "algorithm": {"name": "soba", "inner_lr": 1.0, "outer_lr": 0.01, "outer_opt": "adam",
                                   "schedule": "constant", "max_kl": 0.01},
                     "run": {"steps": 15, "seed": 0}})
    backend = make_backend(cfg.task, cfg.algorithm, cfg.decentralized, seed=0)
    before = cfg.task.metrics(backend.state.x, backend.state.y)["post_return"]
    for _ in range(15):
        backend.step()
    after = cfg.task.metrics(backend.state.x, backend.state.y)["post_return"]
    assert after > before + 15, (before, after)


def test_maml_form_oracles_agree_on_the_torch_func_path():
    """Inside torch.func transforms (forward-mode, or oracles forced onto torch.func) the adaptation
    gradient in g is taken as a transform too; the oracles give the autograd path's values."""
    task = make_task("meta_rl", **LINEAR)
    x, y = task.init(seed=0)
    _, batch = bind_at(task, x, y).inner.sample(np.random.default_rng(0))
    v = tree.tree_map(lambda t: torch.randn(t.shape, generator=torch.Generator().manual_seed(5), dtype=t.dtype), y)
    eager = oracles.fused_rev(task.g, x, y, v, batch)
    with oracles.torch_func_only():
        functional = oracles.fused_rev(task.g, x, y, v, batch)
    forward = oracles.fused_fwd(task.g, x, y, v, batch)
    for other in (functional, forward):
        for a, b in zip(eager, other):
            assert float(tree.norm(tree.sub(a, b))) < 1e-9 * (1 + float(tree.norm(a)))

"""Contract tests over every registered algorithm and task (benchopt style)."""

import copy
import dataclasses
import pickle

import pytest
import torch
from torch.utils._pytree import tree_flatten

from bilevel_ray import algorithms as A
from bilevel_ray.problem import bind, bind_at, check_problem
from bilevel_ray.tasks import available_tasks, get_task, make_task

SMALL = {
    "quadratic": dict(dim_x=3, dim_y=4, n_inner=64, n_outer=64, batch_size=16),
    "logreg_hpo": dict(dataset="synthetic", n_samples=200, n_features=6, batch_size=32),
    "hypercleaning": dict(batch_size=256),
    "nonconvex_pl": dict(dim=3, noise=0.1, batch_size=16),
    "omniglot": dict(width=2, ways=4, meta_batch=2, shots=1, queries=1, rotations=1, eval_tasks=4, head_steps=2),
    "meta_rl": dict(train_tasks=4, meta_batch=2, episodes=2, horizon=8, width=4, depth=1, eval_tasks=2, eval_episodes=2),
}
TASKS = {}


def task(name):
    if name not in TASKS:
        try:
            TASKS[name] = make_task(name, **SMALL[name])
        except FileNotFoundError as e:  # a task reading data that is not on this machine
            pytest.skip(str(e))
    return TASKS[name]


def leaves(state):
    return [t for t in tree_flatten(tuple(state))[0] if isinstance(t, torch.Tensor)]


def test_every_task_has_a_small_setting():
    assert set(SMALL) == set(available_tasks())


@pytest.mark.parametrize("task_name", sorted(SMALL))
def test_task_satisfies_problem_protocol(task_name):
    t = task(task_name)
    check_problem(t)
    x, y = t.init(seed=0)
    metrics = t.metrics(x, y)
    assert "outer_objective" in metrics and all(isinstance(v, float) for v in metrics.values())


@pytest.mark.parametrize("task_name", sorted(SMALL))
@pytest.mark.parametrize("algo_name", A.available())
def test_steps_are_finite_pickle_and_reproduce(algo_name, task_name):
    t = task(task_name)
    docs = A.get(algo_name).field_docs()
    algo = A.make(algo_name, **({"inner_steps": min(2, docs["inner_steps"][0])} if "inner_steps" in docs else {}))
    assert isinstance(algo, A.BilevelAlgorithm)
    x, y = t.init(seed=0)
    if algo_name == "saba" and t.inner.num_batches is None:  # SAGA tables need a finite dataset
        with pytest.raises(ValueError, match="saba needs finite datasets"):
            algo.init(t, x, y, seed=3)
        return
    if algo_name == "maml_trpo" and task_name != "meta_rl":  # MAML-TRPO adapts policies by rollouts
        with pytest.raises(ValueError, match="maml_trpo needs a meta-RL task"):
            algo.init(t, x, y, seed=3)
        return
    # steps see the problem bound to their iterate (the identity except for on-policy tasks, meta_rl)
    s = algo.init(bind_at(t, x, y), x, y, seed=3)
    for _ in range(2):
        s = algo.step(s, bind(t, s))
    assert s.t == 2 and s.calls.total > 0
    assert [u.shape for u in leaves((s.x, s.y))] == [u.shape for u in leaves((x, y))]
    assert all(torch.isfinite(leaf).all() for leaf in leaves(s))
    assert not any(leaf.requires_grad for leaf in leaves(s))
    copy_ = pickle.loads(pickle.dumps(s))
    branch = copy.deepcopy(s)
    a, b = algo.step(branch, bind(t, branch)), algo.step(copy_, bind(t, copy_))
    assert all(torch.equal(u, v) for u, v in zip(leaves(a), leaves(b)))
    # the whole trajectory is a function of (config, seed): a fresh run lands on the same state
    again = algo.init(bind_at(t, x, y), x, y, seed=3)
    for _ in range(3):
        again = algo.step(again, bind(t, again))
    assert all(torch.equal(u, v) for u, v in zip(leaves((again.x, again.y)), leaves((a.x, a.y))))


def bad_values(field):
    meta, kind = field.metadata, str(field.type)
    out = [] if kind.startswith("str") else ["not-a-number"]
    if meta.get("choices"):
        out.append("no-such-choice")
    if meta.get("low") is not None:
        out.append(meta["low"] - 1 if "int" in kind else meta["low"] - 0.5)
    if meta.get("high") is not None:
        out.append(meta["high"] + 1)
    if "float" in kind:
        out.append(float("nan"))
    return out


@pytest.mark.parametrize("algo_name", A.available())
def test_algorithm_validation_rejects_bad_values(algo_name):
    cls = A.get(algo_name)
    A.make(algo_name)  # defaults are valid
    for field in dataclasses.fields(cls):
        for bad in bad_values(field):
            with pytest.raises(ValueError, match=rf"^algorithm\.{field.name}: "):
                A.make(algo_name, **{field.name: bad})
    with pytest.raises(ValueError, match=r"^algorithm\.no_such_field: unknown field"):
        A.make(algo_name, no_such_field=1)


@pytest.mark.parametrize("task_name", sorted(SMALL))
def test_task_validation_rejects_bad_values(task_name):
    cls = get_task(task_name)
    for field in dataclasses.fields(cls):
        for bad in bad_values(field):
            with pytest.raises(ValueError, match=rf"^task\.{field.name}: "):
                make_task(task_name, **{**SMALL[task_name], field.name: bad})


def test_unknown_names_list_what_is_available():
    with pytest.raises(ValueError, match=r"^algorithm\.name: unknown algorithm 'nope'; available: aid_cg"):
        A.make("nope")
    with pytest.raises(ValueError, match=r"^task\.name: unknown task 'nope'; available: "):
        make_task("nope")


def test_user_registered_algorithm_and_task(monkeypatch):
    """Users plug in their own: the registries take them and the contract holds."""
    from dataclasses import dataclass

    import bilevel_ray.algorithms.base
    import bilevel_ray.tasks

    # register into copies so that the plug-ins do not leak into other tests
    monkeypatch.setattr(bilevel_ray.algorithms.base.REGISTRY, "items", dict(bilevel_ray.algorithms.base.REGISTRY.items))
    monkeypatch.setattr(bilevel_ray.tasks.REGISTRY, "items", dict(bilevel_ray.tasks.REGISTRY.items))
    from typing import NamedTuple

    from bilevel_ray import oracles, tree
    from bilevel_ray.params import hp
    from bilevel_ray.tasks import Task, register_task

    @register_task("test_user_quadratic")
    @dataclass(frozen=True)
    class UserTask(Task):
        scale: float = hp(1.0, low=0)

        def __post_init__(self):
            super().__post_init__()
            q = make_task("quadratic", **SMALL["quadratic"])
            object.__setattr__(self, "inner", q.inner)
            object.__setattr__(self, "outer", q.outer)
            object.__setattr__(self, "_q", q)

        def f(self, x, y, batch):
            return self.scale * self._q.f(x, y, batch)

        def g(self, x, y, batch):
            return self._q.g(x, y, batch)

        def init(self, *, seed=0):
            return self._q.init(seed=seed)

        def metrics(self, x, y):
            return {"outer_objective": float(self.f(x, y, self.outer.full()))}

    class GDState(NamedTuple):
        x: torch.Tensor
        y: torch.Tensor
        t: int
        calls: A.Calls

    @A.register("test_user_gd")
    @dataclass(frozen=True)
    class UserGD(A.Hyperparams):
        lr: float = hp(0.1, low=0)

        def init(self, problem, x, y, *, seed=0, rank=0):
            return GDState(x, y, 0, A.Calls())

        def step(self, s, problem, mix=A.identity_mix):
            gy = oracles.grad_y(problem.g, s.x, s.y, problem.inner.full())
            return GDState(s.x, tree.axpy(-self.lr, gy, mix(s.y)), s.t + 1, s.calls.add(grad_g=1))

    t = make_task("test_user_quadratic", scale=2.0)
    algo = A.make("test_user_gd", lr=0.5)
    s = algo.step(algo.init(t, *t.init()), t)
    assert s.t == 1 and torch.isfinite(s.y).all()
    with pytest.raises(ValueError, match=r"^task\.scale: must be > 0"):
        make_task("test_user_quadratic", scale=-1.0)
    with pytest.raises(ValueError, match="already registered"):
        A.register("soba")(UserGD)

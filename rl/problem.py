"""Meta-RL as a bilevel problem that every core algorithm solves: the proximal form (iMAML-style).

Upper variable ``x``: the meta-policy's parameters. Lower variable ``y``: one policy per training task
(a fixed set of ``train_tasks`` tasks drawn from ``seed``; parameters stacked on a leading task axis),

    y*(x) = argmin_y  g(x, y) = Σ_k [ -J_k(y_k)/H + reg/2 ‖y_k - x‖² ]   (strongly convex for reg > curvature of J/H)
    min_x   f(x, y*(x)) = (1/M) Σ_k -J_k(y*_k(x))/H

with ``J_k`` the expected return of task ``k``, ``M`` tasks and ``H`` the horizon (per-step returns). On
a minibatch ``B`` of tasks the return terms are estimated — ``(M/|B|) Σ_{k∈B}`` in ``g``, the mean over
``B`` in ``f`` — by the DiCE surrogate of episodes sampled by the current ``y_k`` (importance-weighted,
soft-clipped, where an inner loop has moved ``y`` since), so gradients, Hessian-vector products and
cross derivatives are unbiased at the sampling point; the proximal term is exact (every row:
``∇²_yy g ⪰ (reg - curvature) I``).

The data are *on-policy*: an algorithm step sees :meth:`MetaRLTask.at` ``(x, y)`` — a problem whose
samplers run the rollouts with that ``y`` (see :func:`bilevel_ray.problem.bind`). Agents (decentralized
runs) each own a disjoint share of the training tasks and sample their own rollouts.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple, Sequence

import numpy as np
import torch
from torch import Tensor

from bilevel_ray.params import hp
from bilevel_ray.tasks import Task, register_task
from bilevel_ray.tree import PyTree

__all__ = ["MetaRLTask", "TaskIndexSampler", "RLBatch", "proximal_adapt", "rollout_sampler"]

DTYPES = {"float32": torch.float32, "float64": torch.float64}


@functools.lru_cache(maxsize=8)
def rollout_sampler(env: str, horizon: int | None, hidden: tuple[int, ...], workers: int = 0):
    """One rollout sampler per process and setting (vector environments are not picklable, so every
    process — a Ray agent included — builds its own). ``workers > 0``: Ray rollout actors."""
    from bilevel_ray.rl.rollouts import RolloutSampler

    if workers:
        from bilevel_ray.rl.ray_rollouts import RayRolloutSampler

        return RayRolloutSampler(env, workers=workers, horizon=horizon, hidden=hidden)
    return RolloutSampler(env, horizon=horizon, hidden=hidden)


@dataclass(frozen=True)
class TaskIndexSampler:
    """Minibatches of ``meta_batch`` distinct task indices among ``indices`` (an infinite stream)."""

    indices: tuple[int, ...]
    meta_batch: int

    num_batches = None

    def sample(self, rng: np.random.Generator) -> tuple[int, np.ndarray]:
        k = min(self.meta_batch, len(self.indices))
        return -1, np.sort(rng.choice(np.asarray(self.indices), size=k, replace=False))

    def full(self) -> np.ndarray:
        return np.asarray(self.indices)


class RLBatch(NamedTuple):
    """Episodes of some training tasks, each sampled by that task's current lower-level policy, and
    the tasks they were drawn among (``among``: the agent's share)."""

    indices: tuple[int, ...]
    episodes: tuple[Any, ...]      # Episodes per task
    advantages: tuple[Tensor, ...]
    among: tuple[int, ...]


@dataclass(frozen=True)
class _Rollouts:
    """A bound sampler: draws task indices, then runs their episodes under the bound ``y`` rows."""

    task: "MetaRLTask"
    index: TaskIndexSampler
    y: PyTree

    num_batches = None

    def sample(self, rng: np.random.Generator) -> tuple[int, RLBatch]:
        _, idx = self.index.sample(rng)
        return -1, self.task.rollouts(self.y, idx, seed=int(rng.integers(2**62)), among=self.index.indices)

    def full(self) -> RLBatch:
        return self.task.rollouts(self.y, self.index.full(), seed=0, among=self.index.indices)


class _Bound:
    """The problem one algorithm step sees: the task's objectives, rollouts under the bound ``y``."""

    def __init__(self, task: "MetaRLTask", y: PyTree, inner: TaskIndexSampler, outer: TaskIndexSampler):
        self.meta_rl, self.task_indices = task, inner
        self.inner, self.outer = _Rollouts(task, inner, y), _Rollouts(task, outer, y)
        self.f, self.g, self.init = task.f, task.g, task.init


def _row(y: PyTree, k: int) -> dict[str, Tensor]:
    return {name: t[k] for name, t in y.items()}


@register_task("meta_rl")
@dataclass(frozen=True)
class MetaRLTask(Task):
    """Proximal meta-RL on a meta-environment (see the module docstring)."""

    label_column: ClassVar[None] = None

    env: str = hp("BilevelRay/Navigation2D-v0", doc="gymnasium id of a meta-environment")
    horizon: int | None = hp(None, low=0, doc="episode length (default: the environment's time limit)")
    train_tasks: int = hp(40, low=1, strict=False, doc="fixed training tasks (the rows of y)")
    meta_batch: int = hp(10, low=1, strict=False, doc="tasks per minibatch")
    episodes: int = hp(10, low=1, strict=False, doc="episodes per task in a minibatch")
    width: int = hp(100, low=1, strict=False, doc="hidden units per layer of the policy")
    depth: int = hp(2, low=0, strict=False, doc="hidden layers of the policy")
    reg: float = hp(10.0, low=0, doc="λ of the proximal term (1/λ is the adaptation step size)")
    gamma: float = hp(0.99, low=0, high=1, strict=False, doc="discount of the advantages")
    gae_lambda: float = hp(1.0, low=0, high=1, strict=False, doc="GAE λ (1: returns minus the linear baseline)")
    adapt_steps: int = hp(1, low=1, strict=False, doc="proximal steps adapting x to a held-out task (metrics, eval)")
    eval_tasks: int = hp(20, low=1, strict=False, doc="held-out tasks of the metrics (fixed set)")
    eval_episodes: int = hp(10, low=1, strict=False, doc="episodes per held-out task and adaptation step")
    max_log_ratio: float | None = hp(2.0, low=0, doc="soft clip of the importance log-ratios away from the sampling "
                                                      "policy (exact derivatives at it; null: none)")
    rollout_workers: int = hp(0, low=0, strict=False, doc="Ray rollout actors per agent (0: in-process)")
    dtype: str = hp("float32", choices=tuple(DTYPES))
    seed: int = hp(0, low=0, strict=False, doc="training tasks are sample_tasks(seed=2·seed), held-out 2·seed+1")

    def __post_init__(self) -> None:
        super().__post_init__()
        # the in-process sampler (cached per process; unknown ids fail here, in one line) draws the tasks
        tasks = rollout_sampler(self.env, self.horizon or None, self.hidden).sample_tasks
        object.__setattr__(self, "train", tuple(tasks(self.train_tasks, seed=2 * self.seed)))
        object.__setattr__(self, "held_out", tuple(tasks(self.eval_tasks, seed=2 * self.seed + 1)))
        every = TaskIndexSampler(tuple(range(self.train_tasks)), self.meta_batch)
        object.__setattr__(self, "inner", every)
        object.__setattr__(self, "outer", every)

    # -- rollouts --------------------------------------------------------------------------------------
    @property
    def hidden(self) -> tuple[int, ...]:
        return (self.width,) * self.depth

    @property
    def sampler(self):
        return rollout_sampler(self.env, self.horizon or None, self.hidden, self.rollout_workers)

    @property
    def policy(self):
        return self.sampler.policy

    def _advantages(self, eps) -> Tensor:
        from bilevel_ray.rl.estimators import advantages

        return advantages(eps.obs, eps.rewards, eps.mask, gamma=self.gamma, lam=self.gae_lambda)

    def rollouts(self, y: PyTree, indices: Sequence[int], *, seed: int, among: Sequence[int] | None = None) -> RLBatch:
        """``episodes`` episodes of each training task in ``indices`` (drawn among ``among``, default all)
        under its row of ``y``."""
        indices = [int(k) for k in indices]
        eps = self.sampler.sample([_row(y, k) for k in indices], [self.train[k] for k in indices], self.episodes,
                                  seed=seed)
        per_task = tuple(eps.of_task(i) for i in range(len(indices)))
        among = tuple(range(self.train_tasks)) if among is None else tuple(int(k) for k in among)
        return RLBatch(tuple(indices), per_task, tuple(self._advantages(e) for e in per_task), among)

    def at(self, x: PyTree, y: PyTree, *, step: int, rank: int, inner: TaskIndexSampler | None = None,
           outer: TaskIndexSampler | None = None) -> _Bound:
        """The problem a step at ``(x, y)`` sees (on the agent's task shares ``inner``/``outer``)."""
        return _Bound(self, y, inner or self.inner, outer or self.outer)

    # -- the bilevel problem ---------------------------------------------------------------------------
    def _surrogates(self, y: PyTree, batch: RLBatch) -> list[Tensor]:
        from bilevel_ray.rl.estimators import dice_surrogate

        if not isinstance(batch, RLBatch):
            raise TypeError("meta_rl: objectives need rollouts; step on bilevel_ray.problem.bind(task, state), "
                            "as the backends do")
        out = []
        for k, eps, adv in zip(batch.indices, batch.episodes, batch.advantages):
            logp = self.policy.log_prob(_row(y, k), eps.obs, eps.actions)
            out.append(dice_surrogate(logp, adv, eps.mask, eps.log_probs, self.max_log_ratio) / eps.mask.shape[0])
        return out

    def g(self, x: PyTree, y: PyTree, batch: RLBatch) -> Tensor:
        returns = torch.stack(self._surrogates(y, batch)).sum() * (len(batch.among) / len(batch.indices))
        rows = None if len(batch.among) == self.train_tasks else torch.tensor(batch.among)
        prox = sum((((y[n] if rows is None else y[n][rows]) - x[n]) ** 2).sum() for n in x)
        return -returns + 0.5 * self.reg * prox

    def f(self, x: PyTree, y: PyTree, batch: RLBatch) -> Tensor:
        return -torch.stack(self._surrogates(y, batch)).mean()

    def init(self, *, seed: int = 0) -> tuple[PyTree, PyTree]:
        x = self.policy.init(seed=seed, dtype=DTYPES[self.dtype])
        return x, {n: t.unsqueeze(0).repeat(self.train_tasks, *[1] * t.ndim) for n, t in x.items()}

    # -- agents, metrics -------------------------------------------------------------------------------
    def shard(self, n_agents: int, *, split: str = "iid", alpha: float = 0.5, seed: int = 0):
        """Each agent's ``(inner, outer)`` task-index samplers over its own share of the training tasks."""
        if split != "iid":
            raise ValueError("decentralized.split: meta_rl splits its training tasks among agents; use 'iid'")
        if n_agents > self.train_tasks:
            raise ValueError(f"decentralized.agents: {n_agents} agents need at least {n_agents} task.train_tasks, "
                             f"got {self.train_tasks}")
        order = np.random.default_rng([seed, 5]).permutation(self.train_tasks)
        parts = [tuple(sorted(int(k) for k in part)) for part in np.array_split(order, n_agents)]
        return [(TaskIndexSampler(p, self.meta_batch), TaskIndexSampler(p, self.meta_batch)) for p in parts]

    def learner(self, x: PyTree, y: PyTree) -> Any:
        """The deployable meta-policy ``x`` (saved by runs as ``learner.pt``; ``bilevel-ray eval`` adapts it)."""
        from bilevel_ray.rl.metapolicy import MetaPolicy

        return MetaPolicy(self.env, self.sampler.horizon, self.hidden, {k: v.detach() for k, v in x.items()},
                          self.reg, self.adapt_steps, self.gamma, self.gae_lambda)

    def metrics(self, x: PyTree, y: PyTree) -> dict[str, float]:
        """On the fixed held-out tasks: mean return of ``x`` before (``pre_return``) and after
        (``post_return``) ``adapt_steps`` proximal steps; ``outer_objective = -post_return / H``;
        ``lower_return``: the lower-level policies on their first ``eval_tasks`` training tasks."""
        returns, _ = proximal_adapt(self.sampler, x, self.held_out, steps=self.adapt_steps, reg=self.reg,
                                    episodes=self.eval_episodes, gamma=self.gamma, lam=self.gae_lambda,
                                    seed=(self.seed, 7))
        lower = self.rollouts(y, range(min(self.eval_tasks, self.train_tasks)), seed=self.seed + 11)
        horizon = self.sampler.horizon
        post = float(returns[-1].mean())
        return {"outer_objective": -post / horizon, "pre_return": float(returns[0].mean()), "post_return": post,
                "lower_return": float(torch.cat([e.returns for e in lower.episodes]).mean())}


def proximal_adapt(sampler: Any, x: PyTree, tasks: Sequence[dict], *, steps: int, reg: float, episodes: int,
                   gamma: float, lam: float, seed: int | tuple[int, ...]) -> tuple[Tensor, list[dict[str, Tensor]]]:
    """Adapt ``x`` to each of ``tasks`` by ``steps`` gradient steps of size ``1/reg`` on the lower
    objective ``-J/H + reg/2‖φ - x‖²``, fresh episodes each step (one step is MAML's VPG step of size
    ``1/reg``). Returns the per-task mean returns before each step and after the last, ``(steps + 1, n)``,
    and the adapted policies."""
    from bilevel_ray.rl.estimators import advantages
    from bilevel_ray.rl.maml import Adaptation, adapt

    # a step of size 1/reg on the lower objective from φ lands on x + ∇S(φ)/reg: the proximal term cancels
    vpg = Adaptation(lr=1.0 / reg, steps=1, gamma=gamma, lam=lam)
    phis = [dict(x) for _ in tasks]
    out = []
    for s in range(steps + 1):
        eps = sampler.sample(phis, list(tasks), episodes, seed=(*np.atleast_1d(seed).tolist(), s))
        out.append(torch.stack([eps.of_task(k).returns.mean() for k in range(len(tasks))]))
        if s == steps:
            break
        new = []
        for k, phi in enumerate(phis):
            e = eps.of_task(k)
            moved = adapt(sampler.policy, phi, e, advantages(e.obs, e.rewards, e.mask, gamma=gamma, lam=lam), vpg)
            new.append({n: x[n].detach() + moved[n] - phi[n].detach() for n in phi})
        phis = new
    return torch.stack(out), phis

"""Meta-RL as a bilevel problem that every core algorithm solves, in two forms.

Upper variable ``x``: the meta-policy's parameters. Lower variable ``y``: one policy per training task
(a fixed set of ``train_tasks`` tasks drawn from ``seed``; parameters stacked on a leading task axis).
``J_k`` is the expected return of task ``k``, ``H`` the horizon, ``Ŝ_k`` a surrogate of ``J_k/H`` on
sampled episodes (:func:`bilevel_ray.rl.estimators.surrogate`: ProMP's LVC, the default, or DiCE).

``form: maml`` (the default) makes the lower level the adaptation that is evaluated (MAML, Finn et
al. 2017, one policy-gradient step of size ``α = adapt_lr``), written as a quadratic problem:

    g(x, y) = Σ_{k∈B} λ/2 ‖y_k − x − α∇Ŝ_k(x)‖²          y*_k(x) = x + α∇Ŝ_k(x)
    f(x, y) = (1/|B|) Σ_{k∈B} −Ŝ'_k(y_k)

on a minibatch ``B`` of tasks: ``Ŝ_k`` on episodes of ``x`` (before adaptation), ``Ŝ'_k`` on episodes of
the adapted policies ``x + α∇Ŝ_k(x)`` (after; ``post_episodes: adapted``, MAML's data, on-policy for
algorithms that solve the lower level before using ``f``, such as DSBO) or of the current rows ``y_k``
(``post_episodes: lower``, on-policy for single-loop methods that use ``f`` at the current ``y``, such
as SOBA). ``∇²_yy g = λI``, so a lower step of ``1/λ`` lands on
``y*`` and the hypergradient ``∇_x f − ∇²_xy g [∇²_yy g]⁻¹ ∇_y f = (I + α∇²Ŝ(x)) ∇_y f`` is MAML's
meta-gradient. A step's data are one meta-batch, drawn at its first ``sample`` and shared by both
levels (as MAML's collection: episodes of ``x``, adaptation, episodes of the adapted policies).

``form: proximal`` is the iMAML-style problem (Rajeswaran et al. 2019), solved approximately in the
budget:

    g(x, y) = Σ_k [ -J_k(y_k)/H + λ/2 ‖y_k - x‖² ]       f(x, y) = (1/M) Σ_k -J_k(y_k)/H

the return terms estimated on minibatches of tasks (``(M/|B|) Σ_{k∈B}`` in ``g``), episodes sampled by
the current ``y_k`` (importance-weighted, soft-clipped, where an inner loop has moved ``y`` since).

The data are *on-policy*: an algorithm step sees :meth:`MetaRLTask.at` ``(x, y)`` — a problem whose
samplers run the rollouts at that iterate (see :func:`bilevel_ray.problem.bind`). Agents (decentralized
runs) each own a disjoint share of the training tasks and sample their own rollouts.
:meth:`MetaRLTask.divergence` (mean KL between two meta-policies on a batch's states) is what the
algorithms' trust region (``algorithm.max_kl``) bounds.
"""

from __future__ import annotations

import functools
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, NamedTuple, Sequence

import numpy as np
import torch
from torch import Tensor

from bilevel_ray.params import hp
from bilevel_ray.tasks import Task, register_task
from bilevel_ray.tree import PyTree

__all__ = ["MetaRLTask", "TaskIndexSampler", "RLBatch", "MetaBatch", "FORMS", "adapt_policies", "rollout_sampler"]

DTYPES = {"float32": torch.float32, "float64": torch.float64}
#: the two bilevel forms of meta-RL (see the module docstring)
FORMS = ("maml", "proximal")


@functools.lru_cache(maxsize=8)
def rollout_sampler(env: str, horizon: int | None, hidden: tuple[int, ...], workers: int = 0,
                    normalize_actions: bool = True):
    """One rollout sampler per process and setting (vector environments are not picklable, so every
    process — a Ray agent included — builds its own). ``workers > 0``: Ray rollout actors."""
    from bilevel_ray.rl.rollouts import RolloutSampler

    if workers:
        from bilevel_ray.rl.ray_rollouts import RayRolloutSampler

        return RayRolloutSampler(env, workers=workers, horizon=horizon, hidden=hidden, normalize_actions=normalize_actions)
    return RolloutSampler(env, horizon=horizon, hidden=hidden, normalize_actions=normalize_actions)


@dataclass(frozen=True)
class TaskIndexSampler:
    """Minibatches of ``meta_batch`` distinct task indices among ``indices`` (an infinite stream)."""

    indices: tuple[int, ...]
    meta_batch: int

    num_batches = None

    def sample(self, rng: np.random.Generator) -> tuple[int, np.ndarray]:
        """``(-1, sorted indices)``: ``meta_batch`` of ``indices`` drawn without replacement."""
        k = min(self.meta_batch, len(self.indices))
        return -1, np.sort(rng.choice(np.asarray(self.indices), size=k, replace=False))

    def full(self) -> np.ndarray:
        """All of ``indices``."""
        return np.asarray(self.indices)


class RLBatch(NamedTuple):
    """Proximal form: episodes of some training tasks, each sampled by that task's current lower-level
    policy, and the tasks they were drawn among (``among``: the agent's share)."""

    indices: tuple[int, ...]
    episodes: tuple[Any, ...]      # Episodes per task
    advantages: tuple[Tensor, ...]
    among: tuple[int, ...]


class MetaBatch(NamedTuple):
    """MAML form: one meta-batch — per task, episodes of the meta-policy ``x`` (``pre``), the policy that
    sampled ``post`` (``post_policies``: the adapted ``x + α∇Ŝ(x)``, or the row ``y_k``) and its
    episodes (``post``), with their advantages."""

    indices: tuple[int, ...]
    pre: tuple[Any, ...]
    pre_advantages: tuple[Tensor, ...]
    post_policies: tuple[dict[str, Tensor], ...]
    post: tuple[Any, ...]
    post_advantages: tuple[Tensor, ...]


def _row(y: PyTree, k: int) -> dict[str, Tensor]:
    return {name: t[k] for name, t in y.items()}


@dataclass(frozen=True)
class _Rollouts:
    """Proximal form's bound sampler: draws task indices, then runs their episodes under the bound ``y``."""

    task: "MetaRLTask"
    index: TaskIndexSampler
    y: PyTree

    num_batches = None

    def sample(self, rng: np.random.Generator) -> tuple[int, RLBatch]:
        _, idx = self.index.sample(rng)
        return -1, self.task.rollouts(self.y, idx, seed=int(rng.integers(2**62)), among=self.index.indices)

    def full(self) -> RLBatch:
        return self.task.rollouts(self.y, self.index.full(), seed=0, among=self.index.indices)


class _StepBatch:
    """MAML form's bound sampler: the step's one meta-batch, collected at ``x`` on the first ``sample``
    (task indices and episode seed from that call's generator) and returned by every later call of
    either level, so that ``f`` and ``g`` see the same tasks, as in MAML."""

    num_batches = None

    def __init__(self, task: "MetaRLTask", index: TaskIndexSampler, x: PyTree, y: PyTree):
        self.task, self.index, self.x, self.y = task, index, x, y
        self._batch: MetaBatch | None = None

    def sample(self, rng: np.random.Generator) -> tuple[int, MetaBatch]:
        if self._batch is None:
            _, idx = self.index.sample(rng)
            self._batch = self.task.collect(self.x, self.y, idx, seed=int(rng.integers(2**62)))
        return -1, self._batch

    def full(self) -> MetaBatch:
        return self.task.collect(self.x, self.y, self.index.full(), seed=0)


class _Bound:
    """The problem one algorithm step sees: the task's objectives, with rollouts at the bound iterate."""

    def __init__(self, task: "MetaRLTask", x: PyTree, y: PyTree, inner: TaskIndexSampler, outer: TaskIndexSampler):
        self.meta_rl, self.task_indices = task, inner
        if task.form == "maml":
            self.inner = self.outer = _StepBatch(task, inner, x, y)
        else:
            self.inner, self.outer = _Rollouts(task, inner, y), _Rollouts(task, outer, y)
        self.f, self.g, self.init, self.divergence = task.f, task.g, task.init, task.divergence


def _policy_gradients(surrogates: Callable[[dict[str, Tensor]], Tensor], x: dict[str, Tensor],
                      n: int) -> list[dict[str, Tensor]]:
    """``[∇S_k(x)]_k`` for ``surrogates(p) = Σ_k S_k(p_k)`` over ``n`` copies ``p_k`` of ``x``: every
    task's gradient from one reverse pass, differentiable in ``x`` when ``x`` carries a graph (or a
    ``torch.func`` transform), a constant otherwise."""
    peek = getattr(torch._C._functorch, "peek_interpreter_stack", None)
    if peek is not None and peek() is not None:  # inside torch.func: gradients as a transform
        copies = {k: v.unsqueeze(0).expand(n, *v.shape) for k, v in x.items()}
        stacked = torch.func.grad(surrogates)(copies)
        return [{k: v[i] for k, v in stacked.items()} for i in range(n)]
    graph = any(v.requires_grad for v in x.values())
    with torch.enable_grad():
        base = x if graph else {k: v.detach().requires_grad_(True) for k, v in x.items()}
        copies = {k: v.unsqueeze(0).expand(n, *v.shape) for k, v in base.items()}
        names = list(copies)
        grads = torch.autograd.grad(surrogates(copies), [copies[k] for k in names], create_graph=graph)
    return [{k: g[i] for k, g in zip(names, grads)} for i in range(n)]


@register_task("meta_rl")
@dataclass(frozen=True)
class MetaRLTask(Task):
    """Meta-RL on a meta-environment, MAML or proximal form (see the module docstring)."""

    label_column: ClassVar[None] = None

    env: str = hp("BilevelRay/Navigation2D-v0", doc="gymnasium id of a meta-environment")
    form: str = hp("maml", choices=FORMS, doc="lower level: maml (y* = one policy-gradient step of size adapt_lr "
                                              "from x, the adaptation that is evaluated) or proximal (iMAML-style)")
    post_episodes: str = hp("adapted", choices=("adapted", "lower"),
                            doc="maml form: f's episodes come from the adapted policies x + α∇Ŝ(x) (methods that "
                                "solve y first, DSBO) or from the current rows y_k (single-loop methods, SOBA)")
    estimator: str = hp("lvc", choices=("lvc", "dice"),
                        doc="second-order surrogate: lvc (ProMP's low-variance curvature) or dice (unbiased)")
    horizon: int | None = hp(None, low=0, doc="episode length (default: the environment's time limit)")
    normalize_actions: bool = hp(True, doc="Gaussian policies act in units of the action box (center + half-width "
                                           "× action, as rllab's normalize in MAML's code): std 1 spans the box")
    train_tasks: int = hp(40, low=1, strict=False, doc="fixed training tasks (the rows of y)")
    meta_batch: int = hp(10, low=1, strict=False, doc="tasks per minibatch")
    episodes: int = hp(10, low=1, strict=False, doc="episodes per task in a minibatch")
    width: int = hp(100, low=1, strict=False, doc="hidden units per layer of the policy")
    depth: int = hp(2, low=0, strict=False, doc="hidden layers of the policy")
    adapt_lr: float = hp(0.1, low=0, doc="α, the policy-gradient adaptation step (maml form, metrics and eval)")
    reg: float = hp(10.0, low=0, doc="λ: maml form, the curvature of g (a lower step of 1/λ solves it); "
                                     "proximal form, the proximal weight (1/λ is its adaptation step)")
    gamma: float = hp(0.99, low=0, high=1, strict=False, doc="discount of the advantages")
    gae_lambda: float = hp(1.0, low=0, high=1, strict=False, doc="GAE λ (1: returns minus the linear baseline)")
    adapt_steps: int = hp(1, low=1, strict=False, doc="adaptation steps of the metrics (held-out tasks)")
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
        tasks = rollout_sampler(self.env, self.horizon or None, self.hidden, 0, self.normalize_actions).sample_tasks
        object.__setattr__(self, "train", tuple(tasks(self.train_tasks, seed=2 * self.seed)))
        object.__setattr__(self, "held_out", tuple(tasks(self.eval_tasks, seed=2 * self.seed + 1)))
        every = TaskIndexSampler(tuple(range(self.train_tasks)), self.meta_batch)
        object.__setattr__(self, "inner", every)
        object.__setattr__(self, "outer", every)
        #: seconds this process spent in each phase of the data (rollouts, advantages), for profiles
        object.__setattr__(self, "timings", Counter())
        #: environment steps sampled for training (``env_steps``; Ray agents' add up in the driver's task)
        object.__setattr__(self, "counts", Counter())

    # -- rollouts --------------------------------------------------------------------------------------
    @property
    def hidden(self) -> tuple[int, ...]:
        """Hidden-layer widths of the policy: ``depth`` layers of ``width``."""
        return (self.width,) * self.depth

    @property
    def sampler(self):
        """This process's rollout sampler (Ray rollout actors when ``rollout_workers > 0``)."""
        return rollout_sampler(self.env, self.horizon or None, self.hidden, self.rollout_workers, self.normalize_actions)

    @property
    def training_sampler(self) -> "_TrainingSampler":
        """The sampler of training rollouts: :attr:`sampler`, timed and counted in :attr:`timings` and
        :attr:`counts` (what algorithms that collect their own episodes, such as MAML-TRPO, sample through)."""
        return _TrainingSampler(self)

    @property
    def policy(self):
        """The policy network (functional: parameters are passed to its methods)."""
        return self.sampler.policy

    @property
    def adaptation_lr(self) -> float:
        """The policy-gradient step that adapts a meta-policy: ``adapt_lr`` (maml form), ``1/reg`` (proximal)."""
        return self.adapt_lr if self.form == "maml" else 1.0 / self.reg

    def _sample(self, params: Any, tasks: list[dict], seed: Any, episodes: int | None = None) -> Any:
        start = time.perf_counter()
        eps = self.sampler.sample(params, tasks, episodes or self.episodes, seed=seed)
        self.timings["rollouts"] += time.perf_counter() - start
        self.counts["env_steps"] += eps.steps
        return eps

    def _split(self, eps: Any, tasks: int) -> tuple[tuple[Any, ...], tuple[Tensor, ...]]:
        """A task-major request's episodes and advantages per task (one baseline per task, fitted together)."""
        from bilevel_ray.rl.estimators import per_task_advantages

        start = time.perf_counter()
        episodes, adv = per_task_advantages(eps, tasks, gamma=self.gamma, lam=self.gae_lambda)
        self.timings["advantages"] += time.perf_counter() - start
        return tuple(episodes), tuple(adv)

    def rollouts(self, y: PyTree, indices: Sequence[int], *, seed: int, among: Sequence[int] | None = None) -> RLBatch:
        """``episodes`` episodes of each training task in ``indices`` (drawn among ``among``, default all)
        under its row of ``y``."""
        indices = [int(k) for k in indices]
        eps = self._sample([_row(y, k) for k in indices], [self.train[k] for k in indices], seed)
        among = tuple(range(self.train_tasks)) if among is None else tuple(int(k) for k in among)
        return RLBatch(tuple(indices), *self._split(eps, len(indices)), among)

    def collect(self, x: PyTree, y: PyTree, indices: Sequence[int], *, seed: int) -> MetaBatch:
        """MAML form's meta-batch on training tasks ``indices``: episodes of ``x`` (seed ``(seed, 0)``),
        then episodes (seed ``(seed, 1)``) of the adapted policies ``x + α∇Ŝ_k(x)`` or, with
        ``post_episodes: lower``, of the rows ``y_k``."""
        indices = tuple(int(k) for k in indices)
        tasks = [self.train[k] for k in indices]
        x = {k: v.detach() for k, v in x.items()}
        pre, pre_adv = self._split(self._sample(x, tasks, (seed, 0)), len(indices))
        if self.post_episodes == "adapted":
            steps = self._adaptation_steps(x, pre, pre_adv)
            policies = tuple({k: x[k] + self.adapt_lr * d[k].detach() for k in x} for d in steps)
        else:
            policies = tuple({n: t.detach() for n, t in _row(y, k).items()} for k in indices)
        post, post_adv = self._split(self._sample(list(policies), tasks, (seed, 1)), len(indices))
        return MetaBatch(indices, pre, pre_adv, policies, post, post_adv)

    # -- the bilevel problem ---------------------------------------------------------------------------
    def at(self, x: PyTree, y: PyTree, *, step: int, rank: int, inner: TaskIndexSampler | None = None,
           outer: TaskIndexSampler | None = None) -> _Bound:
        """The problem a step at ``(x, y)`` sees (on the agent's task shares ``inner``/``outer``)."""
        return _Bound(self, x, y, inner or self.inner, outer or self.outer)

    def _surrogate(self, params: dict[str, Tensor], eps: Any, adv: Tensor) -> Tensor:
        """``Ŝ(params)``: the per-step return's surrogate on ``eps``, importance-weighted by their sampler."""
        from bilevel_ray.rl.estimators import surrogate

        logp = self.policy.log_prob(params, eps.obs, eps.actions)
        return surrogate(self.estimator, logp, adv, eps.mask, eps.log_probs, self.max_log_ratio) / eps.mask.shape[0]

    def _adaptation_steps(self, x: dict[str, Tensor], episodes: Sequence[Any],
                          advantages: Sequence[Tensor]) -> list[dict[str, Tensor]]:
        """``∇Ŝ_k(x)`` for each task's episodes of ``x`` (differentiable in ``x`` when it has a graph)."""
        def total(copies: dict[str, Tensor]) -> Tensor:
            return sum(self._surrogate({k: v[i] for k, v in copies.items()}, e, a)
                       for i, (e, a) in enumerate(zip(episodes, advantages)))

        return _policy_gradients(total, x, len(episodes))

    def _check(self, batch: Any, kind: type) -> None:
        if not isinstance(batch, kind):
            raise TypeError(f"meta_rl: the {self.form} form's objectives need a {kind.__name__} of rollouts; step "
                            f"on bilevel_ray.problem.bind(task, state), as the backends do")

    def g(self, x: PyTree, y: PyTree, batch: RLBatch | MetaBatch) -> Tensor:
        """Lower objective of the task's form on ``batch`` (see the module docstring)."""
        if self.form == "maml":
            self._check(batch, MetaBatch)
            steps = self._adaptation_steps(x, batch.pre, batch.pre_advantages)
            total = sum(((y[n][k] - x[n] - self.adapt_lr * d[n]) ** 2).sum()
                        for k, d in zip(batch.indices, steps) for n in x)
            return 0.5 * self.reg * total
        self._check(batch, RLBatch)
        returns = torch.stack([self._surrogate(_row(y, k), e, a) for k, e, a in
                               zip(batch.indices, batch.episodes, batch.advantages)]).sum()
        returns = returns * (len(batch.among) / len(batch.indices))
        rows = None if len(batch.among) == self.train_tasks else torch.tensor(batch.among)
        prox = sum((((y[n] if rows is None else y[n][rows]) - x[n]) ** 2).sum() for n in x)
        return -returns + 0.5 * self.reg * prox

    def f(self, x: PyTree, y: PyTree, batch: RLBatch | MetaBatch) -> Tensor:
        """Upper objective on ``batch``: minus the mean surrogate return of the rows ``y_k`` (see the module docstring)."""
        if self.form == "maml":
            self._check(batch, MetaBatch)
            parts = zip(batch.indices, batch.post, batch.post_advantages)
        else:
            self._check(batch, RLBatch)
            parts = zip(batch.indices, batch.episodes, batch.advantages)
        return -torch.stack([self._surrogate(_row(y, k), e, a) for k, e, a in parts]).mean()

    def divergence(self, x_old: PyTree, x_new: PyTree, batch: RLBatch | MetaBatch) -> Tensor:
        """Mean ``KL(π_{x_old}(·|s) ‖ π_{x_new}(·|s))`` over the states of ``batch`` (the meta-policy's
        episodes in the maml form, the lower-level policies' in the proximal form)."""
        episodes = batch.pre if isinstance(batch, MetaBatch) else batch.episodes
        total, count = 0.0, 0.0
        for eps in episodes:
            kl = self.policy.kl(x_old, x_new, eps.obs)
            total = total + (kl * eps.mask).sum()
            count = count + eps.mask.sum()
        return total / count

    def init(self, *, seed: int = 0) -> tuple[PyTree, PyTree]:
        """A fresh meta-policy ``x``, and ``y`` its copy for each training task."""
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
                          self.adaptation_lr, self.adapt_steps, self.gamma, self.gae_lambda, self.normalize_actions)

    def metrics(self, x: PyTree, y: PyTree) -> dict[str, float]:
        """On the fixed held-out tasks: mean return of ``x`` before (``pre_return``) and after
        (``post_return``) ``adapt_steps`` policy-gradient steps of size :attr:`adaptation_lr`;
        ``outer_objective = -post_return / H``; ``lower_return``: the lower-level policies on their
        first ``eval_tasks`` training tasks."""
        rows = range(min(self.eval_tasks, self.train_tasks))  # the sampler directly: returns only, untimed
        lower = self.sampler.sample([_row(y, k) for k in rows], [self.train[k] for k in rows], self.episodes,
                                    seed=self.seed + 11)
        returns, _ = adapt_policies(self.sampler, x, self.held_out, steps=self.adapt_steps, lr=self.adaptation_lr,
                                    episodes=self.eval_episodes, gamma=self.gamma, lam=self.gae_lambda,
                                    seed=(self.seed, 7))
        horizon = self.sampler.horizon
        post = float(returns[-1].mean())
        return {"outer_objective": -post / horizon, "pre_return": float(returns[0].mean()), "post_return": post,
                "lower_return": float(lower.returns.mean())}


@dataclass(frozen=True)
class _TrainingSampler:
    """``sample`` of a task's rollout sampler, timed and counted by the task (see ``training_sampler``)."""

    task: MetaRLTask

    def sample(self, params: Any, tasks: Sequence[dict], episodes_per_task: int, *, seed: Any) -> Any:
        return self.task._sample(params, list(tasks), seed, episodes_per_task)


def adapt_policies(sampler: Any, x: PyTree, tasks: Sequence[dict], *, steps: int, lr: float, episodes: int,
                   gamma: float, lam: float, seed: int | tuple[int, ...]) -> tuple[Tensor, list[dict[str, Tensor]]]:
    """Adapt ``x`` to each of ``tasks`` by ``steps`` policy-gradient (VPG) steps of size ``lr`` on the
    per-step return, fresh episodes each step: MAML's test-time adaptation, used for both forms (the
    proximal form's own step from ``x``, of size ``1/λ``, is the first of these). Returns the per-task
    mean returns before each step and after the last, ``(steps + 1, n)``, and the adapted policies."""
    from bilevel_ray.rl.estimators import per_task_advantages
    from bilevel_ray.rl.maml import Adaptation, adapt

    vpg = Adaptation(lr=lr, steps=1, gamma=gamma, lam=lam)
    phis = [dict(x) for _ in tasks]
    out = []
    for s in range(steps + 1):
        eps = sampler.sample(phis, list(tasks), episodes, seed=(*np.atleast_1d(seed).tolist(), s))
        out.append(torch.stack([eps.of_task(k).returns.mean() for k in range(len(tasks))]))
        if s == steps:
            break
        per_task, adv = per_task_advantages(eps, len(tasks), gamma=gamma, lam=lam)
        phis = [adapt(sampler.policy, phi, e, a, vpg) for phi, e, a in zip(phis, per_task, adv)]
    return torch.stack(out), phis

"""Local data of each agent, and the stacked view of all agents used by the vectorized simulation.

An agent sees the task's objectives on its own shard of the inner and outer data: an i.i.d. split, or
a label-skewed one where each class is divided among agents with proportions drawn from
``Dirichlet(α)`` (Hsu, Qi, Brown 2019; small α, few classes per agent). :class:`StackedProblem` sums
the agents' objectives over variables stacked on a leading agent axis: the objectives being separable,
every gradient, HVP and cross product of the sum is the stack of the agents' own, so one reverse pass
serves all agents and the same algorithm step runs unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils._pytree import tree_map

from bilevel_ray.problem import AgentRNGs, Batch, FiniteSampler, capability
from bilevel_ray.tree import PyTree

__all__ = ["split_indices", "AgentProblem", "make_agents", "StackedSampler", "StackedProblem", "stack", "unstack"]

SPLITS = ("iid", "dirichlet")


def split_indices(n: int, n_agents: int, *, split: str = "iid", labels: np.ndarray | None = None,
                  alpha: float = 0.5, seed: int = 0, min_size: int = 1) -> list[np.ndarray]:
    """Disjoint index sets covering ``range(n)``, one per agent, each of at least ``min_size``."""
    if split not in SPLITS:
        raise ValueError(f"decentralized.split: must be one of {', '.join(SPLITS)}, got {split!r}")
    if n < n_agents * min_size:
        raise ValueError(f"decentralized.agents: {n_agents} agents need at least {n_agents * min_size} "
                         f"samples, the data has {n}")
    if split == "iid":
        perm = np.random.default_rng([seed, 0]).permutation(n)
        return [np.sort(part) for part in np.array_split(perm, n_agents)]
    if labels is None:
        raise ValueError("decentralized.split: 'dirichlet' needs a task with class labels; use 'iid'")
    if not alpha > 0:
        raise ValueError(f"decentralized.alpha: must be > 0, got {alpha!r}")
    for attempt in range(100):
        rng = np.random.default_rng([seed, 1, attempt])
        parts: list[list[int]] = [[] for _ in range(n_agents)]
        for c in np.unique(labels):
            members = rng.permutation(np.flatnonzero(labels == c))
            cuts = (np.cumsum(rng.dirichlet(np.full(n_agents, alpha)))[:-1] * len(members)).astype(int)
            for agent, chunk in enumerate(np.split(members, cuts)):
                parts[agent].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.array(p, dtype=np.int64)) for p in parts]
    raise ValueError(f"decentralized.alpha: no Dirichlet({alpha}) split gives every agent {min_size} "
                     f"samples; raise alpha or lower the number of agents")


@dataclass(frozen=True)
class AgentProblem:
    """The task's objectives on one agent's shards (``inner``, ``outer``)."""

    task: Any
    inner: FiniteSampler
    outer: FiniteSampler

    def f(self, x: PyTree, y: PyTree, batch: Batch) -> torch.Tensor:
        """The task's upper objective on ``batch``."""
        return self.task.f(x, y, batch)

    def g(self, x: PyTree, y: PyTree, batch: Batch) -> torch.Tensor:
        """The task's lower objective on ``batch``."""
        return self.task.g(x, y, batch)

    def init(self, *, seed: int = 0):
        """The task's initial ``(x, y)``."""
        return self.task.init(seed=seed)

    def __getattr__(self, name: str) -> Any:
        if name == "at" and capability(self.task, "at") is not None:  # on-policy tasks, on this agent's shares
            return lambda x, y, *, step, rank: self.task.at(x, y, step=step, rank=rank, inner=self.inner, outer=self.outer)
        if name in ("divergence", "timings", "counts") and capability(self.task, name) is not None:
            return getattr(self.task, name)  # the trust region's distance; what the task measures
        raise AttributeError(name)


def _shard(sampler: FiniteSampler, n_agents: int, split: str, label_column: int | None, alpha: float,
           seed: int) -> list[FiniteSampler]:
    labels = None if label_column is None else sampler.data[label_column].numpy()
    # skewed shards may be smaller than a minibatch: their batch is then the whole shard
    parts = split_indices(sampler.size, n_agents, split=split, labels=labels if split == "dirichlet" else None,
                          alpha=alpha, seed=seed, min_size=max(1, min(4, sampler.size // (2 * n_agents))))
    return [FiniteSampler(tuple(t[torch.from_numpy(p)] for t in sampler.data), sampler.batch_size,
                          shuffle_seed=None, order=sampler.order) for p in parts]


def make_agents(task: Any, n_agents: int, *, split: str = "iid", alpha: float = 0.5, seed: int = 0
                ) -> list[AgentProblem]:
    """One :class:`AgentProblem` per agent; inner and outer data are split the same way. A task with a
    ``shard(n_agents, *, split, alpha, seed) -> [(inner, outer), ...]`` method splits itself."""
    if not (isinstance(n_agents, int) and n_agents >= 1):
        raise ValueError(f"decentralized.agents: must be an integer >= 1, got {n_agents!r}")
    col = getattr(task, "label_column", None)
    if n_agents == 1:
        return [AgentProblem(task, task.inner, task.outer)]
    if hasattr(task, "shard"):  # the task's own split (e.g. disjoint alphabets per agent)
        return [AgentProblem(task, i, o) for i, o in task.shard(n_agents, split=split, alpha=alpha, seed=seed)]
    inner = _shard(task.inner, n_agents, split, col, alpha, seed)
    outer = _shard(task.outer, n_agents, split, col, alpha, seed + 1)
    return [AgentProblem(task, i, o) for i, o in zip(inner, outer)]


def stack(trees: Sequence[PyTree]) -> PyTree:
    """Stack per-agent pytrees on a new leading axis."""
    return tree_map(lambda *leaves: torch.stack(leaves), *trees)


def unstack(tree: PyTree, n: int) -> list[PyTree]:
    """The ``n`` per-agent pytrees of a stacked one (the inverse of :func:`stack`)."""
    return [tree_map(lambda t: t[i], tree) for i in range(n)]


@dataclass(frozen=True)
class StackedSampler:
    """Draws one minibatch per agent, each from the agent's own generator (same draws as on Ray)."""

    samplers: tuple[FiniteSampler, ...]

    num_batches = None  # not one count: each agent has its own (``counts``)

    @property
    def counts(self) -> tuple[int, ...]:
        """Each agent's number of minibatches (shards may differ in size)."""
        return tuple(s.num_batches for s in self.samplers)

    def batch(self, index: int) -> tuple[Batch, ...]:
        """Every agent's minibatch ``index`` (its last one where it has fewer: a never-sampled filler)."""
        return tuple(s.batch(min(index, s.num_batches - 1)) for s in self.samplers)

    def sample(self, rng: AgentRNGs) -> tuple[tuple[int, ...], tuple[Batch, ...]]:
        """Every agent's ``(index, batch)``, each drawn with its own generator in ``rng``."""
        if not isinstance(rng, AgentRNGs) or len(rng.generators) != len(self.samplers):
            raise TypeError("StackedSampler.sample: needs one generator per agent (a state with stacked ranks)")
        draws = [s.sample(g) for s, g in zip(self.samplers, rng.generators)]
        return tuple(k for k, _ in draws), tuple(b for _, b in draws)

    def full(self) -> tuple[Batch, ...]:
        """Every agent's whole shard as one batch."""
        return tuple(s.full() for s in self.samplers)


class StackedProblem:
    """All agents at once: ``f(X, Y, batches) = Σ_i f_i(X[i], Y[i], batches[i])`` on stacked pytrees.
    ``stacked`` tells algorithms to reduce per agent (``tree.vdot(..., batch=1)`` and friends)."""

    stacked = True

    def __init__(self, agents: Sequence[AgentProblem]):
        self.agents = tuple(agents)
        self.inner = StackedSampler(tuple(a.inner for a in agents))
        self.outer = StackedSampler(tuple(a.outer for a in agents))

    def _sum(self, name: str, x: PyTree, y: PyTree, batches: tuple[Batch, ...]) -> torch.Tensor:
        total = 0
        for i, (agent, batch) in enumerate(zip(self.agents, batches)):
            total = total + getattr(agent, name)(tree_map(lambda t: t[i], x), tree_map(lambda t: t[i], y), batch)
        return total

    def f(self, x: PyTree, y: PyTree, batches: tuple[Batch, ...]) -> torch.Tensor:
        """``Σ_i f_i(X[i], Y[i], batches[i])``."""
        return self._sum("f", x, y, batches)

    def g(self, x: PyTree, y: PyTree, batches: tuple[Batch, ...]) -> torch.Tensor:
        """``Σ_i g_i(X[i], Y[i], batches[i])``."""
        return self._sum("g", x, y, batches)

    def __getattr__(self, name: str) -> Any:
        if name == "at" and capability(self.agents[0], "at") is not None:  # on-policy: bind every agent
            return self._at
        if name == "divergence" and capability(self.agents[0], "divergence") is not None:  # one per agent
            return self._divergence
        raise AttributeError(name)

    def _divergence(self, x_old: PyTree, x_new: PyTree, batches: tuple[Batch, ...]) -> torch.Tensor:
        return torch.stack([a.divergence(tree_map(lambda t: t[i], x_old), tree_map(lambda t: t[i], x_new), b)
                            for i, (a, b) in enumerate(zip(self.agents, batches))])

    def _at(self, x: PyTree, y: PyTree, *, step: int, rank: tuple[int, ...]) -> "StackedProblem":
        return StackedProblem([a.at(tree_map(lambda t: t[i], x), tree_map(lambda t: t[i], y), step=step, rank=r)
                               for i, (a, r) in enumerate(zip(self.agents, rank))])

    def init(self, *, seed: int = 0):
        """The first agent's initial ``(x, y)``, stacked once per agent."""
        x, y = self.agents[0].init(seed=seed)
        n = len(self.agents)
        return stack([x] * n), stack([y] * n)

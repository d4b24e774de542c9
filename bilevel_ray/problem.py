"""The bilevel problem API.

``min_x h(x) = f(x, y*(x))`` with ``y*(x) = argmin_y g(x, y)``. A problem gives the two objectives as
pure functions of pytrees of tensors and a minibatch, plus one :class:`Sampler` for each level. Finite
datasets are split once into a fixed list of minibatches, so that variance-reduced methods (SABA) can
keep one memory slot per minibatch index.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, runtime_checkable

import numpy as np
import torch

from bilevel_ray.tree import PyTree

Batch = Any
#: minibatch orders of :class:`FiniteSampler`
ORDERS = ("random", "epochs")

__all__ = ["Batch", "BilevelProblem", "Sampler", "FiniteSampler", "AgentRNGs", "StepRNG", "ORDERS", "rng_for",
           "check_problem", "bind", "bind_at", "OPTIONAL", "capability"]


class AgentRNGs(NamedTuple):
    """One generator per agent, for a state that stacks several agents (the vectorized simulation)."""

    generators: tuple[np.random.Generator, ...]


#: mixed into the seeds of epoch permutations, so that they never coincide with a step's own generator
_PASS_SALT = 0x5EB0C4


class StepRNG(np.random.Generator):
    """The generator of one agent's step: numpy's PCG64 seeded with ``(seed, rank, step, stream)`` (the
    same draws as ``np.random.default_rng([seed, rank, step, stream])``), plus :meth:`epoch_index` for
    samplers that walk their minibatches in shuffled passes."""

    def __init__(self, seed: int, rank: int, step: int, stream: int = 0):
        super().__init__(np.random.PCG64([seed, rank, step, stream]))
        self.key = (seed, rank, step, stream)
        self._passes = 0

    def epoch_index(self, n: int) -> int:
        """The minibatch this step takes in a shuffled pass over ``n``: one permutation per ``n`` steps,
        so ``n`` consecutive steps visit every index once. The ``k``-th call within a step walks its own
        passes (SABA's inner and outer samplers, an inner loop's draws). Draws nothing from the generator."""
        seed, rank, step, stream = self.key
        slot, self._passes = self._passes, self._passes + 1
        epoch, position = divmod(step, n)
        return int(_pass_order(seed, rank, stream, slot, n, epoch)[position])


@functools.lru_cache(maxsize=64)
def _pass_order(seed: int, rank: int, stream: int, slot: int, n: int, epoch: int) -> np.ndarray:
    """The shuffled order of one pass (cached: a pass is read at ``n`` consecutive steps)."""
    order = np.random.default_rng([seed, rank, stream, slot, n, epoch, _PASS_SALT]).permutation(n)
    order.setflags(write=False)
    return order


def rng_for(seed: int, rank: int | tuple[int, ...], step: int, stream: int = 0) -> StepRNG | AgentRNGs:
    """Counter-based RNG: the same ``(seed, rank, step, stream)`` always gives the same draws, so a step
    is a pure function of its state and runs are reproducible on any backend. A tuple of ranks (stacked
    agents) gives each agent the generator it would have on its own."""
    if isinstance(rank, tuple):
        return AgentRNGs(tuple(rng_for(seed, r, step, stream) for r in rank))
    return StepRNG(int(seed), int(rank), int(step), int(stream))


@runtime_checkable
class Sampler(Protocol):
    """Minibatches of one level. ``num_batches`` is ``None`` for an infinite stream."""

    num_batches: int | None

    def sample(self, rng: np.random.Generator) -> tuple[int, Batch]:
        """Draw ``(index, batch)``; ``index`` is -1 for a stream."""

    def full(self) -> Batch:
        """The whole dataset as one batch (used for metrics and deterministic methods)."""


@dataclass(frozen=True)
class FiniteSampler:
    """A finite dataset cut once into ``num_batches`` fixed minibatches.

    ``data`` is a tuple of tensors sharing their first dimension; a batch is the tuple of row slices.
    ``batch_size=None`` means full batch. The last partial block is merged into the previous one.
    ``order``: ``random`` draws a minibatch uniformly at every call (with replacement); ``epochs`` walks
    shuffled passes over all minibatches, each once per ``num_batches`` steps (as SAGA-type methods are
    usually run), with the step's :class:`StepRNG`.
    """

    data: tuple[torch.Tensor, ...]
    batch_size: int | None = None
    shuffle_seed: int | None = 0
    order: str = "random"

    def __post_init__(self) -> None:
        if self.order not in ORDERS:
            raise ValueError(f"order: must be one of {', '.join(ORDERS)}, got {self.order!r}")
        n = self.data[0].shape[0]
        if any(t.shape[0] != n for t in self.data):
            raise ValueError("FiniteSampler.data: all tensors must share their first dimension")
        if self.batch_size is not None and not (isinstance(self.batch_size, int) and self.batch_size > 0):
            raise ValueError(f"batch_size: must be a positive integer or None, got {self.batch_size!r}")
        if self.shuffle_seed is not None:
            perm = torch.from_numpy(np.random.default_rng(self.shuffle_seed).permutation(n))
            data = tuple(t[perm] for t in self.data)
            object.__setattr__(self, "data", data)
        bs = n if self.batch_size is None else min(self.batch_size, n)
        k = max(n // bs, 1)
        bounds = [i * bs for i in range(k)] + [n]
        batches = tuple(tuple(t[a:b] for t in self.data) for a, b in zip(bounds[:-1], bounds[1:]))
        object.__setattr__(self, "_batches", batches)

    @property
    def num_batches(self) -> int:
        """Number of fixed minibatches."""
        return len(self._batches)

    @property
    def size(self) -> int:
        """Number of rows in the dataset."""
        return self.data[0].shape[0]

    def batch(self, index: int) -> Batch:
        """Minibatch number ``index``."""
        return self._batches[index]

    def sample(self, rng: np.random.Generator) -> tuple[int, Batch]:
        """``(index, minibatch)``: drawn uniformly, or the step's place in a shuffled pass (``order``)."""
        if self.num_batches == 1:
            return 0, self._batches[0]
        if self.order == "epochs":
            if not isinstance(rng, StepRNG):
                raise TypeError("order: 'epochs' needs the generator of bilevel_ray.problem.rng_for (minibatches "
                                "are ordered by step)")
            k = rng.epoch_index(self.num_batches)
        else:
            k = int(rng.integers(self.num_batches))
        return k, self._batches[k]

    def full(self) -> Batch:
        """The whole dataset as one batch."""
        return self.data

    def to(self, dtype: torch.dtype) -> "FiniteSampler":
        """A copy with floating tensors cast to ``dtype``, same rows and minibatches (no reshuffle)."""
        cast = tuple(t.to(dtype) if t.is_floating_point() else t for t in self.data)
        return FiniteSampler(cast, self.batch_size, None, self.order)


@runtime_checkable
class BilevelProblem(Protocol):
    """What every task gives the algorithms.

    Required: ``f``, ``g``, ``inner``, ``outer`` and ``init(seed=...)``. Optional, used by tests and
    metrics when present: ``y_star(x)``, ``hypergradient(x)`` (exact ``∇h``), ``value(x)`` (exact
    ``h``), ``x_star`` and ``metrics(x, y) -> dict``. Optional capabilities the algorithms and backends
    read through :func:`capability` (their defaults in :data:`OPTIONAL`): ``divergence(x_old, x_new,
    batch)``, a scalar distance between upper iterates that the algorithms' trust region (``max_kl``)
    bounds; ``stacked``, True when the problem holds several agents on a leading axis (the simulation's
    stacked problem: algorithms then reduce per agent); ``at(x, y, *, step, rank)``, an on-policy
    problem's samplers bound to an iterate (see :func:`bind`); ``timings`` and ``counts``, mappings the
    task adds to as it works (seconds per phase of its data, e.g. rollouts; quantities such as
    environment steps), which the Ray backend reports per round and sums into the driver's task.
    """

    inner: Sampler
    outer: Sampler

    def f(self, x: PyTree, y: PyTree, batch: Batch) -> torch.Tensor:
        """Upper objective on an outer minibatch."""

    def g(self, x: PyTree, y: PyTree, batch: Batch) -> torch.Tensor:
        """Lower objective on an inner minibatch."""

    def init(self, *, seed: int) -> tuple[PyTree, PyTree]:
        """Initial ``(x, y)``."""


#: optional capabilities of a problem and the value a problem without them has (see BilevelProblem)
OPTIONAL: dict[str, Any] = {"divergence": None, "stacked": False, "at": None, "timings": None, "counts": None}


def capability(problem: Any, name: str) -> Any:
    """The optional capability ``name`` of ``problem`` (one of :data:`OPTIONAL`), or its default."""
    if name not in OPTIONAL:
        raise KeyError(f"capability: {name!r} is not one of {', '.join(OPTIONAL)}")
    return getattr(problem, name, OPTIONAL[name])


def bind(problem: Any, state: Any) -> Any:
    """The problem an algorithm step on ``state`` sees. On-policy problems (meta-RL: the data are rollouts
    of the current lower-level policies) define ``at(x, y, *, step, rank)`` returning a problem whose
    samplers draw with that iterate; every other problem is returned as is. Backends bind before each
    step; call it yourself when stepping an algorithm by hand. Only an on-policy problem reads the
    state's ``x``, ``y``, ``t`` and ``rank``."""
    if capability(problem, "at") is None:
        return problem
    return bind_at(problem, state.x, state.y, step=state.t, rank=state.rank)


def bind_at(problem: Any, x: Any, y: Any, *, step: int = 0, rank: int | tuple[int, ...] = 0) -> Any:
    """:func:`bind` at an iterate rather than a state (``algorithm.init`` sees ``bind_at(problem, x, y)``)."""
    at = capability(problem, "at")
    return problem if at is None else at(x, y, step=step, rank=rank)


def check_problem(problem: Any, *, seed: int = 0) -> None:
    """Check a user problem against the protocol; raise ``TypeError`` naming the first defect."""
    for name in ("f", "g", "init"):
        if not callable(getattr(problem, name, None)):
            raise TypeError(f"problem.{name}: must be a method, see bilevel_ray.BilevelProblem")
    for name in ("inner", "outer"):
        s = getattr(problem, name, None)
        if not isinstance(s, Sampler):
            raise TypeError(f"problem.{name}: must be a Sampler (num_batches, sample(rng), full())")
    for name in ("divergence", "at"):
        if not (capability(problem, name) is None or callable(capability(problem, name))):
            raise TypeError(f"problem.{name}: must be a method or absent, see bilevel_ray.BilevelProblem")
    if not isinstance(capability(problem, "stacked"), bool):
        raise TypeError("problem.stacked: must be a bool or absent (True only for several agents stacked on a "
                        "leading axis)")
    x, y = problem.init(seed=seed)
    problem = bind_at(problem, x, y)
    rng = np.random.default_rng(seed)
    for name, sampler in (("f", problem.outer), ("g", problem.inner)):
        _, batch = sampler.sample(rng)
        val = getattr(problem, name)(x, y, batch)
        if not (isinstance(val, torch.Tensor) and val.ndim == 0):
            raise TypeError(f"problem.{name}: must return a scalar tensor, got {type(val).__name__}")
        if not torch.isfinite(val):
            raise ValueError(f"problem.{name}: is not finite at the initial point")

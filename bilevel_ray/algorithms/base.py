"""Shared protocol, hyperparameter validation, oracle-call accounting, step sizes and the registry.

An algorithm is a frozen dataclass of hyperparameters (validated at construction) with two pure
methods, in the style of optax/TorchOpt: ``init(problem, x, y, *, seed, rank) -> state`` and
``step(state, problem, mix) -> state``. States are NamedTuples of tensors and ints: they pickle, and
their tensors are detached from any graph. ``mix`` is the gossip operator: the identity for a single
agent; the decentralized backends pass ``Σ_j w_ij (·)_j``. A step never imports Ray.
"""

from __future__ import annotations

import math
from typing import Any, Callable, ClassVar, NamedTuple, Protocol, runtime_checkable

from bilevel_ray.params import Params, Registry, hp
from bilevel_ray.problem import BilevelProblem
from bilevel_ray.tree import PyTree

Mix = Callable[[PyTree], PyTree]
State = Any

__all__ = ["Mix", "identity_mix", "Calls", "Hyperparams", "hp", "BilevelAlgorithm", "register", "get",
           "make", "available", "decay", "cosine_decay"]


class Hyperparams(Params):
    """Base of every algorithm's hyperparameters (validated at construction)."""

    section: ClassVar[str] = "algorithm"



def identity_mix(tree: PyTree) -> PyTree:
    """The gossip operator of a single agent."""
    return tree


class Calls(NamedTuple):
    """Cumulative oracle calls, each on one minibatch (a full batch counts as one)."""

    grad_f: int = 0
    grad_g: int = 0
    hvp: int = 0
    jvp: int = 0

    def add(self, grad_f: int = 0, grad_g: int = 0, hvp: int = 0, jvp: int = 0) -> "Calls":
        """These counts plus the given ones."""
        return Calls(self.grad_f + grad_f, self.grad_g + grad_g, self.hvp + hvp, self.jvp + jvp)

    @property
    def total(self) -> int:
        """All oracle calls, of every kind."""
        return sum(self)


@runtime_checkable
class BilevelAlgorithm(Protocol):
    """A bilevel algorithm: hyperparameters with pure ``init`` and ``step`` (see the module docstring)."""

    name: ClassVar[str]

    def init(self, problem: BilevelProblem, x: PyTree, y: PyTree, *, seed: int = 0, rank: int = 0) -> State:
        """Initial state; ``(seed, rank)`` fixes every minibatch the run will draw."""

    def step(self, state: State, problem: BilevelProblem, mix: Mix = identity_mix) -> State:
        """One outer iteration. Pure: the old state is not modified (SABA's tables are the exception,
        see its docstring)."""


def decay(lr0: float, t: int, power: float) -> float:
    """``lr0 / (t + 1)^power``."""
    return lr0 / (t + 1) ** power


def cosine_decay(lr0: float, progress: float) -> float:
    """``lr0 · (1 + cos(π p)) / 2`` with ``p = progress`` clipped to [0, 1]: a half cosine from ``lr0``
    down to 0 (Loshchilov & Hutter 2017)."""
    return lr0 * 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))


# meta-RL's MAML-TRPO lives with the RL code (it imports gymnasium), imported on first use
REGISTRY = Registry("algorithm", "algorithm", lazy={"maml_trpo": "bilevel_ray.rl.maml:MAMLTRPO"})
register = REGISTRY.register
available = REGISTRY.available
get = REGISTRY.get


def make(name: str, **hyper: Any) -> BilevelAlgorithm:
    """Build a registered algorithm, rejecting unknown hyperparameters with a one-line error."""
    return get(name).create(**hyper)

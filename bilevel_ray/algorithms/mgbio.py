"""MGBiO: deterministic momentum bilevel method for a nonconvex-PL lower level (Huang 2023).

Full batches. ``y ← y − λ∇_y g(x, y)``; momentum ``w ← β∇̄f(x, y) + (1 − β)w`` on the surrogate
hypergradient (eigenvalue-projected Hessian, see ``_pl``); averaged outer step
``x ← x + η(x̃ − x)`` with ``x̃ = x − γw``. Claimed complexity O(ε^-2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from bilevel_ray import oracles, tree
from bilevel_ray.algorithms._pl import PLHyperparams
from bilevel_ray.params import hp
from bilevel_ray.algorithms.base import Calls, Mix, identity_mix, register
from bilevel_ray.problem import BilevelProblem
from bilevel_ray.tree import PyTree


class MGBiOState(NamedTuple):
    """State of MGBiO: ``w`` is the momentum of the surrogate hypergradient."""

    x: PyTree
    y: PyTree
    w: PyTree
    t: int
    seed: int
    rank: int
    calls: Calls


@register("mgbio")
@dataclass(frozen=True)
class MGBiO(PLHyperparams):
    """MGBiO (Huang 2023): full-batch momentum on the surrogate hypergradient, PL lower level."""

    beta: float = hp(0.5, low=0, high=1, strict=False, doc="β, momentum weight of the new estimate")

    def init(self, problem: BilevelProblem, x: PyTree, y: PyTree, *, seed: int = 0, rank: int = 0) -> MGBiOState:
        """Initial state at ``(x, y)`` with ``w = 0`` (replaced by the first estimate)."""
        x, y = tree.detach(x), tree.detach(y)
        return MGBiOState(x, y, tree.zeros_like(x), 0, seed, rank, Calls())

    def step(self, s: MGBiOState, problem: BilevelProblem, mix: Mix = identity_mix) -> MGBiOState:
        """One MGBiO step (see the module docstring)."""
        bi, bo = problem.inner.full(), problem.outer.full()
        y = tree.axpy(-self.inner_lr, oracles.grad_y(problem.g, s.x, s.y, bi), mix(s.y))
        hg, calls = self.hypergradient(problem, s.x, y, bi, bo)
        w = hg if s.t == 0 else tree.lerp(s.w, hg, self.beta)
        x = tree.axpy(-self.eta * self.outer_lr, w, mix(s.x))
        return MGBiOState(tree.detach(x), tree.detach(y), tree.detach(w), s.t + 1, s.seed, s.rank,
                          s.calls.add(grad_g=1, **calls))

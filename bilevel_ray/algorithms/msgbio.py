"""MSGBiO: stochastic momentum bilevel method for a nonconvex-PL lower level (Huang 2023).

Moves ``y`` and ``x`` along their momentum estimates with an averaged step
``η_t = η_0 (m / (m + t))^{1/2}``, then refreshes ``u ← β∇_y g_i + (1 − β)u`` and
``w ← β∇̄f(·; i, j) + (1 − β)w`` at the new point. Claimed complexity Õ(ε^-4).
"""

from __future__ import annotations

from dataclasses import dataclass

from bilevel_ray import oracles, tree
from bilevel_ray.algorithms._pl import MomentumState, PLHyperparams, averaged_move, init_momentum
from bilevel_ray.params import hp
from bilevel_ray.algorithms.base import Mix, identity_mix, register
from bilevel_ray.problem import BilevelProblem, rng_for
from bilevel_ray.tree import PyTree


@register("msgbio")
@dataclass(frozen=True)
class MSGBiO(PLHyperparams):
    """MSGBiO (Huang 2023): stochastic momentum on ``∇_y g`` and the surrogate hypergradient, PL lower level."""

    beta: float = hp(0.5, low=0, high=1, strict=False, doc="β, momentum weight of the new estimate")
    m: float = hp(10.0, low=0, doc="offset of η_t = η_0 (m/(m+t))^{1/2}")

    def init(self, problem: BilevelProblem, x: PyTree, y: PyTree, *, seed: int = 0, rank: int = 0) -> MomentumState:
        """Initial state: both estimators at ``(x, y)`` on one minibatch pair."""
        return init_momentum(self, problem, x, y, seed, rank)

    def step(self, s: MomentumState, problem: BilevelProblem, mix: Mix = identity_mix) -> MomentumState:
        """One MSGBiO step (see the module docstring)."""
        eta_t = self.eta * (self.m / (self.m + s.t)) ** 0.5
        x, y = averaged_move(s, self, eta_t, mix)
        rng = rng_for(s.seed, s.rank, s.t)
        _, bi = problem.inner.sample(rng)
        _, bo = problem.outer.sample(rng)
        u = tree.lerp(s.u, oracles.grad_y(problem.g, x, y, bi), self.beta)
        hg, calls = self.hypergradient(problem, x, y, bi, bo)
        w = tree.lerp(s.w, hg, self.beta)
        return MomentumState(x, y, tree.detach(u), tree.detach(w), s.t + 1, s.seed, s.rank,
                             s.calls.add(grad_g=1, **calls))

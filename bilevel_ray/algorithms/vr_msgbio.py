"""VR-MSGBiO: MSGBiO with STORM variance-reduced estimators (Huang 2023).

``u ← ∇_y g_ζ(x_{t+1}, y_{t+1}) + (1 − cη_t²)(u − ∇_y g_ζ(x_t, y_t))`` and likewise ``w`` on the
surrogate hypergradient, the same sample ``ζ`` at both points; ``η_t = η_0 (m / (m + t))^{1/3}``.
Claimed complexity Õ(ε^-3).
"""

from __future__ import annotations

from dataclasses import dataclass

from bilevel_ray import oracles, tree
from bilevel_ray.algorithms._pl import MomentumState, PLHyperparams, averaged_move, init_momentum
from bilevel_ray.params import hp
from bilevel_ray.algorithms.base import Mix, identity_mix, register
from bilevel_ray.problem import BilevelProblem, rng_for
from bilevel_ray.tree import PyTree


@register("vr_msgbio")
@dataclass(frozen=True)
class VRMSGBiO(PLHyperparams):
    """VR-MSGBiO (Huang 2023): MSGBiO with STORM variance-reduced estimators."""

    c: float = hp(1.0, low=0, doc="STORM weight: the correction keeps 1 − min(cη_t², 1)")
    m: float = hp(10.0, low=0, doc="offset of η_t = η_0 (m/(m+t))^{1/3}")

    def init(self, problem: BilevelProblem, x: PyTree, y: PyTree, *, seed: int = 0, rank: int = 0) -> MomentumState:
        """Initial state: both estimators at ``(x, y)`` on one minibatch pair."""
        return init_momentum(self, problem, x, y, seed, rank)

    def step(self, s: MomentumState, problem: BilevelProblem, mix: Mix = identity_mix) -> MomentumState:
        """One VR-MSGBiO step (see the module docstring)."""
        eta_t = self.eta * (self.m / (self.m + s.t)) ** (1 / 3)
        x, y = averaged_move(s, self, eta_t, mix)
        rng = rng_for(s.seed, s.rank, s.t)
        _, bi = problem.inner.sample(rng)
        _, bo = problem.outer.sample(rng)
        keep = 1.0 - min(self.c * eta_t ** 2, 1.0)
        u_old = oracles.grad_y(problem.g, s.x, s.y, bi)
        u = tree.axpy(keep, tree.sub(s.u, u_old), oracles.grad_y(problem.g, x, y, bi))
        hg_old, calls_old = self.hypergradient(problem, s.x, s.y, bi, bo)
        hg, calls = self.hypergradient(problem, x, y, bi, bo)
        w = tree.axpy(keep, tree.sub(s.w, hg_old), hg)
        total = {k: calls[k] + calls_old[k] for k in calls}
        return MomentumState(x, y, tree.detach(u), tree.detach(w), s.t + 1, s.seed, s.rank,
                             s.calls.add(grad_g=2, **total))

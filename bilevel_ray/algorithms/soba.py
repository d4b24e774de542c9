"""SOBA: single-loop stochastic bilevel optimization (Dagréou, Ablin, Vaiter, Moreau, NeurIPS 2022).

``y``, ``v`` and ``x`` each move by one step from the same old values:
``D_y = ∇_y g_i``, ``D_v = ∇²_yy g_i·v + ∇_y f_j``, ``D_x = ∇²_xy g_i·v + ∇_x f_j``.
The three first/second-order quantities of ``g`` come from one fused pass. Step sizes: the paper's
decreasing ``ρ_t = ρ0/(t+1)^a``, ``γ_t = γ0/(t+1)^b``, or (``schedule="cosine"``, a deep-learning
practice, not from the paper) a constant ``ρ`` with ``γ_t`` decayed to 0 along a half cosine over
``horizon`` steps. ``outer_opt: adam`` preconditions ``D_x`` with Adam, ``max_kl`` bounds the outer step in a trust
region (:mod:`._adaptive`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from bilevel_ray import oracles, tree
from bilevel_ray.params import hp
from bilevel_ray.algorithms._adaptive import AdaptiveOuter, Moments
from bilevel_ray.algorithms.base import Calls, Mix, decay, identity_mix, register
from bilevel_ray.problem import BilevelProblem, rng_for
from bilevel_ray.tree import PyTree

#: step-size decay exponents (inner ρ_t, outer γ_t) of each power-law schedule
POWERS = {"constant": (0.0, 0.0), "sqrt": (0.5, 0.5), "theory": (0.4, 0.6)}
#: the power laws, and "cosine": ρ constant, γ_t on a half cosine over ``horizon`` steps
SCHEDULES = (*POWERS, "cosine")


class SOBAState(NamedTuple):
    """State of SOBA: ``v`` approximates ``−[∇²_yy g]^{-1} ∇_y f``; ``moments`` the outer step rule's."""

    x: PyTree
    y: PyTree
    v: PyTree
    t: int
    seed: int
    rank: int
    calls: Calls
    moments: Moments | tuple = ()  # the outer step rule's (Adam's) state


@register("soba")
@dataclass(frozen=True)
class SOBA(AdaptiveOuter):
    """SOBA (Dagréou et al., NeurIPS 2022): single-loop joint steps on ``y``, ``v`` and ``x``."""

    inner_lr: float = hp(0.1, low=0, doc="ρ0, step of y and v")
    outer_lr: float = hp(0.01, low=0, doc="γ0, step of x")
    schedule: str = hp("sqrt", choices=SCHEDULES,
                       doc="ρ_t=ρ0/(t+1)^a, γ_t=γ0/(t+1)^b; cosine: ρ0, γ_t=γ0(1+cos(π t/horizon))/2")

    def step_sizes(self, t: int) -> tuple[float, float]:
        """``(ρ_t, γ_t)`` of step ``t``."""
        if self.schedule == "cosine":
            return self.inner_lr, self.outer_step_size(t)
        a, b = POWERS[self.schedule]
        return decay(self.inner_lr, t, a), decay(self.outer_lr, t, b)

    def init(self, problem: BilevelProblem, x: PyTree, y: PyTree, *, seed: int = 0, rank: int = 0) -> SOBAState:
        """Initial state at ``(x, y)`` with ``v = 0``; rejects ``max_kl`` on a problem without ``divergence``."""
        self.check_trust_region(problem)
        return SOBAState(tree.detach(x), tree.detach(y), tree.zeros_like(y), 0, seed, rank, Calls(),
                         self.init_moments(x))

    def step(self, s: SOBAState, problem: BilevelProblem, mix: Mix = identity_mix) -> SOBAState:
        """One SOBA step (see the module docstring)."""
        rng = rng_for(s.seed, s.rank, s.t)
        _, bi = problem.inner.sample(rng)
        _, bo = problem.outer.sample(rng)
        gy, jv, hv = oracles.fused(problem.g, s.x, s.y, s.v, bi)
        fx, fy = oracles.grad_xy(problem.f, s.x, s.y, bo)
        rho, gamma = self.step_sizes(s.t)
        y = tree.axpy(-rho, gy, mix(s.y))
        v = tree.axpy(-rho, tree.add(hv, fy), mix(s.v))
        dx, moments = self.precondition(tree.add(jv, fx), s.moments, s.t)
        x = self.outer_update(mix(s.x), dx, gamma, problem, bi)
        calls = s.calls.add(grad_f=1, grad_g=1, hvp=1, jvp=1)
        return SOBAState(x, y, v, s.t + 1, s.seed, s.rank, calls, moments)

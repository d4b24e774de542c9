"""Outer step rule shared by SOBA, BOME and DSBO: plain (the papers' rule, ``x ← mix(x) − γ d``) or
Adam (Kingma & Ba, ICLR 2015) on the outer direction ``d``, ``x ← mix(x) − γ m̂/(√v̂ + ε)``; the
outer step ``γ_t`` constant, or (``schedule: cosine``) decayed from ``outer_lr`` to 0 along a half cosine
over ``horizon`` steps (Loshchilov & Hutter 2017).

``max_kl > 0`` puts the outer step in a trust region, as TRPO and ProMP do for policies (Schulman et
al. 2015; Rothfuss et al. 2019): on problems that define ``divergence(x_old, x_new, batch)`` (meta-RL:
the mean KL between the two meta-policies on the batch's states), the step from ``mix(x)`` is halved
until that divergence is at most ``max_kl`` (per agent), and dropped if ``trust_steps`` halvings do
not get there. It works with either step rule and any schedule.

Adam and the cosine decay are deep-learning practice, not from the bilevel papers; the papers'
convergence results cover ``outer_opt: sgd`` with their own step sizes only. Adam's moments are per
agent (each agent preconditions its own direction, as in DADAM, Nazari et al. 2022) and live in the
algorithm state, so that runs resume and restart exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from bilevel_ray import tree
from bilevel_ray.algorithms.base import Hyperparams, cosine_decay
from bilevel_ray.params import hp
from bilevel_ray.problem import capability
from bilevel_ray.tree import PyTree


class Moments(NamedTuple):
    """Adam's running averages of the outer direction and of its square."""

    m: PyTree
    v: PyTree


@dataclass(frozen=True)
class AdaptiveOuter(Hyperparams):
    """Hyperparameters of the outer step rule (fields of the algorithms that use it, which each define
    ``outer_lr``)."""

    outer_opt: str = hp("sgd", choices=("sgd", "adam"),
                        doc="outer step rule: sgd (the paper's) or adam (m̂/(√v̂+ε), not from the paper)")
    beta1: float = hp(0.9, low=0, high=1, strict=False, doc="Adam's first-moment decay (outer_opt adam)")
    beta2: float = hp(0.999, low=0, high=1, doc="Adam's second-moment decay (outer_opt adam)")
    eps: float = hp(1e-8, low=0, doc="Adam's ε (outer_opt adam)")
    schedule: str = hp("constant", choices=("constant", "cosine"),
                       doc="outer step: constant, or cosine: γ_t = outer_lr·(1+cos(π t/horizon))/2 (not from the paper)")
    horizon: int = hp(0, low=0, strict=False, doc="steps of the cosine schedule (outer step 0 after them)")
    max_kl: float = hp(0.0, low=0, strict=False,
                       doc="trust region: largest divergence of an outer step (problems with divergence(); 0: off)")
    trust_steps: int = hp(10, low=1, strict=False, doc="halvings of the outer step before it is dropped (max_kl > 0)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.beta1 == 1:
            raise ValueError(f"{self.section}.beta1: must be < 1, got {self.beta1!r}")
        if self.schedule == "cosine" and self.horizon < 1:
            raise ValueError(f"{self.section}.horizon: schedule cosine needs a horizon >= 1 (steps), got {self.horizon}")

    def check_trust_region(self, problem: Any) -> None:
        """One-line error where ``max_kl`` is set on a problem without ``divergence``."""
        if self.max_kl > 0 and capability(problem, "divergence") is None:
            raise ValueError(f"{self.section}.max_kl: the trust region needs a problem with divergence(x_old, x_new, "
                             f"batch) (meta_rl has one); this task has none, set max_kl: 0")

    def outer_update(self, x: PyTree, direction: PyTree, step: float, problem: Any, batch: Any) -> PyTree:
        """``x − step·direction``, inside the trust region around ``x`` when ``max_kl > 0`` (on
        ``batch``'s states; per agent where the problem stacks agents)."""
        new = tree.axpy(-step, direction, x)
        if self.max_kl == 0:
            return new
        kl = problem.divergence(x, new, batch).detach()
        scale = torch.ones_like(kl)
        for _ in range(self.trust_steps):
            outside = kl > self.max_kl
            if not bool(outside.any()):
                return new
            scale = torch.where(outside, scale / 2, scale)
            new = tree.axpy(-step * scale, direction, x)
            kl = problem.divergence(x, new, batch).detach()
        return tree.axpy(-step * torch.where(kl > self.max_kl, torch.zeros_like(scale), scale), direction, x)

    def outer_step_size(self, t: int) -> float:
        """``γ_t``, the outer step of step ``t`` (from 0) under ``schedule``."""
        return cosine_decay(self.outer_lr, t / self.horizon) if self.schedule == "cosine" else self.outer_lr

    def init_moments(self, x: PyTree) -> Moments | tuple:
        """Zero moments shaped like ``x`` for Adam; ``()`` (nothing to keep) for SGD."""
        return Moments(tree.zeros_like(x), tree.zeros_like(x)) if self.outer_opt == "adam" else ()

    def precondition(self, d: PyTree, moments: Moments | tuple, t: int) -> tuple[PyTree, Moments | tuple]:
        """The step direction for raw direction ``d`` at outer step ``t`` (from 0), and the new moments."""
        if self.outer_opt == "sgd":
            return d, moments
        m = tree.lerp(moments.m, d, 1 - self.beta1)
        v = tree.tree_map(lambda vi, di: torch.lerp(vi, di * di, 1 - self.beta2), moments.v, d)
        c1, c2 = 1 - self.beta1 ** (t + 1), 1 - self.beta2 ** (t + 1)
        step = tree.tree_map(lambda mi, vi: (mi / c1) / ((vi / c2).sqrt() + self.eps), m, v)
        return step, Moments(m, v)

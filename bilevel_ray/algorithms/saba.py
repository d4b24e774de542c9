"""SABA: SOBA with SAGA variance reduction (Dagréou, Ablin, Vaiter, Moreau, NeurIPS 2022).

Constant steps; one memory slot per minibatch index for each of the five oracle outputs
(``∇_y g_i``, ``∇²_yy g_i·v``, ``∇²_xy g_i·v`` over inner indices, ``∇_y f_j``, ``∇_x f_j`` over outer
indices). Direction ``φ_new − M[k] + mean(M)``. The memory is filled at ``init`` with one pass over
both datasets (``memory: full``) or starts at zero (``memory: zero``, as the authors' benchmark code
does: a slot then holds a real value from its first visit on, none from the starting point).
Converges at O(1/T), linearly when ``h`` is PL.

Memory tables are large (one copy of ``y`` or ``x`` per minibatch), so ``step`` updates them in place
and they are *donated*: after ``step(s)``, ``s`` must not be stepped again (its means and iterates are
intact, its tables are not). Take ``copy.deepcopy(state)`` first to branch a run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from bilevel_ray import oracles, tree
from bilevel_ray.params import hp
from bilevel_ray.algorithms.base import Calls, Hyperparams, Mix, identity_mix, register
from bilevel_ray.device import device_of
from bilevel_ray.problem import BilevelProblem, capability, rng_for
from bilevel_ray.tree import PyTree


class SAGATable(NamedTuple):
    """``memory`` holds one pytree per index (leaves stacked on dim 0); ``mean`` is their average.
    Simulated agents (leaves ``(slots, agents, ...)``) each average over their own ``counts`` slots."""

    memory: PyTree
    mean: PyTree
    counts: torch.Tensor | None = None  # per agent, stacked tables only


def _table(slots: list[PyTree], counts: tuple[int, ...] | None = None) -> SAGATable:
    memory = tree.tree_map(lambda *ls: torch.stack(ls), *slots)
    if counts is None:
        return SAGATable(memory, tree.tree_map(lambda m: m.mean(0), memory))
    device = device_of(slots[0])
    c = torch.tensor(counts, device=device)
    live = torch.arange(len(slots), device=device).unsqueeze(1) < c  # (slots, agents): fillers past an agent's count
    mean = tree.tree_map(lambda m: (m * live.reshape(*live.shape, *[1] * (m.ndim - 2))).sum(0)
                         / c.reshape(-1, *[1] * (m.ndim - 2)).to(m.dtype), memory)
    return SAGATable(memory, mean, c)


def _zeros(like: PyTree, n: int) -> list[PyTree]:
    """``n`` zero slots shaped as ``like``."""
    return [tree.tree_map(torch.zeros_like, like)] * n


def _saga(table: SAGATable, k: int | tuple[int, ...], new: PyTree) -> tuple[PyTree, SAGATable]:
    """SAGA direction for slot ``k`` (one per agent when stacked) and the updated table (memory
    written in place)."""
    if table.counts is None:
        at, size = k, lambda m: m.shape[0]
    else:
        at = (torch.tensor(k), torch.arange(len(k)))
        size = lambda m: table.counts.reshape(-1, *[1] * (m.ndim - 2)).to(m.dtype)  # noqa: E731
    delta = tree.tree_map(lambda p, m: p - m[at], new, table.memory)
    direction = tree.add(delta, table.mean)
    mean = tree.tree_map(lambda mu, d, m: mu + d / size(m), table.mean, delta, table.memory)
    tree.tree_map(lambda m, p: m.__setitem__(at, p), table.memory, new)
    return direction, SAGATable(table.memory, mean, table.counts)


class SABAState(NamedTuple):
    """State of SABA: the iterates and the SAGA tables (donated by ``step``, see the module docstring)."""

    x: PyTree
    y: PyTree
    v: PyTree
    inner: SAGATable  # (∇_y g, ∇²_xy g·v, ∇²_yy g·v) per inner minibatch
    outer: SAGATable  # (∇_x f, ∇_y f) per outer minibatch
    t: int
    seed: int
    rank: int
    calls: Calls


@register("saba")
@dataclass(frozen=True)
class SABA(Hyperparams):
    """SABA (Dagréou et al., NeurIPS 2022): SOBA with SAGA variance reduction and constant steps."""

    inner_lr: float = hp(0.1, low=0, doc="ρ, constant step of y and v")
    outer_lr: float = hp(0.01, low=0, doc="γ, constant step of x")
    memory: str = hp("full", choices=("full", "zero"), doc="initial SAGA memory: one pass of oracle calls at the "
                                                           "starting point (full) or zeros (zero)")

    def init(self, problem: BilevelProblem, x: PyTree, y: PyTree, *, seed: int = 0, rank: int = 0) -> SABAState:
        """Initial state at ``(x, y)``, ``v = 0``, the tables filled with one pass over both
        datasets or with zeros (``memory``)."""
        # simulated agents: one table per agent, sized by the largest shard
        ci = co = None
        if capability(problem, "stacked"):
            ci, co = problem.inner.counts, problem.outer.counts
            ni, no = max(ci), max(co)
        else:
            ni, no = problem.inner.num_batches, problem.outer.num_batches
        if ni is None or no is None:
            raise ValueError("algorithm.name: saba needs finite datasets (samplers with num_batches)")
        x, y = tree.detach(x), tree.detach(y)
        v = tree.zeros_like(y)
        if self.memory == "zero":  # one call of each kind gives the shapes
            inner = _table(_zeros(oracles.fused(problem.g, x, y, v, problem.inner.batch(0)), ni), ci)
            outer = _table(_zeros(oracles.grad_xy(problem.f, x, y, problem.outer.batch(0)), no), co)
            calls = Calls().add(grad_f=1, grad_g=1, hvp=1, jvp=1)
        else:
            inner = _table([oracles.fused(problem.g, x, y, v, problem.inner.batch(k)) for k in range(ni)], ci)
            outer = _table([oracles.grad_xy(problem.f, x, y, problem.outer.batch(k)) for k in range(no)], co)
            calls = Calls().add(grad_f=no, grad_g=ni, hvp=ni, jvp=ni)  # per agent (fillers included)
        return SABAState(x, y, v, inner, outer, 0, seed, rank, calls)

    def step(self, s: SABAState, problem: BilevelProblem, mix: Mix = identity_mix) -> SABAState:
        """One SABA step; updates ``s``'s tables in place (see the module docstring)."""
        rng = rng_for(s.seed, s.rank, s.t)
        ki, bi = problem.inner.sample(rng)
        ko, bo = problem.outer.sample(rng)
        (gy, jv, hv), inner = _saga(s.inner, ki, oracles.fused(problem.g, s.x, s.y, s.v, bi))
        (fx, fy), outer = _saga(s.outer, ko, oracles.grad_xy(problem.f, s.x, s.y, bo))
        rho, gamma = self.inner_lr, self.outer_lr
        y = tree.axpy(-rho, gy, mix(s.y))
        v = tree.axpy(-rho, tree.add(hv, fy), mix(s.v))
        x = tree.axpy(-gamma, tree.add(jv, fx), mix(s.x))
        return SABAState(x, y, v, inner, outer, s.t + 1, s.seed, s.rank,
                         s.calls.add(grad_f=1, grad_g=1, hvp=1, jvp=1))

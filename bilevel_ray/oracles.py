"""First- and second-order oracles of a bilevel problem, built on ``torch.func``.

Only products are formed, never matrices (except :func:`hessian_yy`, used by MGBiO's eigenvalue
projection on small ``y``). ``Objective`` is ``(x, y, batch) -> scalar`` on pytrees.

Costs, in units of one reverse pass: :func:`grad_xy` 1, :func:`hvp` and :func:`cross` ≈2–3 each,
:func:`fused` ≈2–3 for ``∇_y g`` and *both* second-order products together. Second-order products
are reverse-over-reverse: on CPU, torch.func's forward mode costs 3–5× more per call
(``benchmarks/oracles.py`` measures both; :func:`fused_fwd` is kept for GPUs and for that comparison).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.func import grad, grad_and_value, hessian, jvp, vjp

from bilevel_ray import tree
from bilevel_ray.problem import Batch
from bilevel_ray.tree import PyTree

Objective = Callable[[PyTree, PyTree, Batch], torch.Tensor]

__all__ = ["Objective", "grad_xy", "grad_x", "grad_y", "hvp", "cross", "fused", "fused_fwd", "fused_rev",
           "hessian_yy", "value_and_grad_xy"]


def grad_xy(fn: Objective, x: PyTree, y: PyTree, batch: Batch) -> tuple[PyTree, PyTree]:
    """``(∇_x fn, ∇_y fn)`` in one reverse pass."""
    return grad(fn, argnums=(0, 1))(x, y, batch)


def value_and_grad_xy(fn: Objective, x: PyTree, y: PyTree, batch: Batch):
    """``((∇_x fn, ∇_y fn), fn)`` in one reverse pass."""
    return grad_and_value(fn, argnums=(0, 1))(x, y, batch)


def grad_x(fn: Objective, x: PyTree, y: PyTree, batch: Batch) -> PyTree:
    return grad(fn, argnums=0)(x, y, batch)


def grad_y(fn: Objective, x: PyTree, y: PyTree, batch: Batch) -> PyTree:
    return grad(fn, argnums=1)(x, y, batch)


def hvp(fn: Objective, x: PyTree, y: PyTree, v: PyTree, batch: Batch) -> PyTree:
    """``∇²_yy fn · v`` (reverse-over-reverse: the VJP of ``∇_y fn`` along ``y``)."""
    _, pullback = vjp(lambda y_: grad(fn, argnums=1)(x, y_, batch), y)
    return pullback(v)[0]


def cross(fn: Objective, x: PyTree, y: PyTree, v: PyTree, batch: Batch) -> PyTree:
    """``∇²_xy fn · v = ∇_x <∇_y fn, v>`` (the VJP of ``∇_y fn`` along ``x``), shaped like ``x``."""
    _, pullback = vjp(lambda x_: grad(fn, argnums=1)(x_, y, batch), x)
    return pullback(v)[0]


def fused_fwd(fn: Objective, x: PyTree, y: PyTree, v: PyTree, batch: Batch):
    """``(∇_y fn, ∇²_xy fn·v, ∇²_yy fn·v)`` from one forward-over-reverse pass: the joint Hessian
    applied to the direction ``(0, v)``."""
    (_, gy), (jv, hv) = jvp(lambda y_: grad(fn, argnums=(0, 1))(x, y_, batch), (y,), (v,))
    return gy, jv, hv


def fused_rev(fn: Objective, x: PyTree, y: PyTree, v: PyTree, batch: Batch):
    """``(∇_y fn, ∇²_xy fn·v, ∇²_yy fn·v)`` from one reverse-over-reverse pass (the VJP of ``∇_y fn``)."""
    gy, pullback = vjp(lambda x_, y_: grad(fn, argnums=1)(x_, y_, batch), x, y)
    jv, hv = pullback(v)
    return gy, jv, hv


def hessian_yy(fn: Objective, x: PyTree, y: PyTree, batch: Batch) -> torch.Tensor:
    """Dense ``∇²_yy fn`` as a ``(dim y, dim y)`` matrix over the flattened ``y``."""
    return hessian(lambda u: fn(x, tree.unflatten_like(u, y), batch))(tree.flatten(y))


#: the fused oracle the algorithms use (the faster of the two on CPU, see benchmarks/oracles.py)
fused = fused_rev

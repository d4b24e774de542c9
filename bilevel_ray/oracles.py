"""First- and second-order oracles of a bilevel problem, built on ``torch.autograd`` and ``torch.func``.

Only products are formed, never matrices (except :func:`hessian_yy`, used by MGBiO's eigenvalue
projection on small ``y``). ``Objective`` is ``(x, y, batch) -> scalar`` on pytrees.

Costs, in units of one reverse pass: :func:`grad_xy` 1, :func:`hvp` and :func:`cross` ≈2–3 each,
:func:`fused` ≈2–3 for ``∇_y g`` and *both* second-order products together. Second-order products
are reverse-over-reverse: on CPU, torch.func's forward mode costs 3–5× more per call
(``benchmarks/oracles.py`` measures both; :func:`fused_fwd` is kept for GPUs and for that comparison).

The reverse-mode oracles run on plain ``torch.autograd`` when they can: outside any ``torch.func``
transform and when no input carries an autograd graph (else, and always inside :func:`torch_func_only`,
on ``torch.func``, which composes with outer transforms and outer autograd). Same values; under
``torch.func.grad`` some backward kernels run decomposed into elementwise ops (group norm's: a Conv-4
backbone's gradient took about 1.5× longer on CPU).

Second-order products run in :func:`~bilevel_ray.precision.full_precision`: on a mixed-precision
problem (``run.dtype: bfloat16``) only the first-order oracles use bfloat16.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch.func import grad, grad_and_value, hessian, jvp, vjp
from torch.utils._pytree import tree_flatten, tree_leaves, tree_map, tree_unflatten

from bilevel_ray import tree
from bilevel_ray.precision import full_precision
from bilevel_ray.problem import Batch
from bilevel_ray.tree import PyTree

Objective = Callable[[PyTree, PyTree, Batch], torch.Tensor]

__all__ = ["Objective", "grad_xy", "grad_x", "grad_y", "hvp", "cross", "fused", "fused_fwd", "fused_rev",
           "hessian_yy", "value_and_grad_xy", "torch_func_only"]

_func_only = False
#: the active torch.func transform (None outside any); without it every oracle takes the torch.func path
_peek = getattr(torch._C._functorch, "peek_interpreter_stack", None)


@contextmanager
def torch_func_only() -> Iterator[None]:
    """Inside this block every oracle runs on ``torch.func`` (to compare it with the autograd path)."""
    global _func_only
    saved, _func_only = _func_only, True
    try:
        yield
    finally:
        _func_only = saved


def _eager(*trees: PyTree) -> bool:
    """Whether plain autograd may compute the oracle: no ``torch.func`` transform is active and no
    input is part of an autograd graph (detaching it would cut that graph)."""
    return (not _func_only and _peek is not None and _peek() is None
            and not any(isinstance(t, torch.Tensor) and t.requires_grad for t in tree_leaves(trees)))


def _tracked(a: PyTree) -> PyTree:
    return tree_map(lambda t: t.detach().requires_grad_(True), a)


def _autograd(out: PyTree, wrt: PyTree, cotangent: PyTree = None, *, create_graph: bool = False) -> PyTree:
    """``torch.autograd.grad`` over pytrees (the VJP of ``out`` with ``cotangent``, the gradient of a
    scalar ``out`` without), shaped like ``wrt``; zeros where ``out`` does not depend on an input."""
    inputs, spec = tree_flatten(wrt)
    outs = tree_leaves(out)
    cots = tree_leaves(cotangent) if cotangent is not None else [None] * len(outs)
    live = [(o, c) for o, c in zip(outs, cots) if o.requires_grad]
    grads = (torch.autograd.grad([o for o, _ in live], inputs, None if cotangent is None else [c for _, c in live],
                                 create_graph=create_graph, allow_unused=True) if live else [None] * len(inputs))
    return tree_unflatten([torch.zeros_like(i) if d is None else d for i, d in zip(inputs, grads)], spec)


def _grad_y_tracked(fn: Objective, x: PyTree, y: PyTree, batch: Batch) -> PyTree:
    """``∇_y fn`` with its graph (``create_graph``), for a second reverse pass."""
    return _autograd(fn(x, y, batch), y, create_graph=True)


def grad_xy(fn: Objective, x: PyTree, y: PyTree, batch: Batch) -> tuple[PyTree, PyTree]:
    """``(∇_x fn, ∇_y fn)`` in one reverse pass."""
    return value_and_grad_xy(fn, x, y, batch)[0]


def value_and_grad_xy(fn: Objective, x: PyTree, y: PyTree, batch: Batch):
    """``((∇_x fn, ∇_y fn), fn)`` in one reverse pass."""
    if not _eager(x, y):
        return grad_and_value(fn, argnums=(0, 1))(x, y, batch)
    with torch.enable_grad():
        x, y = _tracked(x), _tracked(y)
        out = fn(x, y, batch)
        return _autograd(out, (x, y)), out.detach()


def grad_x(fn: Objective, x: PyTree, y: PyTree, batch: Batch) -> PyTree:
    """``∇_x fn``."""
    if not _eager(x, y):
        return grad(fn, argnums=0)(x, y, batch)
    with torch.enable_grad():
        x = _tracked(x)
        return _autograd(fn(x, y, batch), x)


def grad_y(fn: Objective, x: PyTree, y: PyTree, batch: Batch) -> PyTree:
    """``∇_y fn``."""
    if not _eager(x, y):
        return grad(fn, argnums=1)(x, y, batch)
    with torch.enable_grad():
        y = _tracked(y)
        return _autograd(fn(x, y, batch), y)


@full_precision()
def hvp(fn: Objective, x: PyTree, y: PyTree, v: PyTree, batch: Batch) -> PyTree:
    """``∇²_yy fn · v`` (reverse-over-reverse: the VJP of ``∇_y fn`` along ``y``)."""
    if not _eager(x, y, v):
        _, pullback = vjp(lambda y_: grad(fn, argnums=1)(x, y_, batch), y)
        return pullback(v)[0]
    with torch.enable_grad():
        y = _tracked(y)
        return _autograd(_grad_y_tracked(fn, x, y, batch), y, v)


@full_precision()
def cross(fn: Objective, x: PyTree, y: PyTree, v: PyTree, batch: Batch) -> PyTree:
    """``∇²_xy fn · v = ∇_x <∇_y fn, v>`` (the VJP of ``∇_y fn`` along ``x``), shaped like ``x``."""
    if not _eager(x, y, v):
        _, pullback = vjp(lambda x_: grad(fn, argnums=1)(x_, y, batch), x)
        return pullback(v)[0]
    with torch.enable_grad():
        x, y = _tracked(x), _tracked(y)
        return _autograd(_grad_y_tracked(fn, x, y, batch), x, v)


@full_precision()
def fused_fwd(fn: Objective, x: PyTree, y: PyTree, v: PyTree, batch: Batch):
    """``(∇_y fn, ∇²_xy fn·v, ∇²_yy fn·v)`` from one forward-over-reverse pass: the joint Hessian
    applied to the direction ``(0, v)``."""
    (_, gy), (jv, hv) = jvp(lambda y_: grad(fn, argnums=(0, 1))(x, y_, batch), (y,), (v,))
    return gy, jv, hv


@full_precision()
def fused_rev(fn: Objective, x: PyTree, y: PyTree, v: PyTree, batch: Batch):
    """``(∇_y fn, ∇²_xy fn·v, ∇²_yy fn·v)`` from one reverse-over-reverse pass (the VJP of ``∇_y fn``)."""
    if not _eager(x, y, v):
        gy, pullback = vjp(lambda x_, y_: grad(fn, argnums=1)(x_, y_, batch), x, y)
        jv, hv = pullback(v)
        return gy, jv, hv
    with torch.enable_grad():
        x, y = _tracked(x), _tracked(y)
        gy = _grad_y_tracked(fn, x, y, batch)
        jv, hv = _autograd(gy, (x, y), v)
    return tree.detach(gy), jv, hv


@full_precision()
def hessian_yy(fn: Objective, x: PyTree, y: PyTree, batch: Batch) -> torch.Tensor:
    """Dense ``∇²_yy fn`` as a ``(dim y, dim y)`` matrix over the flattened ``y``."""
    return hessian(lambda u: fn(x, tree.unflatten_like(u, y), batch))(tree.flatten(y))


#: the fused oracle the algorithms use (the faster of the two on CPU, see benchmarks/oracles.py)
fused = fused_rev

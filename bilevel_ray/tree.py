"""Arithmetic on pytrees of tensors (dicts, lists, tuples or a bare tensor).

Every bilevel variable (``x``, ``y``, ``v``) is a pytree so that neural networks work as well as flat
vectors. Reductions (``vdot``, ``sq_norm``) and ``flatten`` are the only operations that see across
leaves; with ``batch=1`` they keep a leading agent axis (the vectorized simulation stacks agents
there): ``vdot`` then returns one value per agent, ``flatten`` an ``(agents, numel)`` matrix, and
``scale`` / ``axpy`` broadcast such per-agent scalars over each agent's leaves.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

PyTree = Any

__all__ = [
    "PyTree", "tree_map", "add", "sub", "scale", "axpy", "lerp", "zeros_like", "vdot", "sq_norm",
    "norm", "detach", "flatten", "unflatten_like", "numel", "to_dtype", "clone",
]


def add(a: PyTree, b: PyTree) -> PyTree:
    """``a + b``."""
    return tree_map(torch.add, a, b)


def sub(a: PyTree, b: PyTree) -> PyTree:
    """``a - b``."""
    return tree_map(torch.sub, a, b)


def _per(s: float | torch.Tensor, t: torch.Tensor) -> float | torch.Tensor:
    """A per-agent scalar (1-D, one entry per agent) shaped to broadcast over the leaf ``t``."""
    if isinstance(s, torch.Tensor) and s.ndim == 1 and t.ndim > 1:
        return s.reshape(-1, *[1] * (t.ndim - 1))
    return s


def scale(a: PyTree, s: float | torch.Tensor) -> PyTree:
    """``s * a`` (``s`` a scalar or one per agent)."""
    return tree_map(lambda t: t * _per(s, t), a)


def axpy(alpha: float | torch.Tensor, x: PyTree, y: PyTree) -> PyTree:
    """``y + alpha * x`` (``alpha`` a scalar or one per agent)."""
    return tree_map(lambda xi, yi: yi + _per(alpha, xi) * xi, x, y)


def lerp(a: PyTree, b: PyTree, w: float) -> PyTree:
    """``a + w (b - a)``."""
    return tree_map(lambda ai, bi: ai + w * (bi - ai), a, b)


def zeros_like(a: PyTree) -> PyTree:
    """Zeros with the structure and shapes of ``a``."""
    return tree_map(torch.zeros_like, a)


def clone(a: PyTree) -> PyTree:
    """A copy of every leaf."""
    return tree_map(torch.clone, a)


def detach(a: PyTree) -> PyTree:
    """Every leaf detached from its graph."""
    return tree_map(torch.Tensor.detach, a)


def to_dtype(a: PyTree, dtype: torch.dtype) -> PyTree:
    """Every leaf cast to ``dtype``."""
    return tree_map(lambda t: t.to(dtype), a)


def vdot(a: PyTree, b: PyTree, batch: int = 0) -> torch.Tensor:
    """``<a, b>``; with ``batch=1`` one inner product per index of the leading axis."""
    la, _ = tree_flatten(a)
    lb, _ = tree_flatten(b)
    if batch:
        return sum((x.reshape(x.shape[0], -1) * y.reshape(y.shape[0], -1)).sum(1) for x, y in zip(la, lb))
    return torch.stack([torch.vdot(x.reshape(-1), y.reshape(-1)) for x, y in zip(la, lb)]).sum()


def sq_norm(a: PyTree, batch: int = 0) -> torch.Tensor:
    """``‖a‖²`` (``batch=1``: one per agent)."""
    return vdot(a, a, batch)


def norm(a: PyTree, batch: int = 0) -> torch.Tensor:
    """``‖a‖`` (``batch=1``: one per agent)."""
    return sq_norm(a, batch).sqrt()


def numel(a: PyTree) -> int:
    """Total number of entries over all leaves."""
    return sum(t.numel() for t in tree_flatten(a)[0])


def flatten(a: PyTree, batch: int = 0) -> torch.Tensor:
    """Concatenate all leaves into one 1-D tensor (``batch=1``: one row per agent)."""
    leaves = tree_flatten(a)[0]
    if batch:
        return torch.cat([t.reshape(t.shape[0], -1) for t in leaves], dim=1)
    return torch.cat([t.reshape(-1) for t in leaves])


def unflatten_like(flat: torch.Tensor, like: PyTree, batch: int = 0) -> PyTree:
    """Inverse of :func:`flatten` with the structure and shapes of ``like``."""
    leaves, spec = tree_flatten(like)
    out, i = [], 0
    for t in leaves:
        size = t[0].numel() if batch else t.numel()
        out.append(flat[..., i:i + size].reshape(t.shape))
        i += size
    return tree_unflatten(out, spec)


def as_flat_fn(fn: Callable[[PyTree], PyTree], like: PyTree, batch: int = 0
               ) -> Callable[[torch.Tensor], torch.Tensor]:
    """Wrap a pytree -> pytree linear map as a flat vector (``batch=1``: row per agent) map."""
    return lambda u: flatten(fn(unflatten_like(u, like, batch)), batch)

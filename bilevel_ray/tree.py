"""Arithmetic on pytrees of tensors (dicts, lists, tuples or a bare tensor).

Every bilevel variable (``x``, ``y``, ``v``) is a pytree so that neural networks work as well as flat
vectors. Reductions (``vdot``, ``sq_norm``) are the only operations that see across leaves; they are
kept here so that a vectorized backend has one place to make them per-agent.
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
    return tree_map(torch.add, a, b)


def sub(a: PyTree, b: PyTree) -> PyTree:
    return tree_map(torch.sub, a, b)


def scale(a: PyTree, s: float | torch.Tensor) -> PyTree:
    return tree_map(lambda t: t * s, a)


def axpy(alpha: float | torch.Tensor, x: PyTree, y: PyTree) -> PyTree:
    """``y + alpha * x``."""
    return tree_map(lambda xi, yi: yi + alpha * xi, x, y)


def lerp(a: PyTree, b: PyTree, w: float) -> PyTree:
    """``a + w (b - a)``."""
    return tree_map(lambda ai, bi: ai + w * (bi - ai), a, b)


def zeros_like(a: PyTree) -> PyTree:
    return tree_map(torch.zeros_like, a)


def clone(a: PyTree) -> PyTree:
    return tree_map(torch.clone, a)


def detach(a: PyTree) -> PyTree:
    return tree_map(torch.Tensor.detach, a)


def to_dtype(a: PyTree, dtype: torch.dtype) -> PyTree:
    return tree_map(lambda t: t.to(dtype), a)


def vdot(a: PyTree, b: PyTree) -> torch.Tensor:
    la, _ = tree_flatten(a)
    lb, _ = tree_flatten(b)
    return torch.stack([torch.vdot(x.reshape(-1), y.reshape(-1)) for x, y in zip(la, lb)]).sum()


def sq_norm(a: PyTree) -> torch.Tensor:
    return vdot(a, a)


def norm(a: PyTree) -> torch.Tensor:
    return sq_norm(a).sqrt()


def numel(a: PyTree) -> int:
    return sum(t.numel() for t in tree_flatten(a)[0])


def flatten(a: PyTree) -> torch.Tensor:
    """Concatenate all leaves into one 1-D tensor."""
    return torch.cat([t.reshape(-1) for t in tree_flatten(a)[0]])


def unflatten_like(flat: torch.Tensor, like: PyTree) -> PyTree:
    """Inverse of :func:`flatten` with the structure and shapes of ``like``."""
    leaves, spec = tree_flatten(like)
    out, i = [], 0
    for t in leaves:
        out.append(flat[i:i + t.numel()].reshape(t.shape))
        i += t.numel()
    return tree_unflatten(out, spec)


def as_flat_fn(fn: Callable[[PyTree], PyTree], like: PyTree) -> Callable[[torch.Tensor], torch.Tensor]:
    """Wrap a pytree -> pytree linear map as a flat vector -> flat vector map."""
    return lambda u: flatten(fn(unflatten_like(u, like)))

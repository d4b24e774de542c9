"""Optional mixed precision: the model's forward and backward in bfloat16 where autocast deems it safe.

With ``run.dtype: bfloat16`` the backends step on :class:`MixedPrecision` ``(problem)``: its ``f`` and
``g`` run under ``torch.autocast(dtype=torch.bfloat16)`` (matrix products and convolutions in bfloat16,
reductions, norms and losses in float32, as autocast's op lists decide), so the first-order oracles
(``∇f``, ``∇g``) and their backward passes are bfloat16 work. Second-order products (HVPs, cross
derivatives, the fused oracle) run inside :func:`full_precision`, which the oracles enter: there ``f``
and ``g`` run in the task's own dtype. Iterates, the linear-system variable and every algorithm state
stay in the task's dtype; metrics are computed on the task itself, in full precision.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Any, Iterator

import torch

from bilevel_ray.device import dtype_of

__all__ = ["DTYPES", "MixedPrecision", "mixed_precision", "full_precision", "in_full_precision"]

#: what ``run.dtype`` accepts: float32 (no autocast: the task's own dtype throughout) or bfloat16
DTYPES = ("float32", "bfloat16")

_local = threading.local()


@contextmanager
def full_precision() -> Iterator[None]:
    """Inside, a :class:`MixedPrecision` problem evaluates ``f`` and ``g`` without autocast."""
    _local.depth = getattr(_local, "depth", 0) + 1
    try:
        yield
    finally:
        _local.depth -= 1


def in_full_precision() -> bool:
    """Whether the caller is inside :func:`full_precision`."""
    return getattr(_local, "depth", 0) > 0


class MixedPrecision:
    """``problem`` with ``f`` and ``g`` under bfloat16 autocast on ``device_type`` outside
    :func:`full_precision`; every other attribute is the problem's (a bound on-policy problem from
    ``at`` is wrapped too)."""

    def __init__(self, problem: Any, device_type: str):
        self.problem, self.device_type = problem, device_type

    def _call(self, name: str, x: Any, y: Any, batch: Any) -> torch.Tensor:
        fn = getattr(self.problem, name)
        if in_full_precision():
            return fn(x, y, batch)
        with torch.autocast(self.device_type, dtype=torch.bfloat16):
            out = fn(x, y, batch)
        return out.to(dtype_of(x))

    def f(self, x: Any, y: Any, batch: Any) -> torch.Tensor:
        """The problem's ``f``, under autocast outside :func:`full_precision`."""
        return self._call("f", x, y, batch)

    def g(self, x: Any, y: Any, batch: Any) -> torch.Tensor:
        """The problem's ``g``, under autocast outside :func:`full_precision`."""
        return self._call("g", x, y, batch)

    def __getattr__(self, name: str) -> Any:
        if name == "problem":  # not set yet (unpickling)
            raise AttributeError(name)
        value = getattr(self.problem, name)
        if name == "at" and callable(value):
            return lambda *args, **kwargs: MixedPrecision(value(*args, **kwargs), self.device_type)
        return value


def mixed_precision(problem: Any, dtype: str, device: torch.device | str) -> Any:
    """``problem`` itself for ``float32``, :class:`MixedPrecision` of it for ``bfloat16``."""
    if dtype not in DTYPES:
        raise ValueError(f"run.dtype: must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return problem if dtype == "float32" else MixedPrecision(problem, torch.device(device).type)

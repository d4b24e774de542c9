"""Prepare a CPU training process in the one order that works: subnormals flushed, then torch's
intra-op threads, then glibc's heap kept (:mod:`bilevel_ray.denormals`, :mod:`bilevel_ray.allocator`).

The flush-to-zero mode is per thread and PyTorch's intra-op threads copy it when they start, so it
must be set before the thread count is changed or any parallel operation runs; the CLI, the Ray agent
actors and the benchmarks call :func:`prepare_process` first.
"""

from __future__ import annotations

from typing import NamedTuple

from bilevel_ray.allocator import keep_heap
from bilevel_ray.denormals import flush_denormals

__all__ = ["ProcessSetup", "prepare_process"]


class ProcessSetup(NamedTuple):
    """What :func:`prepare_process` changed: subnormals flushed to zero, freed heap memory kept."""

    flushed: bool
    heap_kept: bool


def prepare_process(threads: int | None = None) -> ProcessSetup:
    """:func:`~bilevel_ray.denormals.flush_denormals`, then ``torch.set_num_threads(threads)`` (unless
    ``None``), then :func:`~bilevel_ray.allocator.keep_heap`. ``BILEVEL_RAY_DENORMALS=keep`` and
    ``BILEVEL_RAY_ALLOCATOR=default`` turn off their parts."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads: must be a positive integer or None, got {threads!r}")
    flushed = flush_denormals()
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    return ProcessSetup(flushed, keep_heap())

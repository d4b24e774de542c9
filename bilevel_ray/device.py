"""Where a run's tensors live: resolving ``run.device`` and moving a task's data and states there.

``run.device`` is ``auto`` (the first CUDA device this process sees, else the CPU), ``cpu``, ``cuda`` or
``cuda:N``. A task is built on the CPU (in the driver, which may have no GPU) and placed on its device
where it runs: in the driver for one process and the simulation, in each agent's actor for Ray agents
(which see only the GPU share Ray gave them, as ``cuda:0``). :func:`to_device` moves every tensor a
task holds (its datasets, its samplers' minibatches, stacked agent views) and leaves everything else,
caches and counters included, as it is; on the CPU it returns its argument unchanged.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Iterator

import numpy as np
import torch

__all__ = ["DEVICES", "check_device", "resolve_device", "to_device", "device_of", "dtype_of"]

#: what ``run.device`` accepts (``cuda:N`` with any N too)
DEVICES = ("auto", "cpu", "cuda")


def check_device(spec: str) -> str:
    """``spec`` if it names a device ``run.device`` accepts, else a one-line ``ValueError``."""
    ok = isinstance(spec, str) and (spec in DEVICES or (spec.startswith("cuda:") and spec[5:].isdigit()))
    if not ok:
        raise ValueError(f"run.device: must be auto, cpu, cuda or cuda:N, got {spec!r}")
    return spec


def resolve_device(spec: str) -> torch.device:
    """The device ``spec`` names in this process; a one-line ``ValueError`` if it asks for a CUDA device
    this process does not have."""
    check_device(spec)
    if spec == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"run.device: {spec} asked for, but this process sees no CUDA device "
                         f"(torch.cuda.is_available() is False); use auto or cpu")
    index = int(spec[5:]) if ":" in spec else 0
    count = torch.cuda.device_count()
    if index >= count:
        raise ValueError(f"run.device: {spec} asked for, but this process sees {count} CUDA device(s)")
    return torch.device("cuda", index)


def _tensors(tree: Any) -> Iterator[torch.Tensor]:
    return (t for t in torch.utils._pytree.tree_leaves(tree) if isinstance(t, torch.Tensor))


def device_of(tree: Any) -> torch.device:
    """The device of the first tensor in ``tree`` (CPU if it holds none)."""
    return next((t.device for t in _tensors(tree)), torch.device("cpu"))


def dtype_of(tree: Any) -> torch.dtype:
    """The dtype of the first floating-point tensor in ``tree`` (float32 if it holds none)."""
    return next((t.dtype for t in _tensors(tree) if t.is_floating_point()), torch.float32)


def to_device(obj: Any, device: torch.device | str) -> Any:
    """``obj`` with every tensor it holds on ``device``: through tuples (named ones too), lists, dicts,
    dataclass instances (frozen ones included, with the attributes their ``__post_init__`` set) and
    objects that opt in with a ``to_device(device)`` method. A container none of whose tensors move is
    returned as itself, so placing on the CPU what is already there changes nothing."""
    device = torch.device(device)
    return _move(obj, device, {})


def _move(obj: Any, device: torch.device, memo: dict[int, Any]) -> Any:
    key = id(obj)
    if key in memo:
        return memo[key]
    if isinstance(obj, torch.Tensor):
        out = obj if obj.device == device else obj.to(device)
    elif isinstance(obj, (str, bytes, int, float, bool, type(None), torch.device, torch.dtype, np.ndarray, np.generic)):
        return obj  # numpy arrays (index tables, sampler state) stay in host memory
    elif hasattr(obj, "to_device") and not isinstance(obj, type):
        out = obj.to_device(device)
    elif isinstance(obj, tuple):
        items = [_move(v, device, memo) for v in obj]
        same = all(a is b for a, b in zip(items, obj))
        out = obj if same else (type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items))
    elif isinstance(obj, list):
        items = [_move(v, device, memo) for v in obj]
        out = obj if all(a is b for a, b in zip(items, obj)) else type(obj)(items)
    elif isinstance(obj, dict):
        items = {k: _move(v, device, memo) for k, v in obj.items()}
        if all(items[k] is obj[k] for k in obj):
            out = obj
        else:
            out = copy.copy(obj)
            out.update(items)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        attrs = {k: _move(v, device, memo) for k, v in vars(obj).items()}
        if all(attrs[k] is v for k, v in vars(obj).items()):
            out = obj
        else:
            out = copy.copy(obj)
            for k, v in attrs.items():
                object.__setattr__(out, k, v)
    else:
        return obj
    memo[key] = out
    return out

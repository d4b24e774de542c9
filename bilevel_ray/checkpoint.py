"""Checkpoints of algorithm states as plain containers of tensors, loadable with ``weights_only=True``.

States are NamedTuples (possibly nested, e.g. SABA's tables, the oracle-call counter); they are saved
as tuples/dicts/lists of tensors and numbers and rebuilt against a template state of the same
algorithm, so a checkpoint never unpickles arbitrary classes. Writes are atomic (temp file + rename):
a crash mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from bilevel_ray.files import atomic_write

__all__ = ["to_plain", "from_plain", "save", "load"]


def _is_namedtuple(obj: Any) -> bool:
    return isinstance(obj, tuple) and hasattr(obj, "_fields")


def to_plain(obj: Any) -> Any:
    """NamedTuples become tuples, recursively; tensors, numbers and strings stay."""
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_plain(o) for o in obj) if not _is_namedtuple(obj) else tuple(to_plain(o) for o in obj)
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj


def from_plain(plain: Any, template: Any) -> Any:
    """Rebuild ``plain`` with the container types of ``template``."""
    if _is_namedtuple(template):
        return type(template)(*(from_plain(p, t) for p, t in zip(plain, template)))
    if isinstance(template, (tuple, list)):
        return type(template)(from_plain(p, t) for p, t in zip(plain, template))
    if isinstance(template, dict):
        return {k: from_plain(plain[k], v) for k, v in template.items()}
    return plain


def save(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` atomically, its NamedTuples as plain tuples."""
    atomic_write(path, lambda tmp: torch.save(to_plain(payload), tmp))


def load(path: Path) -> dict[str, Any]:
    """The plain payload saved at ``path`` (``weights_only``, tensors on the CPU whatever device wrote
    them; rebuild states with :func:`from_plain`)."""
    return torch.load(Path(path), weights_only=True, map_location="cpu")

"""Validated parameter dataclasses shared by algorithms and tasks.

A field declared with :func:`hp` carries bounds and choices; construction checks every field's type
(from its annotation), bounds and choices and raises a one-line ``ValueError`` naming the field as it
is spelled in a config file, e.g. ``algorithm.outer_lr: must be > 0, got -1.0``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

__all__ = ["Params", "hp"]


def hp(default: Any, *, low: float | None = None, high: float | None = None, strict: bool = True,
       choices: tuple | None = None, doc: str = "") -> Any:
    """A validated field. ``strict`` makes the bounds exclusive."""
    return field(default=default, metadata={"low": low, "high": high, "strict": strict,
                                            "choices": choices, "doc": doc})


_TYPES = {"float": (float, int), "int": (int,), "bool": (bool,), "str": (str,)}


@dataclass(frozen=True)
class Params:
    """Frozen dataclass whose fields are checked at construction."""

    section: ClassVar[str] = "params"

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            val, meta = getattr(self, f.name), f.metadata
            where = f"{self.section}.{f.name}"
            kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
            allowed = _TYPES.get(kind.replace(" | None", ""))
            if val is None and kind.endswith("| None"):
                continue
            if allowed is not None:
                if (isinstance(val, bool) and "bool" not in kind) or not isinstance(val, allowed):
                    raise ValueError(f"{where}: must be of type {kind.replace(' | None', '')}, got {val!r}")
                if isinstance(val, float) and not math.isfinite(val):
                    raise ValueError(f"{where}: must be a finite number, got {val!r}")
                if kind.startswith("float"):
                    object.__setattr__(self, f.name, float(val))
            choices = meta.get("choices")
            if choices is not None and val not in choices:
                raise ValueError(f"{where}: must be one of {', '.join(map(str, choices))}, got {val!r}")
            low, high, strict = meta.get("low"), meta.get("high"), meta.get("strict", True)
            if low is not None and (val <= low if strict else val < low):
                raise ValueError(f"{where}: must be {'>' if strict else '>='} {low}, got {val!r}")
            if high is not None and (val >= high if strict else val > high):
                raise ValueError(f"{where}: must be {'<' if strict else '<='} {high}, got {val!r}")

    @classmethod
    def create(cls, **kwargs: Any) -> "Params":
        """Construct from config keys, rejecting unknown ones with a one-line error."""
        known = [f.name for f in dataclasses.fields(cls)]
        for key in kwargs:
            if key not in known:
                raise ValueError(f"{cls.section}.{key}: unknown field for {cls.__name__}; "
                                 f"allowed: {', '.join(known) or 'none'}")
        return cls(**kwargs)

    @classmethod
    def field_docs(cls) -> dict[str, tuple[Any, str]]:
        return {f.name: (f.default, f.metadata.get("doc", "")) for f in dataclasses.fields(cls)}

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

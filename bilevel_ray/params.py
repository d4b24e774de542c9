"""Validated parameter dataclasses shared by algorithms and tasks.

A field declared with :func:`hp` carries bounds and choices; construction checks every field's type
(from its annotation), bounds and choices and raises a one-line ``ValueError`` naming the field as it
is spelled in a config file, e.g. ``algorithm.outer_lr: must be > 0, got -1.0``.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, TypeVar

__all__ = ["Params", "hp", "Registry"]


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
        """``{field: (default, doc)}`` for every field."""
        return {f.name: (f.default, f.metadata.get("doc", "")) for f in dataclasses.fields(cls)}

    def to_dict(self) -> dict[str, Any]:
        """``{field: value}`` for every field."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


T = TypeVar("T", bound=type)


class Registry:
    """Named classes of one kind (algorithms, tasks). ``lazy`` maps built-in names to ``"module:Class"``
    imported on first use, so listing names never imports heavy modules."""

    def __init__(self, section: str, kind: str, lazy: dict[str, str] | None = None):
        self.section, self.kind = section, kind
        self.lazy = dict(lazy or {})
        self.items: dict[str, type] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Class decorator adding ``cls`` under ``name`` (and setting ``cls.name``)."""
        def deco(cls: T) -> T:
            if name in self.items and self.items[name] is not cls:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            cls.name = name
            self.items[name] = cls
            return cls
        return deco

    def available(self) -> list[str]:
        """Sorted names, registered or lazy."""
        return sorted(set(self.items) | set(self.lazy))

    def get(self, name: str) -> type:
        """The class registered as ``name`` (importing a lazy one); a one-line error for an unknown name."""
        if name not in self.items and name in self.lazy:
            importlib.import_module(self.lazy[name].split(":")[0])
        try:
            return self.items[name]
        except KeyError:
            raise ValueError(f"{self.section}.name: unknown {self.kind} {name!r}; "
                             f"available: {', '.join(self.available())}") from None

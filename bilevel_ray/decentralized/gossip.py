"""Mixing schedules: which matrix ``W_t`` the agents gossip with at outer round ``t``.

A schedule is a picklable callable ``t -> W_t`` so that Ray actors rebuild it by value.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["StaticMixing"]


@dataclass(frozen=True)
class StaticMixing:
    """The same matrix every round."""

    w: np.ndarray

    def __call__(self, t: int) -> np.ndarray:
        return self.w

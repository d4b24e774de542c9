"""Mixing schedules: which matrix ``W_t`` the agents gossip with at outer round ``t``.

A schedule is a picklable callable ``t -> W_t`` (Ray actors receive it by value). Static graphs build
and validate their matrix once; the time-varying one-peer exponential graph cycles through
``log2(n)`` matrices.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bilevel_ray.decentralized.mixing import make_mixing, spectral_gap
from bilevel_ray.decentralized.topology import make_topology

__all__ = ["TopologyMixing"]


@dataclass(frozen=True)
class TopologyMixing:
    """``W_t`` from a named topology (see :func:`make_topology`) and weighting scheme."""

    topology: str
    n: int
    scheme: str = "metropolis"
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        varying = self.topology == "one_peer_exponential"
        period = max(1, int(np.log2(self.n))) if varying else 1
        mats = tuple(make_mixing(make_topology(self.topology, self.n, **({"t": t} if varying else {}),
                                               **self.options), self.scheme).W for t in range(period))
        object.__setattr__(self, "_mats", mats)

    def __call__(self, t: int) -> np.ndarray:
        """``W_t``, the mixing matrix of round ``t``."""
        return self._mats[t % len(self._mats)]

    @property
    def spectral_gap(self) -> float:
        """Gap of the one-period product (of ``W`` itself for a static graph)."""
        prod = np.eye(self.n)
        for w in self._mats:
            prod = w @ prod
        sym = (prod + prod.T) / 2 if len(self._mats) > 1 else prod
        return spectral_gap(sym)

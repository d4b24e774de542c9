"""Gossip weights: a symmetric doubly stochastic matrix ``W`` supported on a :class:`.Topology`.

Schemes: :func:`metropolis_hastings` and :func:`uniform` (maximum-degree) weights (Xiao & Boyd, 2004,
"Fast linear iterations for distributed averaging", Systems & Control Letters), and :func:`lazy`
mixing. :func:`validate` checks everything consensus needs and reports the first failure as a one-line
``ValueError`` starting with ``topology.weights:``; :func:`make_mixing` builds and validates.

For symmetric doubly stochastic ``W`` with eigenvalues ``1 = λ_1 ≥ λ_2 ≥ ... ≥ λ_n``, gossip contracts
the disagreement by the second-largest eigenvalue modulus ``max(|λ_2|, |λ_n|)`` per round; the
spectral gap is one minus that.

Numpy only, so that importing this module stays cheap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from bilevel_ray.decentralized.topology import Topology

__all__ = ["MixingMatrix", "SCHEMES", "lazy", "make_mixing", "metropolis_hastings",
           "second_eigenvalue_modulus", "spectral_gap", "uniform", "validate"]


def metropolis_hastings(topology: Topology) -> np.ndarray:
    """``w_ij = 1 / (1 + max(d_i, d_j))`` on edges, ``w_ii = 1 - Σ_j w_ij``.

    Only local degrees are needed, and every ``w_ii ≥ 1 / (1 + d_i) > 0``.
    """
    d = topology.degree
    w = np.where(topology.adjacency, 1.0 / (1.0 + np.maximum(d[:, None], d[None, :])), 0.0)
    return w + np.diag(1.0 - w.sum(axis=1))


def uniform(topology: Topology) -> np.ndarray:
    """Maximum-degree weights: ``w_ij = 1 / (1 + d_max)`` on edges, the rest on the diagonal."""
    w = topology.adjacency / (1.0 + topology.degree.max())
    return w + np.diag(1.0 - w.sum(axis=1))


def lazy(w: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """``(1 - α) I + α W`` for ``α ∈ (0, 1]``.

    Eigenvalues map ``λ ↦ 1 - α + αλ``; the default ``α = 1/2`` gives ``(I + W) / 2``, whose eigenvalues
    are all ``≥ 0``, so the gap is governed by ``λ_2`` alone (no oscillating ``λ_n`` near ``-1``).
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha <= 1:
        raise ValueError(f"topology.alpha: must be a number in (0, 1], got {alpha!r}")
    w = np.asarray(w, dtype=np.float64)
    return (1.0 - alpha) * np.eye(w.shape[0]) + alpha * w


def _check_symmetric(w: np.ndarray, atol: float) -> None:
    err = float(np.abs(w - w.T).max(initial=0.0))
    if err > atol:
        raise ValueError(f"topology.weights: W is not symmetric (max |W - W^T| = {err:.3g})")


def second_eigenvalue_modulus(w: np.ndarray, atol: float = 1e-10) -> float:
    """``max(|λ_2|, |λ_n|)`` of a symmetric stochastic ``W`` (``λ_1 = 1`` is left out); 0 for ``n = 1``."""
    w = np.asarray(w, dtype=np.float64)
    _check_symmetric(w, atol)
    eig = np.linalg.eigvalsh(w)  # ascending: eig[-1] = λ_1 = 1
    return float(max(abs(eig[-2]), abs(eig[0]))) if len(eig) > 1 else 0.0


def spectral_gap(w: np.ndarray, atol: float = 1e-10) -> float:
    """``1 - max(|λ_2|, |λ_n|)``: 1 for exact averaging, 0 when gossip does not reach consensus."""
    return 1.0 - second_eigenvalue_modulus(w, atol)


def validate(w: np.ndarray, topology: Topology, atol: float = 1e-10, *,
             require_connected: bool = True) -> None:
    """Check that ``W`` is a valid gossip matrix on ``topology``; raise a one-line ``ValueError`` if not.

    ``W`` must be an ``n × n`` finite float matrix, symmetric, nonnegative, with rows (hence columns)
    summing to 1, zero off the diagonal wherever ``topology`` has no edge. With ``require_connected``
    the graph and the support of ``W`` must also be connected and ``W`` aperiodic, i.e. the
    second-largest eigenvalue modulus below 1 (a round of a time-varying graph is exempt).
    """
    w = np.asarray(w)
    n = topology.n
    if w.shape != (n, n):
        raise ValueError(f"topology.weights: W must be {n}×{n} for {n} agents, got shape {w.shape}")
    if not np.issubdtype(w.dtype, np.floating):
        raise ValueError(f"topology.weights: W must be a float matrix, got dtype {w.dtype}")
    if not np.isfinite(w).all():
        raise ValueError(f"topology.weights: W has {int((~np.isfinite(w)).sum())} non-finite entries")
    _check_symmetric(w, atol)
    if w.min() < -atol:
        i, j = np.unravel_index(np.argmin(w), w.shape)
        raise ValueError(f"topology.weights: W has a negative entry {w[i, j]:.3g} at ({i}, {j})")
    row_err = float(np.abs(w.sum(axis=1) - 1.0).max())
    col_err = float(np.abs(w.sum(axis=0) - 1.0).max())
    if max(row_err, col_err) > atol:
        raise ValueError(f"topology.weights: W is not doubly stochastic (max row-sum error {row_err:.3g}, "
                         f"max column-sum error {col_err:.3g})")
    off_graph = np.abs(np.where(topology.adjacency | np.eye(n, dtype=bool), 0.0, w))
    if off_graph.max() > atol:
        i, j = np.unravel_index(np.argmax(off_graph), w.shape)
        raise ValueError(f"topology.weights: W puts weight {w[i, j]:.3g} on ({i}, {j}), which is not an "
                         f"edge of the {topology.name} graph")
    if not require_connected:
        return
    if not topology.is_connected():
        raise ValueError(f"topology.weights: the {topology.name} graph is disconnected "
                         f"({topology.n_components()} components), so agents cannot reach consensus")
    support = Topology(n, (w > atol) & ~np.eye(n, dtype=bool), "support")
    if not support.is_connected():
        raise ValueError(f"topology.weights: the nonzero entries of W form a disconnected graph "
                         f"({support.n_components()} components), so agents cannot reach consensus")
    slem = second_eigenvalue_modulus(w, atol)
    if slem > 1.0 - atol:
        raise ValueError(f"topology.weights: second-largest eigenvalue modulus is {slem:.3g} (W is "
                         "periodic); use lazy mixing (I + W) / 2")


#: scheme name -> weights on a topology
SCHEMES: dict[str, Callable[[Topology], np.ndarray]] = {
    "metropolis": metropolis_hastings,
    "uniform": uniform,
    "lazy_metropolis": lambda topology: lazy(metropolis_hastings(topology)),
}


@dataclass(frozen=True, eq=False)
class MixingMatrix:
    """A validated gossip matrix ``W`` (read-only) on ``topology`` with its spectral gap."""

    topology: Topology
    W: np.ndarray
    gap: float


def make_mixing(topology: Topology, scheme: str = "metropolis") -> MixingMatrix:
    """Weights of ``scheme`` on ``topology``, validated.

    For a round of a time-varying graph (``topology.t`` set, e.g. :func:`.one_peer_exponential`) this is
    that round's matrix: each agent averages with its one or two peers, and connectivity is not required
    (its gap may be 0; the product over a period is what mixes).
    """
    if scheme not in SCHEMES:
        raise ValueError(f"topology.mixing: unknown scheme {scheme!r}; available: {', '.join(SCHEMES)}")
    w = SCHEMES[scheme](topology)
    validate(w, topology, require_connected=topology.t is None)
    w.setflags(write=False)
    return MixingMatrix(topology, w, spectral_gap(w))

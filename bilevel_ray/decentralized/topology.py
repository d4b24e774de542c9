"""Communication graphs: which agents exchange messages (no weights; see :mod:`.mixing` for those).

A :class:`Topology` is an undirected simple graph on agents ``0 .. n-1``. Static builders: :func:`ring`,
:func:`torus`, :func:`complete`, :func:`star`, :func:`exponential`, :func:`erdos_renyi` and
:func:`from_adjacency`; :func:`one_peer_exponential` gives round ``t`` of a time-varying graph.
:func:`make_topology` builds any of them by name. Every error is a one-line ``ValueError`` that starts
with the config path of the offending field, e.g. ``topology.name: unknown topology 'x'; ...``.

Numpy only, so that importing this module stays cheap.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

__all__ = ["Topology", "TOPOLOGIES", "complete", "erdos_renyi", "exponential", "from_adjacency",
           "make_topology", "one_peer_exponential", "ring", "star", "torus"]


@dataclass(frozen=True, eq=False)
class Topology:
    """An undirected graph on ``n`` agents.

    ``adjacency`` is a read-only ``(n, n)`` boolean matrix, symmetric with a false diagonal. ``t`` is the
    round of a time-varying graph (:func:`one_peer_exponential`), which need not be connected on its
    own; it is ``None`` for a static graph.
    """

    n: int
    adjacency: np.ndarray
    name: str
    t: int | None = None

    def __post_init__(self) -> None:
        _check_n(self.n)
        object.__setattr__(self, "n", int(self.n))
        adj = np.array(self.adjacency, copy=True)
        if adj.dtype != np.bool_:
            raise ValueError(f"topology.adjacency: must be a boolean matrix, got dtype {adj.dtype}")
        if adj.shape != (self.n, self.n):
            raise ValueError(f"topology.adjacency: must have shape ({self.n}, {self.n}), got {adj.shape}")
        if (adj != adj.T).any():
            i, j = np.argwhere(adj != adj.T)[0]
            raise ValueError(f"topology.adjacency: not symmetric: ({i}, {j}) is an edge but ({j}, {i}) "
                             "is not")
        if adj.diagonal().any():
            raise ValueError(f"topology.adjacency: self loop at node {int(np.argmax(adj.diagonal()))}")
        adj.setflags(write=False)
        object.__setattr__(self, "adjacency", adj)

    @property
    def degree(self) -> np.ndarray:
        """Degree of every node, shape ``(n,)``."""
        return self.adjacency.sum(axis=1)

    def neighbors(self, i: int) -> tuple[int, ...]:
        """Neighbors of node ``i`` in increasing order."""
        if not 0 <= i < self.n:
            raise IndexError(f"node {i} out of range [0, {self.n})")
        return tuple(int(j) for j in np.flatnonzero(self.adjacency[i]))

    def edges(self) -> tuple[tuple[int, int], ...]:
        """Every edge once, as ``(i, j)`` with ``i < j``, in lexicographic order."""
        return tuple((int(i), int(j)) for i, j in np.argwhere(np.triu(self.adjacency, k=1)))

    def n_components(self) -> int:
        """Number of connected components (breadth-first search)."""
        unseen, count = np.ones(self.n, dtype=bool), 0
        while unseen.any():
            count += 1
            frontier = np.zeros(self.n, dtype=bool)
            frontier[np.argmax(unseen)] = True
            while frontier.any():
                unseen &= ~frontier
                frontier = self.adjacency[frontier].any(axis=0) & unseen
        return count

    def is_connected(self) -> bool:
        """Whether the graph has a single connected component."""
        return self.n_components() == 1


def _check_n(n: Any) -> None:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"topology.n: must be an integer >= 1, got {n!r}")


def _circulant(n: int, offsets: list[int], name: str, t: int | None = None) -> Topology:
    """Node ``i`` is joined to ``i ± s (mod n)`` for every offset ``s``."""
    _check_n(n)
    diff = (np.arange(n)[None, :] - np.arange(n)[:, None]) % n
    steps = {s % n for s in offsets} | {-s % n for s in offsets}
    return Topology(n, np.isin(diff, sorted(steps - {0})), name, t)


def ring(n: int) -> Topology:
    """Cycle ``i ↔ i ± 1 (mod n)``: degree 2 (1 when ``n = 2``)."""
    return _circulant(n, [1], "ring")


def torus(n: int) -> Topology:
    """2-D torus (Cartesian product of two cycles) on a ``rows × cols`` grid, node ``r * cols + c``.

    ``rows`` is the largest divisor of ``n`` not above ``√n``, so the grid is as square as possible.
    When ``n`` is 1 or prime, ``rows = 1`` and the ``1 × n`` torus is the ring. Along a side of length 2
    both directions reach the same node, so degrees are 4, or fewer on 2-wide grids.
    """
    _check_n(n)
    rows = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    cols = n // rows
    adj = np.kron(ring(rows).adjacency, np.eye(cols, dtype=bool)) | np.kron(
        np.eye(rows, dtype=bool), ring(cols).adjacency)
    return Topology(n, adj, "torus")


def complete(n: int) -> Topology:
    """Every pair of agents is joined: degree ``n - 1``."""
    _check_n(n)
    return Topology(n, ~np.eye(n, dtype=bool), "complete")


def star(n: int) -> Topology:
    """Node 0 is the center, joined to every other node (which have degree 1)."""
    _check_n(n)
    adj = np.zeros((n, n), dtype=bool)
    adj[0, 1:] = adj[1:, 0] = True
    return Topology(n, adj, "star")


def exponential(n: int) -> Topology:
    """Static exponential graph: ``i ↔ i ± 2^k (mod n)`` for every ``2^k < n``.

    The undirected form of the graph of Stochastic Gradient Push (Assran et al., 2019, "Stochastic
    Gradient Push for Distributed Deep Learning", ICML). It is circulant: all degrees are equal, and
    ``2 log2(n) - 1`` when ``n`` is a power of two.
    """
    _check_n(n)
    return _circulant(n, [2**k for k in range(max(n - 1, 1).bit_length())], "exponential")


def one_peer_exponential(n: int, t: int = 0) -> Topology:
    """Round ``t`` of the one-peer exponential graph: ``i ↔ i ± 2^k (mod n)`` with ``k = t mod log2 n``.

    Time-varying (Ying et al., 2021, "Exponential Graph is Provably Efficient for Decentralized Deep
    Training", NeurIPS): the graph of a round with ``k ≥ 1`` has ``2^k`` components (the residues mod
    ``2^k``), but the union over ``log2 n`` consecutive rounds is :func:`exponential`. ``n`` must be a
    power of two; ``n = 1`` has no edges.
    """
    _check_n(n)
    if n & (n - 1):
        raise ValueError(f"topology.n: one_peer_exponential needs a power of two, got {n}")
    if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or t < 0:
        raise ValueError(f"topology.t: must be an integer >= 0, got {t!r}")
    period = max(n.bit_length() - 1, 1)
    return _circulant(n, [2 ** (t % period)] if n > 1 else [], "one_peer_exponential", int(t))


def erdos_renyi(n: int, p: float, seed: int = 0, max_attempts: int = 100) -> Topology:
    """Erdős–Rényi graph ``G(n, p)`` conditioned on being connected.

    Draw ``a = 0, 1, ...`` uses ``numpy.random.default_rng((seed, a))`` (independent streams, so seeds
    ``s`` and ``s + 1`` never share a draw); the first connected draw is returned, and after
    ``max_attempts`` disconnected draws a ``ValueError`` suggests a larger ``p``.
    """
    _check_n(n)
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
        raise ValueError(f"topology.p: must be a number in [0, 1], got {p!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"topology.seed: must be an integer >= 0, got {seed!r}")
    for attempt in range(max_attempts):
        upper = np.triu(np.random.default_rng((int(seed), attempt)).random((n, n)) < p, k=1)
        graph = Topology(n, upper | upper.T, "erdos_renyi")
        if graph.is_connected():
            return graph
    raise ValueError(f"topology.p: no connected G({n}, {p}) in {max_attempts} draws from seed {seed}; "
                     f"raise p above the connectivity threshold ln(n)/n = {math.log(n) / n:.3g}")


def from_adjacency(adjacency: Any) -> Topology:
    """A graph from a square, symmetric 0/1 (or boolean) matrix with a zero diagonal."""
    adj = np.asarray(adjacency)
    if adj.ndim != 2 or adj.shape[0] != adj.shape[1] or adj.shape[0] < 1:
        raise ValueError(f"topology.adjacency: must be a non-empty square matrix, got shape {adj.shape}")
    if adj.dtype != np.bool_:
        if adj.dtype.kind not in "iuf":
            raise ValueError(f"topology.adjacency: entries must be 0/1 or boolean, got dtype {adj.dtype}")
        bad = adj[~np.isin(adj, (0, 1))]
        if bad.size:
            raise ValueError(f"topology.adjacency: entries must be 0/1 or boolean, got {bad[0].item()!r}")
        adj = adj.astype(bool)
    return Topology(adj.shape[0], adj, "custom")


def _custom(n: int, adjacency: Any) -> Topology:
    """:func:`from_adjacency`, checking that the matrix has ``n`` rows."""
    _check_n(n)
    graph = from_adjacency(adjacency)
    if graph.n != n:
        raise ValueError(f"topology.n: {n} does not match the {graph.n}×{graph.n} adjacency")
    return graph


#: name -> builder; every builder takes ``n`` first
TOPOLOGIES: dict[str, Callable[..., Topology]] = {
    "ring": ring, "torus": torus, "complete": complete, "star": star, "exponential": exponential,
    "erdos_renyi": erdos_renyi, "one_peer_exponential": one_peer_exponential,
    "custom": _custom,
}


def make_topology(name: str, n: int, **kwargs: Any) -> Topology:
    """Build the topology registered as ``name`` on ``n`` agents; ``kwargs`` go to its builder
    (``p``/``seed`` for ``erdos_renyi``, ``t`` for ``one_peer_exponential``, ``adjacency`` for ``custom``).
    """
    if name not in TOPOLOGIES:
        raise ValueError(f"topology.name: unknown topology {name!r}; available: {', '.join(TOPOLOGIES)}")
    params = list(inspect.signature(TOPOLOGIES[name]).parameters.values())[1:]
    allowed = [q.name for q in params]
    for key in kwargs:
        if key not in allowed:
            raise ValueError(f"topology.{key}: unknown option for {name}; allowed: "
                             f"{', '.join(allowed) or 'none'}")
    for q in params:
        if q.default is inspect.Parameter.empty and q.name not in kwargs:
            raise ValueError(f"topology.{q.name}: required for {name}")
    return TOPOLOGIES[name](n, **kwargs)

"""Communication graphs (bilevel_ray.decentralized.topology) and gossip weights (.mixing)."""

import math
import pickle

import numpy as np
import pytest

from bilevel_ray.decentralized.mixing import (SCHEMES, lazy, make_mixing, metropolis_hastings,
                                              second_eigenvalue_modulus, spectral_gap, uniform, validate)
from bilevel_ray.decentralized.topology import (TOPOLOGIES, Topology, complete, erdos_renyi, exponential,
                                                from_adjacency, make_topology, one_peer_exponential, ring,
                                                star, torus)

SIZES = [1, 2, 5, 8, 16]


def _build(name: str, n: int) -> Topology:
    kwargs = {"erdos_renyi": {"p": 0.5, "seed": 3}, "custom": {"adjacency": ring(n).adjacency.astype(int)},
              "one_peer_exponential": {"t": 1}}.get(name, {})
    return make_topology(name, n, **kwargs)


def _cases():
    for name in TOPOLOGIES:
        for n in SIZES:
            if name == "one_peer_exponential" and n & (n - 1):
                continue
            yield name, n


def _exp_offsets(n: int) -> set[int]:
    return {s % n for k in range(n) if 2**k < n for s in (2**k, -(2**k))} - {0}


@pytest.mark.parametrize("name,n", list(_cases()))
def test_builder_is_a_simple_connected_graph(name, n):
    g = _build(name, n)
    a = g.adjacency
    assert g.n == n and a.shape == (n, n) and a.dtype == bool
    assert (a == a.T).all() and not a.diagonal().any()
    assert g.degree.tolist() == [len(g.neighbors(i)) for i in range(n)]
    assert 2 * len(g.edges()) == a.sum() and all(i < j and a[i, j] for i, j in g.edges())
    if name == "one_peer_exponential":
        assert g.t == 1 and g.n_components() == (2 if n >= 4 else 1)  # i ± 2 splits even/odd nodes
    else:
        assert g.t is None and g.is_connected()


@pytest.mark.parametrize("n", SIZES + [33])
def test_expected_degrees(n):
    assert ring(n).degree.tolist() == [min(2, n - 1)] * n
    assert complete(n).degree.tolist() == [n - 1] * n
    assert star(n).degree.tolist() == [n - 1] + [1] * (n - 1)
    assert exponential(n).degree.tolist() == [len(_exp_offsets(n))] * n
    for i in range(n):
        assert exponential(n).neighbors(i) == tuple(sorted((i + s) % n for s in _exp_offsets(n)))
    if n > 1 and n & (n - 1) == 0:
        assert exponential(n).degree[0] == 2 * int(math.log2(n)) - 1


def test_torus_3x4_neighbors():
    g = torus(12)  # most square factorization: 3 rows × 4 columns, node r * 4 + c
    for r in range(3):
        for c in range(4):
            want = {((r + 1) % 3) * 4 + c, ((r - 1) % 3) * 4 + c, r * 4 + (c + 1) % 4, r * 4 + (c - 1) % 4}
            assert set(g.neighbors(r * 4 + c)) == want
    assert g.neighbors(0) == (1, 3, 4, 8) and g.neighbors(5) == (1, 4, 6, 9)
    assert torus(16).degree.tolist() == [4] * 16
    assert torus(8).degree.tolist() == [3] * 8  # 2 × 4: up and down are the same node
    assert torus(7).edges() == ring(7).edges()  # prime n: the 1 × n torus is the ring


@pytest.mark.parametrize("n", [1, 2, 4, 8, 16, 32])
def test_one_peer_exponential_union_is_exponential(n):
    period = max(int(math.log2(n)), 1)
    rounds = [one_peer_exponential(n, t) for t in range(period)]
    union = np.logical_or.reduce([g.adjacency for g in rounds])
    assert (union == exponential(n).adjacency).all()
    assert Topology(n, union, "union").is_connected()
    for t, g in enumerate(rounds):
        k = 2**t % n
        assert g.degree.tolist() == [len({k, -k % n} - {0})] * n
        assert (one_peer_exponential(n, t + period).adjacency == g.adjacency).all()  # periodic


@pytest.mark.parametrize("n", [3, 6, 12])
def test_one_peer_exponential_needs_power_of_two(n):
    with pytest.raises(ValueError, match=rf"^topology\.n: one_peer_exponential needs a power of two, got {n}$"):
        one_peer_exponential(n, 0)


def test_erdos_renyi_seeded_and_connected():
    a, b = erdos_renyi(30, 0.2, seed=7), erdos_renyi(30, 0.2, seed=7)
    assert (a.adjacency == b.adjacency).all() and a.is_connected()
    others = [erdos_renyi(30, 0.2, seed=s) for s in range(8, 12)]
    assert all(g.is_connected() and (g.adjacency != a.adjacency).any() for g in others)
    with pytest.raises(ValueError, match=r"^topology\.p: no connected G\(10, 0\.0\) in 100 draws"):
        erdos_renyi(10, 0.0)
    with pytest.raises(ValueError, match=r"^topology\.p: must be a number in \[0, 1\], got 1\.5$"):
        erdos_renyi(10, 1.5)


def test_topology_errors():
    with pytest.raises(ValueError, match=r"^topology\.name: unknown topology 'grid'; available: ring, torus, "):
        make_topology("grid", 4)
    for bad in (0, -3, 2.0, True):
        with pytest.raises(ValueError, match=r"^topology\.n: must be an integer >= 1, got "):
            make_topology("ring", bad)
    with pytest.raises(ValueError, match=r"^topology\.p: required for erdos_renyi$"):
        make_topology("erdos_renyi", 5)
    with pytest.raises(ValueError, match=r"^topology\.p: unknown option for ring; allowed: none$"):
        make_topology("ring", 5, p=0.3)
    with pytest.raises(ValueError, match=r"^topology\.n: 4 does not match the 3×3 adjacency$"):
        make_topology("custom", 4, adjacency=np.ones((3, 3)) - np.eye(3))
    with pytest.raises(ValueError, match=r"^topology\.adjacency: not symmetric: \(0, 1\) is an edge but "
                                         r"\(1, 0\) is not$"):
        from_adjacency([[0, 1], [0, 0]])
    with pytest.raises(ValueError, match=r"^topology\.adjacency: self loop at node 1$"):
        from_adjacency(np.diag([0, 1, 0]))
    with pytest.raises(ValueError, match=r"^topology\.adjacency: entries must be 0/1 or boolean, got 2$"):
        from_adjacency([[0, 2], [2, 0]])
    with pytest.raises(ValueError, match=r"^topology\.adjacency: must be a non-empty square matrix"):
        from_adjacency(np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"^topology\.t: must be an integer >= 0, got -1$"):
        one_peer_exponential(4, -1)
    assert not ring(4).adjacency.flags.writeable
    assert pickle.loads(pickle.dumps(ring(5))).edges() == ring(5).edges()


@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("name,n", list(_cases()))
def test_every_scheme_on_every_topology(scheme, name, n):
    g = _build(name, n)
    m = make_mixing(g, scheme)
    validate(m.W, g, require_connected=g.t is None)
    assert np.allclose(m.W.sum(axis=0), 1, atol=1e-12) and np.allclose(m.W.sum(axis=1), 1, atol=1e-12)
    assert (m.W >= 0).all() and (m.W == m.W.T).all() and not m.W.flags.writeable
    assert (m.W[~g.adjacency & ~np.eye(n, dtype=bool)] == 0).all() and (m.W[g.adjacency] > 0).all()
    eig = np.linalg.eigvalsh(m.W)
    assert m.gap == pytest.approx(1 - max(np.abs(eig[:-1]), default=0.0), abs=1e-12)
    if g.t is None:
        assert m.gap > 0
    if scheme == "lazy_metropolis":
        assert eig.min() >= -1e-12


@pytest.mark.parametrize("n", [5, 8, 16, 33])
def test_ring_metropolis_gap_closed_form(n):
    w = metropolis_hastings(ring(n))
    assert np.allclose(w[ring(n).adjacency], 1 / 3) and np.allclose(np.diag(w), 1 / 3)
    lam2 = 1 / 3 + 2 / 3 * math.cos(2 * math.pi / n)
    want = 1 - lam2 if n % 2 else 1 - max(abs(lam2), 1 / 3)
    assert spectral_gap(w) == pytest.approx(want, abs=1e-12)
    assert second_eigenvalue_modulus(w) == pytest.approx(1 - want, abs=1e-12)


@pytest.mark.parametrize("n", [2, 5, 16])
def test_complete_uniform_is_exact_averaging(n):
    m = make_mixing(complete(n), "uniform")
    assert np.allclose(m.W, 1 / n) and m.gap == pytest.approx(1.0, abs=1e-12)
    assert spectral_gap(np.ones((1, 1))) == 1.0


def test_lazy_and_uniform():
    w = metropolis_hastings(star(6))
    assert np.allclose(lazy(w), (np.eye(6) + w) / 2) and np.allclose(lazy(w, 1.0), w)
    assert np.allclose(uniform(star(6))[0, 1:], 1 / 6) and np.allclose(uniform(star(6))[1, 1], 5 / 6)
    with pytest.raises(ValueError, match=r"^topology\.alpha: must be a number in \(0, 1\], got 0$"):
        lazy(w, 0)
    with pytest.raises(ValueError, match=r"^topology\.mixing: unknown scheme 'max'; available: metropolis, "):
        make_mixing(ring(4), "max")


def test_validate_rejects():
    g = ring(5)
    w = metropolis_hastings(g)
    validate(w, g)
    bad = w.copy()
    bad[0, 1] += 0.1
    bad[0, 0] -= 0.1
    with pytest.raises(ValueError, match=r"^topology\.weights: W is not symmetric \(max \|W - W\^T\| = 0\.1\)$"):
        validate(bad, g)
    with pytest.raises(ValueError, match=r"^topology\.weights: W is not doubly stochastic \(max row-sum error 0\.3"):
        validate(w + 0.3 * np.eye(5), g)
    neg = np.array([[-0.2, 0.6, 0.6], [0.6, 0.4, 0.0], [0.6, 0.0, 0.4]])
    with pytest.raises(ValueError, match=r"^topology\.weights: W has a negative entry -0\.2 at \(0, 0\)$"):
        validate(neg, complete(3))
    off = w.copy()
    off[0, 2] = off[2, 0] = 0.1
    off[0, 0] -= 0.1
    off[2, 2] -= 0.1
    with pytest.raises(ValueError, match=r"^topology\.weights: W puts weight 0\.1 on \(0, 2\), which is not an "
                                         r"edge of the ring graph$"):
        validate(off, g)
    two = from_adjacency(np.kron(np.eye(2), 1 - np.eye(3)))  # two triangles
    with pytest.raises(ValueError, match=r"^topology\.weights: the custom graph is disconnected \(2 components\)"):
        validate(metropolis_hastings(two), two)
    validate(metropolis_hastings(two), two, require_connected=False)
    with pytest.raises(ValueError, match=r"^topology\.weights: the nonzero entries of W form a disconnected graph "
                                         r"\(5 components\)"):
        validate(np.eye(5), g)
    with pytest.raises(ValueError, match=r"^topology\.weights: second-largest eigenvalue modulus is 1 \(W is "
                                         r"periodic\)"):
        validate(np.array([[0.0, 1.0], [1.0, 0.0]]), ring(2))
    with pytest.raises(ValueError, match=r"^topology\.weights: W must be 4×4 for 4 agents, got shape \(5, 5\)$"):
        validate(w, ring(4))
    with pytest.raises(ValueError, match=r"^topology\.weights: W must be a float matrix, got dtype int"):
        validate(np.eye(5, dtype=int), g)
    with pytest.raises(ValueError, match=r"^topology\.weights: W has 1 non-finite entries$"):
        validate(np.where(np.eye(5, dtype=bool) & (np.arange(5) == 0), np.nan, w), g)


def test_topology_mixing_schedules_pickle_and_cycle():
    import pickle

    from bilevel_ray.decentralized.gossip import TopologyMixing

    ring8 = TopologyMixing("ring", 8)
    assert np.array_equal(ring8(0), ring8(17))
    assert abs(ring8.spectral_gap - (1 - (1 / 3 + 2 / 3 * np.cos(2 * np.pi / 8)))) < 1e-12
    peer = pickle.loads(pickle.dumps(TopologyMixing("one_peer_exponential", 8)))
    mats = [peer(t) for t in range(6)]
    assert not np.array_equal(mats[0], mats[1]) and np.array_equal(mats[0], mats[3])
    assert peer.spectral_gap > 0  # one period mixes the whole network

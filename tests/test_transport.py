"""The shared-memory gossip transport, in one process: agents are threads, each with its own Transport."""

import errno
import glob
import os
import random
import threading
import uuid

import numpy as np
import pytest
import torch

from bilevel_ray.decentralized.gossip import TopologyMixing
from bilevel_ray.decentralized.transport import Transport, shm_dir


@pytest.fixture
def transports(request):
    n = request.param
    name = f"bilevel-ray-test-{uuid.uuid4().hex[:8]}"
    ts = [Transport(name, i) for i in range(n)]
    for t in ts:
        t.connect({}, dict.fromkeys(range(n), "one-node"))  # all on one node: shared memory only
    yield ts
    for t in ts:
        t.close()
    assert not glob.glob(os.path.join(shm_dir(), f"{name}-*")), "files left behind"


def run_agents(ts, mixing, x0, rounds, seed=0):
    """Every agent mixes for ``rounds`` rounds at its own uneven pace; returns each agent's iterates."""
    n = len(ts)
    out = [[None] * rounds for _ in range(n)]
    errors = []

    def agent(i):
        try:
            rng, x = random.Random(seed + i), x0[i].clone()
            for r in range(rounds):
                w = mixing(r)[i]
                nb = [j for j in range(n) if j != i and w[j] != 0]
                received = ts[i].exchange(r, x, nb)
                if rng.random() < 0.3:  # a slow reader: senders must not overwrite a slot it still reads
                    threading.Event().wait(rng.random() * 2e-3)
                mixed = x * float(w[i])
                for j, other in zip(nb, received):
                    mixed.add_(other, alpha=float(w[j]))
                ts[i].release(r, nb)
                out[i][r] = x = mixed
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=agent, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    return out


@pytest.mark.parametrize("transports", [4, 8], indirect=True)
@pytest.mark.parametrize("topology", ["ring", "one_peer_exponential"])
def test_shared_memory_gossip_is_w_x_every_round(transports, topology):
    """Static and time-varying graphs (neighbours change every round): every round equals W_r X_r."""
    n, d, rounds = len(transports), 1000, 80
    mixing = TopologyMixing(topology, n)
    x = torch.randn(n, d, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = run_agents(transports, mixing, x, rounds)
    for r in range(rounds):
        x = torch.tensor(mixing(r)) @ x
        got = torch.stack([out[i][r] for i in range(n)])
        assert float((got - x).abs().max()) <= 1e-12, r
    if topology == "ring":
        assert all(t.bytes_sent == rounds * 2 * d * 8 for t in transports)


@pytest.mark.parametrize("transports", [2], indirect=True)
def test_abort_wakes_a_round_waiting_for_a_dead_neighbour(transports):
    a, _ = transports
    threading.Timer(0.2, a.abort).start()  # the neighbour never sends
    with pytest.raises(RuntimeError, match="aborted"):
        a.exchange(0, torch.zeros(10), [1])
    a.reset(1)  # a new epoch drops the old abort and the old round
    b = transports[1]
    b.reset(1)
    got = run_agents(transports, TopologyMixing("complete", 2), torch.eye(2, dtype=torch.float64), 3)
    assert torch.allclose(got[0][2], torch.full((2,), 0.5, dtype=torch.float64))


@pytest.mark.parametrize("transports", [2], indirect=True)
def test_full_shared_memory_falls_back_instead_of_crashing(transports, monkeypatch):
    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_space)
    assert transports[0]._own_slots(np.zeros(1000, dtype=np.float32)) is None  # → object store path

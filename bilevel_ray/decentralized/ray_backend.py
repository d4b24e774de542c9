"""Ray backend: one actor per agent, gossip through the object store.

Each agent actor holds its own problem shard and algorithm state and runs the *same* ``step`` as the
other backends; its ``mix`` flattens the iterate into one contiguous numpy buffer, ``ray.put``s it
once, hands the reference to each neighbour's ``deliver`` (the neighbour reads it zero-copy from the
object store) and waits for the neighbours' buffers of the same gossip round. Actors are threaded
(``max_concurrency``) so ``deliver`` runs while ``step`` waits. Actors are placed with a placement
group of one CPU bundle per agent (``SPREAD`` across nodes by default).
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

import numpy as np
import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from bilevel_ray.decentralized.data import AgentProblem
from bilevel_ray.tree import PyTree

__all__ = ["RayBackend", "AgentWorker"]


class AgentWorker:
    """The body of one agent actor (a thin shell: the algorithm step does the work)."""

    def __init__(self, algo: Any, problem: AgentProblem, rank: int, n: int,
                 mixing_at: Callable[[int], np.ndarray], seed: int, torch_threads: int = 1):
        torch.set_num_threads(torch_threads)
        self.algo, self.problem, self.rank, self.n = algo, problem, rank, n
        self.mixing_at = mixing_at
        x, y = problem.init(seed=seed)
        self.state = algo.init(problem, x, y, seed=seed, rank=rank)
        self.peers: dict[int, Any] = {}
        self.mailbox: dict[tuple[int, int], np.ndarray] = {}
        self.cond = threading.Condition()
        self.gossip_round = 0
        self.bytes_sent = 0

    def set_peers(self, peers: dict[int, Any]) -> None:
        self.peers = peers

    def deliver(self, gossip_round: int, src: int, payload: np.ndarray) -> None:
        with self.cond:
            self.mailbox[(gossip_round, src)] = payload
            self.cond.notify_all()

    def _mix(self, w_row: np.ndarray) -> Callable[[PyTree], PyTree]:
        import ray

        neighbors = [j for j in range(self.n) if j != self.rank and w_row[j] != 0]

        def mix(tree: PyTree) -> PyTree:
            leaves, spec = tree_flatten(tree)
            buf = np.concatenate([t.detach().reshape(-1).numpy() for t in leaves])
            r = self.gossip_round
            self.gossip_round += 1
            if neighbors:
                ref = ray.put(buf)
                for j in neighbors:
                    self.peers[j].deliver.remote(r, self.rank, ref)
                self.bytes_sent += buf.nbytes * len(neighbors)
            with self.cond:
                self.cond.wait_for(lambda: all((r, j) in self.mailbox for j in neighbors))
                received = [self.mailbox.pop((r, j)) for j in neighbors]
            out = w_row[self.rank] * buf
            for j, other in zip(neighbors, received):
                out = out + w_row[j] * other
            pieces, i = [], 0
            for t in leaves:
                pieces.append(torch.from_numpy(out[i:i + t.numel()].reshape(t.shape)).to(t.dtype))
                i += t.numel()
            return tree_unflatten(pieces, spec)

        return mix

    def step(self) -> dict[str, float]:
        start, sent = time.perf_counter(), self.bytes_sent
        w = np.asarray(self.mixing_at(self.state.t), dtype=np.float64)
        self.state = self.algo.step(self.state, self.problem, self._mix(w[self.rank]))
        return {"bytes": self.bytes_sent - sent, "seconds": time.perf_counter() - start}

    def get_state(self) -> Any:
        return self.state

    def node_id(self) -> str:
        import ray
        return ray.get_runtime_context().get_node_id()


class RayBackend:
    """Drives ``n`` agent actors in synchronous rounds on the connected Ray cluster."""

    name = "ray"

    def __init__(self, algo: Any, agents: list[AgentProblem], mixing_at: Callable[[int], np.ndarray], *,
                 seed: int, strategy: str = "SPREAD", cpus_per_agent: float = 1.0):
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        if not ray.is_initialized():
            raise RuntimeError("decentralized.backend: ray needs a connected Ray cluster (ray.init or run.address)")
        self.n = len(agents)
        self.pg = placement_group([{"CPU": cpus_per_agent}] * self.n, strategy=strategy)
        ray.get(self.pg.ready(), timeout=120)
        actor_cls = ray.remote(AgentWorker)
        self.actors = [
            actor_cls.options(num_cpus=cpus_per_agent, max_concurrency=4, scheduling_strategy=
                              PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i)
                              ).remote(algo, agent, i, self.n, mixing_at, seed)
            for i, agent in enumerate(agents)]
        ray.get([a.set_peers.remote(dict(enumerate(self.actors))) for a in self.actors])
        self.bytes_last_round = 0
        self.latency_last_round = 0.0

    def step(self) -> None:
        import ray

        start = time.perf_counter()
        reports = ray.get([a.step.remote() for a in self.actors])
        self.latency_last_round = time.perf_counter() - start
        self.bytes_last_round = int(sum(r["bytes"] for r in reports))

    def states(self) -> list[Any]:
        import ray
        return ray.get([a.get_state.remote() for a in self.actors])

    def node_ids(self) -> list[str]:
        import ray
        return ray.get([a.node_id.remote() for a in self.actors])

    def close(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for a in self.actors:
            ray.kill(a)
        remove_placement_group(self.pg)

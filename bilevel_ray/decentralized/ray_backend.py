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
import uuid
import warnings
from typing import Any, Callable

import numpy as np
import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from bilevel_ray.decentralized.backends import AgentFailure
from bilevel_ray.decentralized.data import AgentProblem
from bilevel_ray.tree import PyTree

__all__ = ["RayBackend", "AgentWorker"]

#: buffers up to this size are sent inline with the ``deliver`` call instead of through ``ray.put``
INLINE_BYTES = 100 * 1024


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
        self.mailbox: dict[tuple[int, int, int], np.ndarray] = {}
        self.cond = threading.Condition()
        self.epoch = 0  # bumped at every restore: messages of an aborted round are dropped
        self.gossip_round = 0
        self.aborted = False
        self.bytes_sent = 0

    def set_peers(self, peers: dict[int, Any]) -> None:
        self.peers = peers

    def deliver(self, epoch: int, gossip_round: int, src: int, payload: np.ndarray) -> None:
        with self.cond:
            if epoch == self.epoch:
                self.mailbox[(epoch, gossip_round, src)] = payload
                self.cond.notify_all()

    def abort(self) -> None:
        """Make a step blocked on a dead neighbour give up (it raises)."""
        with self.cond:
            self.aborted = True
            self.cond.notify_all()

    def load_state(self, state: Any, epoch: int) -> None:
        """Restart from ``state`` in a new gossip epoch (after a failure or on resume)."""
        with self.cond:
            self.state, self.epoch, self.gossip_round, self.aborted = state, epoch, 0, False
            self.mailbox.clear()

    def _mix(self, w_row: np.ndarray) -> Callable[[PyTree], PyTree]:
        import ray

        neighbors = [j for j in range(self.n) if j != self.rank and w_row[j] != 0]
        # Python floats: an np.float64 weight would promote float32 buffers to float64 (NEP 50)
        w_self, w_nb = float(w_row[self.rank]), [float(w_row[j]) for j in neighbors]

        def mix(tree: PyTree) -> PyTree:
            leaves, spec = tree_flatten(tree)
            flats = [t.detach().reshape(-1) for t in leaves]
            flat = flats[0] if len(flats) == 1 else torch.cat(flats)
            buf = flat.numpy()
            e, r = self.epoch, self.gossip_round
            self.gossip_round += 1
            if neighbors:
                # small buffers travel inline with the call; large ones once through the object store
                payload = buf if buf.nbytes <= INLINE_BYTES else ray.put(buf)
                for j in neighbors:
                    self.peers[j].deliver.remote(e, r, self.rank, payload)
                self.bytes_sent += buf.nbytes * len(neighbors)
            with self.cond:
                self.cond.wait_for(lambda: self.aborted or all((e, r, j) in self.mailbox for j in neighbors))
                if self.aborted:
                    raise RuntimeError(f"agent {self.rank}: round aborted (a neighbour failed)")
                received = [self.mailbox.pop((e, r, j)) for j in neighbors]
            out = torch.mul(flat, w_self)
            with warnings.catch_warnings():  # object-store arrays are read-only; they are only read here
                warnings.simplefilter("ignore", UserWarning)
                for w, other in zip(w_nb, received):
                    out.add_(torch.from_numpy(other), alpha=w)
            pieces = [p.view(t.shape) for p, t in zip(out.split([t.numel() for t in leaves]), leaves)]
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
                 seed: int, strategy: str = "SPREAD", cpus_per_agent: float = 1.0, max_restarts: int = 3,
                 name: str | None = None, owns_ray: bool = False):
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        if not ray.is_initialized():
            raise RuntimeError("decentralized.backend: ray needs a connected Ray cluster (ray.init or run.address)")
        self.n = len(agents)
        self.pg = placement_group([{"CPU": cpus_per_agent}] * self.n, strategy=strategy)
        ray.get(self.pg.ready(), timeout=120)
        actor_cls = ray.remote(AgentWorker)
        self.name = name or f"bilevel-ray-{uuid.uuid4().hex[:8]}"
        # constructor arguments live in the object store, held here so Ray can re-run a restarted
        # actor's constructor (inline arguments would be freed after the first construction)
        algo_ref, mixing_ref = ray.put(algo), ray.put(mixing_at)
        self._args = [(algo_ref, ray.put(agent), mixing_ref) for agent in agents]
        self.actors = [
            actor_cls.options(num_cpus=cpus_per_agent, max_concurrency=4, max_restarts=max_restarts,
                              name=f"{self.name}-agent-{i}", scheduling_strategy=
                              PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i)
                              ).remote(a, p, i, self.n, m, seed)
            for i, (a, p, m) in enumerate(self._args)]
        ray.get([a.set_peers.remote(dict(enumerate(self.actors))) for a in self.actors])
        self.owns_ray = owns_ray  # close() also shuts down the Ray session this run started
        self.epoch = 0
        self.bytes_last_round = 0
        self.latency_last_round = 0.0

    def step(self) -> None:
        """One synchronous round. If an agent dies, the survivors abort the round, Ray restarts the
        dead actor, and :class:`AgentFailure` asks the caller for states to restart from."""
        import ray
        from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError

        start = time.perf_counter()
        pending = [a.step.remote() for a in self.actors]
        reports, failed = [], False
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            try:
                reports.append(ray.get(done[0]))
            except (RayActorError, RayTaskError, ActorUnavailableError):
                if not failed:
                    failed = True
                    for a in self.actors:
                        a.abort.remote()  # a restarted actor runs this harmlessly before load_state
        if failed:
            self._rewire()
            raise AgentFailure("an agent actor failed during the round and was restarted")
        self.latency_last_round = time.perf_counter() - start
        self.bytes_last_round = int(sum(r["bytes"] for r in reports))

    def _rewire(self, timeout: float = 120.0) -> None:
        """Wait for restarted actors to come back and give every actor its peers again."""
        import ray
        from ray.exceptions import ActorUnavailableError

        deadline = time.monotonic() + timeout
        while True:
            try:
                ray.get([a.set_peers.remote(dict(enumerate(self.actors))) for a in self.actors], timeout=timeout)
                return
            except ActorUnavailableError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def load_states(self, states: list[Any]) -> None:
        self.epoch += 1
        self._on_all(lambda i, a: a.load_state.remote(states[i], self.epoch))

    def states(self) -> list[Any]:
        return self._on_all(lambda i, a: a.get_state.remote())

    def _on_all(self, call: Callable[[int, Any], Any]) -> list[Any]:
        """``call`` on every actor; a dead actor turns into :class:`AgentFailure` once it is back."""
        import ray
        from ray.exceptions import ActorUnavailableError, RayActorError

        try:
            return ray.get([call(i, a) for i, a in enumerate(self.actors)])
        except (RayActorError, ActorUnavailableError):
            self._rewire()
            raise AgentFailure("an agent actor failed and was restarted") from None

    def node_ids(self) -> list[str]:
        import ray
        return ray.get([a.node_id.remote() for a in self.actors])

    def close(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        try:
            for a in self.actors:
                ray.kill(a)
            remove_placement_group(self.pg)
        finally:
            if self.owns_ray:
                ray.shutdown()

"""Ray backend: one actor per agent, gossip through shared memory on a node and the object store across.

Each agent actor holds its own problem shard and algorithm state and runs the *same* ``step`` as the
other backends; its ``mix`` flattens the iterate into one contiguous buffer and swaps it with its
neighbours through a :class:`~bilevel_ray.decentralized.transport.Transport` (same-node peers read the
buffer from shared memory, peers on other nodes zero-copy from the object store), then forms the
weighted sum. Actors are threaded (``max_concurrency``) so ``deliver`` and ``abort`` run while
``step`` waits. Actors are placed with a placement group of one CPU bundle per agent (``SPREAD``
across nodes by default).
"""

from __future__ import annotations

import contextlib
import glob
import os
import time
import uuid
from typing import Any, Callable

import numpy as np
import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from bilevel_ray.device import resolve_device, to_device
from bilevel_ray.decentralized.failures import AgentFailure, AgentRestarted
from bilevel_ray.decentralized.data import AgentProblem
from bilevel_ray.decentralized.transport import RoundAborted, Transport, shm_dir
from bilevel_ray.decentralized.placement import start
from bilevel_ray.problem import bind, capability
from bilevel_ray.runtime import prepare_process
from bilevel_ray.tree import PyTree

__all__ = ["RayBackend", "AgentWorker", "bundle"]


def bundle(cpus: float, gpus: float) -> dict[str, float]:
    """A placement-group bundle of ``cpus`` CPUs and ``gpus`` of a GPU (no ``GPU`` key when 0, so that
    the bundle fits nodes without one)."""
    return {"CPU": cpus, **({"GPU": gpus} if gpus else {})}


def _measured(problem: Any, name: str) -> Any:
    """The task's ``timings`` (seconds per phase, e.g. rollouts) or ``counts`` (e.g. environment steps),
    which it adds to as it works; an empty mapping for a task without them."""
    value = capability(problem, name)
    return {} if value is None else value


class AgentWorker:
    """The body of one agent actor (a thin shell: the algorithm step does the work)."""

    def __init__(self, rank: int, n: int, seed: int, *, name: str, transport: str = "auto", torch_threads: int = 1,
                 device: str = "cpu", dtype: str = "float32"):
        prepare_process(torch_threads)
        self.rank, self.n, self.seed = rank, n, seed
        self.device_spec, self.dtype = device, dtype
        self.algo: Any = None
        self.transport = Transport(name, rank, transport)
        self.gossip_round, self.gossip_seconds = 0, 0.0

    def setup(self, parts: list[Any]) -> None:
        """Build this agent from object refs of ``[algorithm, its problem, mixing schedule]``, once (a
        restarted actor is set up again by the driver, then loads the states to replay from)."""
        if self.algo is not None:
            return
        import ray

        # the device this actor sees (its share of a GPU is cuda:0 here); the problem arrives on the CPU
        self.device = resolve_device(self.device_spec)
        algo, problem, self.mixing_at = ray.get(parts)
        self.problem, self.state = start(algo, to_device(problem, self.device), seed=self.seed, rank=self.rank,
                                         device=self.device, dtype=self.dtype)
        self.algo = algo

    def placement(self) -> dict[str, Any]:
        """Where this agent computes: its device, the GPU ids Ray assigned it and ``CUDA_VISIBLE_DEVICES``."""
        import ray

        return {"device": str(self.device), "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}

    def set_peers(self, peers: dict[int, Any], nodes: dict[int, str]) -> None:
        """Neighbour handles and the node each runs on (same-node peers gossip through shared memory)."""
        self.transport.connect(peers, nodes)

    def deliver(self, epoch: int, gossip_round: int, src: int, payload: np.ndarray) -> None:
        """Receive neighbour ``src``'s buffer of a gossip round sent through the object store."""
        self.transport.deliver(epoch, gossip_round, src, payload)

    def abort(self) -> None:
        """Make a step blocked on a dead neighbour give up (it raises)."""
        self.transport.abort()

    def load_state(self, state: Any, epoch: int) -> None:
        """Restart from ``state`` in a new gossip epoch (after a failure or on resume)."""
        self.state, self.gossip_round = to_device(state, self.device), 0
        self.transport.reset(epoch)

    def shutdown(self) -> None:
        """Remove this agent's shared-memory files (the actor is killed right after)."""
        self.transport.close()

    def _mix(self, w_row: np.ndarray) -> Callable[[PyTree], PyTree]:
        neighbors = [j for j in range(self.n) if j != self.rank and w_row[j] != 0]
        # Python floats: an np.float64 weight would promote float32 buffers to float64 (NEP 50)
        w_self, w_nb = float(w_row[self.rank]), [float(w_row[j]) for j in neighbors]

        def mix(tree: PyTree) -> PyTree:
            leaves, spec = tree_flatten(tree)
            flats = [t.detach().reshape(-1) for t in leaves]
            flat = flats[0] if len(flats) == 1 else torch.cat(flats)
            device = flat.device
            flat = flat.cpu()  # buffers travel through host memory (a no-op on the CPU)
            r = self.gossip_round
            self.gossip_round += 1
            start = time.perf_counter()
            received = self.transport.exchange(r, flat, neighbors)
            self.gossip_seconds += time.perf_counter() - start
            out = torch.mul(flat, w_self)
            for w, other in zip(w_nb, received):
                out.add_(other, alpha=w)
            self.transport.release(r, neighbors)
            out = out.to(device)
            pieces = [p.view(t.shape) for p, t in zip(out.split([t.numel() for t in leaves]), leaves)]
            return tree_unflatten(pieces, spec)

        return mix

    def step(self) -> dict[str, Any]:
        """One round; reports the bytes sent, the round's seconds, those spent exchanging with neighbours
        (``gossip``, waiting for them included), the task's own phases (``phases``, e.g. rollouts) and the
        round's increments of the task's ``counts`` (e.g. environment steps)."""
        self._check_setup()
        tr = self.transport
        start, sent, shared = time.perf_counter(), tr.bytes_sent, tr.bytes_shared
        timings, counts = _measured(self.problem, "timings"), _measured(self.problem, "counts")
        before, counted = dict(timings), dict(counts)
        self.gossip_seconds = 0.0
        w = np.asarray(self.mixing_at(self.state.t), dtype=np.float64)
        self.state = self.algo.step(self.state, bind(self.problem, self.state), self._mix(w[self.rank]))
        return {"bytes": tr.bytes_sent - sent, "shared": tr.bytes_shared - shared,
                "seconds": time.perf_counter() - start, "gossip": self.gossip_seconds,
                "phases": {k: v - before.get(k, 0.0) for k, v in timings.items()},
                "counts": {k: v - counted.get(k, 0) for k, v in counts.items()}}

    def get_state(self) -> Any:
        """This agent's algorithm state, on the CPU (a driver without a GPU can read it)."""
        self._check_setup()
        return to_device(self.state, "cpu")

    def _check_setup(self) -> None:
        if self.algo is None:
            raise AgentRestarted(f"agent {self.rank}: restarted by Ray and not set up again yet")

    def node_id(self) -> str:
        """Id of the Ray node this actor runs on."""
        import ray
        return ray.get_runtime_context().get_node_id()


class RayBackend:
    """Drives ``n`` agent actors in synchronous rounds on the connected Ray cluster."""

    name = "ray"

    def __init__(self, algo: Any, agents: list[AgentProblem], mixing_at: Callable[[int], np.ndarray], *,
                 seed: int, strategy: str = "SPREAD", cpus_per_agent: float = 1.0, max_restarts: int = 3,
                 name: str | None = None, transport: str = "auto", owns_ray: bool = False,
                 placement_group: Any = None, first_bundle: int = 0, gpus_per_agent: float = 0.0,
                 device: str = "cpu", dtype: str = "float32", driver_device: torch.device | str = "cpu"):
        """``placement_group``: place agent ``i`` in bundle ``first_bundle + i`` of this existing group
        (a Tune trial's, see :mod:`bilevel_ray.tune`) instead of creating one with ``strategy``.
        ``gpus_per_agent``: the GPU share each agent asks Ray for (fractional: agents share a GPU);
        ``device``: the ``run.device`` each agent resolves in its actor; ``dtype``: ``run.dtype``; ``driver_device``: where
        :meth:`states` puts the agents' states for the driver."""
        import ray
        import ray.util
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        if not ray.is_initialized():
            raise RuntimeError("decentralized.backend: ray needs a connected Ray cluster (ray.init or run.address)")
        self.n = len(agents)
        self.driver_device = torch.device(driver_device)
        # the driver's task (metrics, learner), on the driver's device: the agents' counts (a task's
        # ``counts``, e.g. environment steps) add up in it, as they do where the agents run in this process
        self.task = to_device(getattr(agents[0], "task", agents[0]), self.driver_device)
        self.owns_pg = placement_group is None
        self.pg = placement_group or ray.util.placement_group([bundle(cpus_per_agent, gpus_per_agent)] * self.n,
                                                              strategy=strategy)
        ray.get(self.pg.ready(), timeout=120)
        actor_cls = ray.remote(AgentWorker)
        self.name = name or f"bilevel-ray-{uuid.uuid4().hex[:8]}"
        # what an agent is built from lives in the object store, held here for as long as the backend:
        # _rewire hands it to new and restarted actors (constructors take no object refs, which Ray
        # could not guarantee to a restarted actor)
        algo_ref, mixing_ref = ray.put(algo), ray.put(mixing_at)
        self._parts = [[algo_ref, ray.put(agent), mixing_ref] for agent in agents]
        self.actors = [
            actor_cls.options(num_cpus=cpus_per_agent, num_gpus=gpus_per_agent, max_concurrency=4, max_restarts=max_restarts,
                              name=f"{self.name}-agent-{i}", scheduling_strategy=
                              PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=first_bundle + i)
                              ).remote(i, self.n, seed, name=self.name, transport=transport, device=device,
                                       dtype=dtype)
            for i in range(self.n)]
        self._rewire()
        self.owns_ray = owns_ray  # close() also shuts down the Ray session this run started
        self.epoch = 0
        self.bytes_last_round = self.bytes_shared_last_round = 0
        self.latency_last_round = self.gossip_last_round = 0.0
        self.phases_last_round: dict[str, float] = {}

    def step(self) -> None:
        """One synchronous round. If an agent's actor or node dies, the survivors abort the round, Ray
        restarts the dead actor, and :class:`AgentFailure` asks the caller for states to restart from.
        An exception raised inside an agent's step (a bug, a bad plug-in) aborts the round too, and is
        raised here as itself, with the agent's traceback."""
        import ray
        from ray.exceptions import ActorUnavailableError, RayActorError

        start = time.perf_counter()
        pending = [a.step.remote() for a in self.actors]
        reports, errors = [], []
        dead = aborted = False
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            try:
                reports.append(ray.get(done[0]))
                continue
            except (RayActorError, ActorUnavailableError, AgentRestarted):
                dead = True
            except Exception as e:  # noqa: BLE001 - raised below unless a dead actor explains it
                errors.append(e)
            if not aborted:  # the first failure: wake every agent waiting on a neighbour
                aborted = True
                for a in self.actors:
                    a.abort.remote()  # a restarted actor runs this harmlessly before load_state
        if dead:
            self._rewire()
            raise AgentFailure("an agent actor died during the round and was restarted")
        if errors:
            cause = next((e for e in errors if not isinstance(e, RoundAborted)), errors[0])
            raise cause
        self.latency_last_round = time.perf_counter() - start
        self.bytes_last_round = int(sum(r["bytes"] for r in reports))
        self.bytes_shared_last_round = int(sum(r["shared"] for r in reports))  # through shared memory
        # per agent, averaged: seconds exchanging with neighbours, and the task's phases (profiles)
        self.gossip_last_round = sum(r["gossip"] for r in reports) / len(reports)
        self.phases_last_round = {k: sum(r["phases"].get(k, 0.0) for r in reports) / len(reports)
                                  for k in reports[0]["phases"]}
        counts = capability(self.task, "counts")
        if counts is not None:
            for r in reports:
                counts.update(r["counts"])

    def _rewire(self, timeout: float = 120.0) -> None:
        """Wait for (restarted) actors to come up, set up those that are new, and give every actor its
        peers and their nodes."""
        import ray
        from ray.exceptions import ActorUnavailableError

        deadline = time.monotonic() + timeout
        while True:
            try:
                ray.get([a.setup.remote(p) for a, p in zip(self.actors, self._parts)], timeout=timeout)
                nodes = dict(enumerate(ray.get([a.node_id.remote() for a in self.actors], timeout=timeout)))
                peers = dict(enumerate(self.actors))
                ray.get([a.set_peers.remote(peers, nodes) for a in self.actors], timeout=timeout)
                return
            except ActorUnavailableError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def load_states(self, states: list[Any]) -> None:
        """Restart agent ``i`` from ``states[i]`` in a new gossip epoch."""
        self.epoch += 1
        self._on_all(lambda i, a: a.load_state.remote(states[i], self.epoch))

    def states(self) -> list[Any]:
        """Every agent's state, fetched from its actor, on the driver's device."""
        return to_device(self._on_all(lambda i, a: a.get_state.remote()), self.driver_device)

    def placements(self) -> list[dict[str, Any]]:
        """Each agent's device, assigned GPU ids and ``CUDA_VISIBLE_DEVICES`` (see :meth:`AgentWorker.placement`)."""
        return self._on_all(lambda i, a: a.placement.remote())

    def _on_all(self, call: Callable[[int, Any], Any]) -> list[Any]:
        """``call`` on every actor; a dead actor turns into :class:`AgentFailure` once it is back."""
        import ray
        from ray.exceptions import ActorUnavailableError, RayActorError

        try:
            return ray.get([call(i, a) for i, a in enumerate(self.actors)])
        except (RayActorError, ActorUnavailableError, AgentRestarted):
            self._rewire()
            raise AgentFailure("an agent actor failed and was restarted") from None

    def node_ids(self) -> list[str]:
        """The Ray node of each agent's actor."""
        import ray
        return ray.get([a.node_id.remote() for a in self.actors])

    def close(self) -> None:
        """Kill the actors, remove their placement group (if owned) and shared-memory files, and shut down Ray
        if this run started it."""
        import ray
        from ray.util.placement_group import remove_placement_group

        try:
            try:  # agents remove their shared-memory files; a dead agent's are removed below
                ray.get([a.shutdown.remote() for a in self.actors], timeout=30)
            except Exception:  # noqa: BLE001 - the actors are killed anyway
                pass
            for a in self.actors:
                ray.kill(a)
            if self.owns_pg:
                remove_placement_group(self.pg)
            for path in glob.glob(os.path.join(shm_dir(), f"{self.name}-*")):  # driver on the agents' node
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        finally:
            if self.owns_ray:
                ray.shutdown()

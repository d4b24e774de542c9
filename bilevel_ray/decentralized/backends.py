"""One interface over the three ways to run a config: a single process, the vectorized N-agent
simulation and Ray actors. Each backend has ``step()`` (one outer round for every agent),
``states()`` (per-agent states), ``bytes_last_round``, ``latency_last_round``, ``gossip_last_round``
(seconds an agent spent mixing with its neighbours) and ``close()``.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from torch.utils._pytree import tree_map

from bilevel_ray import tree
from bilevel_ray.decentralized.failures import AgentFailure
from bilevel_ray.device import resolve_device, to_device
from bilevel_ray.decentralized.placement import start
from bilevel_ray.problem import bind

__all__ = ["AgentFailure", "SingleBackend", "make_backend", "driver_device", "check_gpu_request", "connect_ray", "average",
           "consensus_error"]


#: every node of a cluster this library starts itself binds here (loopback, never rewritten by Ray)
LOOPBACK_NODE_IP = "127.0.0.2"


class SingleBackend:
    """One agent in this process (``mix`` is the identity)."""

    name = "single"

    def __init__(self, algo: Any, task: Any, *, seed: int, device: torch.device | str = "cpu", dtype: str = "float32"):
        self.device = torch.device(device)
        self.algo, self.task = algo, to_device(task, self.device)
        self.problem, self.state = start(algo, self.task, seed=seed, rank=0, device=self.device, dtype=dtype)
        self.bytes_last_round = 0
        self.gossip_last_round = self.latency_last_round = 0.0

    def step(self) -> None:
        """One outer step of the single agent."""
        start = time.perf_counter()
        self.state = self.algo.step(self.state, bind(self.problem, self.state))
        self.latency_last_round = time.perf_counter() - start

    def states(self) -> list[Any]:
        """The one agent's state, in a list."""
        return [self.state]

    def load_states(self, states: list[Any]) -> None:
        """Restart from the one state in ``states``."""
        (state,) = states
        self.state = to_device(state, self.device)

    def close(self) -> None:
        """Nothing to release."""
        pass


def driver_device(device: str, settings: Any) -> torch.device:
    """Where the driver keeps a run's task and states (metrics, checkpoints): ``run.device`` itself for
    one process and the simulation; for Ray agents, which resolve ``run.device`` in their actors, a CUDA
    device where the driver has one and the run asks for the GPU, else the CPU."""
    if settings.backend == "ray":
        return resolve_device("cpu" if device == "cpu" else "auto")
    return resolve_device(device)


def check_gpu_request(device: str, settings: Any) -> None:
    """One-line ``ValueError`` before any work where Ray agents cannot get the GPU the run asks for: a
    CUDA ``run.device`` without a GPU share, or more GPU than the connected cluster has."""
    if settings.backend != "ray":
        return
    if device.startswith("cuda") and not settings.gpus_per_agent:
        raise ValueError(f"run.device: {device} on Ray agents needs decentralized.gpus_per_agent > 0 (an actor "
                         f"sees only the GPUs Ray gives it)")
    if settings.gpus_per_agent:
        import ray

        have, need = ray.cluster_resources().get("GPU", 0.0), settings.agents * settings.gpus_per_agent
        if have < need:
            raise ValueError(f"decentralized.gpus_per_agent: {settings.agents} agents x {settings.gpus_per_agent} "
                             f"GPU need {need:g} GPUs, the Ray cluster has {have:g}")


def make_backend(task: Any, algo: Any, settings: Any, *, seed: int, placement_group: Any = None,
                 first_bundle: int = 0, device: str = "cpu", dtype: str = "float32") -> Any:
    """The backend a config's ``decentralized`` section asks for (connecting to Ray if needed), computing
    on ``device`` (``run.device``) in ``dtype`` (``run.dtype``). ``placement_group`` / ``first_bundle``: Ray agents go into these
    bundles of an existing group."""
    if settings.agents == 1 and settings.backend == "sim":
        return SingleBackend(algo, task, seed=seed, device=driver_device(device, settings), dtype=dtype)
    from bilevel_ray.decentralized.data import make_agents
    from bilevel_ray.decentralized.gossip import TopologyMixing

    options = {"p": settings.edge_prob, "seed": seed} if settings.topology == "erdos_renyi" else {}
    schedule = TopologyMixing(settings.topology, settings.agents, settings.mixing, options)
    agents = make_agents(task, settings.agents, split=settings.split, alpha=settings.alpha, seed=seed)
    if settings.backend == "sim":
        from bilevel_ray.decentralized.sim import SimBackend

        return SimBackend(algo, agents, schedule, seed=seed, device=driver_device(device, settings), dtype=dtype)
    from bilevel_ray.decentralized.ray_backend import RayBackend

    owned = connect_ray(settings.address, settings.agents)
    try:
        check_gpu_request(device, settings)
        return RayBackend(algo, agents, schedule, seed=seed, strategy=settings.placement,
                          transport=settings.transport, owns_ray=owned, placement_group=placement_group,
                          first_bundle=first_bundle, gpus_per_agent=settings.gpus_per_agent, device=device,
                          dtype=dtype, driver_device=driver_device(device, settings))
    except BaseException:
        if owned:
            import ray

            ray.shutdown()
        raise


def connect_ray(address: str | None, cpus: int) -> bool:
    """Connect to ``address`` or start a loopback-only local cluster with at least ``cpus`` logical CPUs;
    True if this call started Ray."""
    import ray

    if ray.is_initialized():
        return False
    # Ray's start-up lines (a local instance started, token authentication on) are not for the user to act on
    quiet = {"log_to_driver": False, "logging_level": logging.ERROR}
    if address is not None:
        ray.init(address=address, **quiet)
        return True
    # address="local": always a new cluster of our own, never one that happens to run on this machine
    ray.init(address="local", _node_ip_address=LOOPBACK_NODE_IP, num_cpus=max(cpus, 2), include_dashboard=False,
             **quiet)
    return True


def average(trees: list[Any]) -> Any:
    """Leafwise mean of the agents' pytrees."""
    return tree_map(lambda *leaves: torch.stack(leaves).mean(0), *trees)


def consensus_error(trees: list[Any]) -> float:
    """``mean_i ‖x_i − x̄‖²``."""
    mean = average(trees)
    return sum(float(tree.sq_norm(tree.sub(t, mean))) for t in trees) / len(trees)

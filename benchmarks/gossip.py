"""Cost of one gossip round on a ring: vectorized simulation (``MatrixMix``) vs. Ray agent actors.

For each number of agents ``n`` and parameter count ``d`` (one ``d``-vector per agent; ``--dtype``,
default float32), on ``TopologyMixing("ring", n)`` (Metropolis weights, 2n directed edges):

* **sim**: one call of ``bilevel_ray.decentralized.sim.MatrixMix(W)`` on the stacked ``(n, d)``
  tensor (``W @ X``, built once outside the timing), in this process with ``--threads`` intra-op
  threads (default 1: on this shared 2-core machine two OpenMP threads are slower and far noisier).
* **ray**: the library's own ``RayBackend`` (placement group of 1-CPU bundles, ``SPREAD``, threaded
  actors, one torch thread each) running :class:`GossipOnly`, an algorithm whose ``step`` is ``k``
  gossip rounds ``x ← mix(x)`` through ``AgentWorker``'s real ``mix``. ``RayBackend.step()`` runs
  one such step on all agents; round time = its wall time / ``k``. One row per transport:
  ``auto`` (same-node agents through shared memory, the default) and ``object_store``
  (``--transports``).

Timing: per (n, transport, d), after a warm-up, each of ``--repeats`` repeats times one sim block
and one Ray block (each ≥ ``--min-block`` seconds) back to back; the table shows the medians of the
per-round times and the median of the per-repeat ratio ray/sim (so that the machine's noise hits
both alike). ``MB/round`` = directed edges × d × itemsize (what ``MatrixMix.bytes`` counts; checked
against the actors' own count). ``ray cpu ms`` = CPU time of the agent processes during the rounds
(all their threads), summed over agents. Every transport is checked against ``W @ X`` once per n.

The Ray cluster is one head node on loopback (127.0.0.2, no dashboard) with ``max(--agents)``
logical CPUs: on this 2-core machine the n actor processes share 2 cores. One transport's backend is
up at a time. Ray starts its workers at
nice 15 (``RAY_worker_niceness``), which on a shared machine lets any other load starve the actors
while the simulation runs at nice 0; ``--niceness`` (default 0) sets it. Shut down at the end.

    .venv/bin/python benchmarks/gossip.py [--agents 4 8 16] [--params 1e4 1e5 1e6] [--dtype float32]
                                          [--transports auto object_store] [--repeats 5]
                                          [--min-block 0.3] [--threads 1] [--niceness 0] [--smoke]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any, NamedTuple

import numpy as np
import torch

from bilevel_ray.decentralized.gossip import TopologyMixing
from bilevel_ray.decentralized.ray_backend import RayBackend
from bilevel_ray.decentralized.sim import MatrixMix

RAY_NODE_IP = "127.0.0.2"  # loopback only (as tests/conftest.py)
GOAL = (8, 1_000_000, 3.0)  # ratio ray/sim at 8 agents × 1e6 parameters must be ≤ 3


class GossipState(NamedTuple):
    x: torch.Tensor
    t: int
    rounds: int  # gossip rounds per step
    cpu: float  # process CPU seconds of the last step


class GossipOnly:
    """An algorithm that only gossips: ``step`` runs ``state.rounds`` rounds of ``x ← mix(x)``."""

    name = "gossip_only"

    def init(self, problem: Any, x: Any, y: Any, *, seed: int, rank: int) -> GossipState:
        return GossipState(torch.zeros(1), 0, 1, 0.0)

    def step(self, state: GossipState, problem: Any, mix: Any) -> GossipState:
        cpu, x = time.process_time(), state.x
        for _ in range(state.rounds):
            x = mix(x)
        return state._replace(x=x, t=state.t + 1, cpu=time.process_time() - cpu)


class NoData:
    def init(self, seed: int) -> tuple[None, None]:
        return None, None


def agent_vector(rank: int, d: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(d, generator=torch.Generator().manual_seed(1000 + rank), dtype=torch.float64).to(dtype)


class RayGossip:
    """``n`` agents of a ``RayBackend`` running :class:`GossipOnly` over one transport (each agent with
    ``gpus`` of a GPU and its vector on ``device``: ``cuda`` with ``gpus = 1/n`` shares one GPU)."""

    def __init__(self, n: int, transport: str, gpus: float = 0.0, device: str = "cpu"):
        self.n, self.mixing, self.transport = n, TopologyMixing("ring", n), transport
        self.backend = RayBackend(GossipOnly(), [NoData()] * n, self.mixing, seed=0, transport=transport,
                                  gpus_per_agent=gpus, device=device)
        self.d = self.rounds = None

    def set(self, d: int, dtype: torch.dtype, rounds: int) -> None:
        if (d, rounds) != (self.d, self.rounds):
            self.backend.load_states([GossipState(agent_vector(i, d, dtype), 0, rounds, 0.0) for i in range(self.n)])
            self.d, self.rounds = d, rounds

    def run(self) -> tuple[float, int, float]:
        """One step: (seconds per round, bytes per round, agents' CPU seconds per round)."""
        start = time.perf_counter()
        self.backend.step()
        wall = time.perf_counter() - start
        cpu = sum(s.cpu for s in self.backend.states())  # after the timing
        return wall / self.rounds, self.backend.bytes_last_round // self.rounds, cpu / self.rounds

    def check(self, d: int, dtype: torch.dtype) -> None:
        self.d = None
        self.set(d, dtype, 1)
        self.backend.step()
        got = torch.stack([s.x for s in self.backend.states()]).double()
        x = torch.stack([agent_vector(i, d, dtype) for i in range(self.n)]).double()
        want = torch.tensor(self.mixing(0), dtype=torch.float64) @ x
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        if float((got - want).abs().max()) > tol * float(x.abs().max()):
            raise AssertionError(f"gossip of {self.n} agents × {d} does not match W @ X")
        self.d = None

    def close(self) -> None:
        self.backend.close()


def time_sim(mix: MatrixMix, x: torch.Tensor, min_block: float) -> float:
    """Seconds per ``mix(x)`` over a block of ≥ ``min_block`` seconds."""
    calls, start = 0, time.perf_counter()
    while True:
        mix(x)
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_block:
            return elapsed / calls


def bench_config(gossip: RayGossip, d: int, args: argparse.Namespace) -> dict[str, Any]:
    dtype, n = getattr(torch, args.dtype), gossip.n
    x = torch.randn(n, d, dtype=dtype)
    mix = MatrixMix(gossip.mixing(0))
    mix(x)
    nbytes = mix.bytes
    time_sim(mix, x, min(0.05, args.min_block))
    gossip.set(d, dtype, 3)  # warm-up, then enough rounds per step for a block of ≥ min_block
    gossip.run()
    gossip.set(d, dtype, max(3, min(2000, int(np.ceil(args.min_block / gossip.run()[0])))))
    sims, rays, ratios, cpus = [], [], [], []
    for _ in range(args.repeats):
        sim = time_sim(mix, x, args.min_block)
        per_round, sent, cpu = gossip.run()
        if sent != nbytes:
            raise AssertionError(f"agents sent {sent} bytes per round, MatrixMix counts {nbytes}")
        sims.append(sim)
        rays.append(per_round)
        ratios.append(per_round / sim)
        cpus.append(cpu)
    med = statistics.median
    return {"n": n, "d": d, "transport": gossip.transport, "bytes": nbytes, "sim": med(sims),
            "ray": med(rays), "ratio": med(ratios), "cpu": med(cpus), "rounds": gossip.rounds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, nargs="+", default=None, help="default 4 8 16")
    parser.add_argument("--params", type=float, nargs="+", default=None, help="default 1e4 1e5 1e6")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--transports", nargs="+", choices=["auto", "object_store"],
                        default=["auto", "object_store"])
    parser.add_argument("--repeats", type=int, default=None, help="default 5 (2 with --smoke)")
    parser.add_argument("--min-block", type=float, default=None,
                        help="seconds per timed block (default 0.3, 0.02 with --smoke)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads of the simulation")
    parser.add_argument("--niceness", type=int, default=0,
                        help="nice value of the Ray worker processes (RAY_worker_niceness; Ray's default is 15)")
    parser.add_argument("--smoke", action="store_true",
                        help="smoke run (seconds): 4 agents, 1e4 params, 2 short repeats; the goal is not measured")
    args = parser.parse_args()
    args.agents = args.agents or ([4] if args.smoke else [4, 8, 16])
    args.params = [int(p) for p in (args.params or ([1e4] if args.smoke else [1e4, 1e5, 1e6]))]
    args.repeats = args.repeats or (2 if args.smoke else 5)
    args.min_block = args.min_block or (0.02 if args.smoke else 0.3)
    torch.set_num_threads(args.threads)

    os.environ["RAY_worker_niceness"] = str(args.niceness)  # read by the raylet this process starts
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"  # nothing leaves loopback (ray.init disables it itself, Cluster does not)
    import ray
    from ray.cluster_utils import Cluster

    print(f"ring gossip, dtype {args.dtype}, sim threads {args.threads}, repeats {args.repeats}, "
          f"block ≥ {args.min_block}s; Ray {ray.__version__} head on {RAY_NODE_IP} with "
          f"{max(args.agents)} logical CPUs, workers at nice {args.niceness}", flush=True)
    cluster = Cluster(initialize_head=True, connect=True, head_node_args={
        "num_cpus": max(args.agents), "node_ip_address": RAY_NODE_IP, "include_dashboard": False})
    results = []
    try:
        for n in args.agents:
            for v in args.transports:
                gossip = RayGossip(n, v)
                try:
                    gossip.check(min(args.params), getattr(torch, args.dtype))
                    for d in args.params:
                        results.append(r := bench_config(gossip, d, args))
                        print(f"  done: {n} agents × {d:.0e}, {v}: sim {r['sim'] * 1e3:.3f} ms, "
                              f"ray {r['ray'] * 1e3:.3f} ms ({r['rounds']} rounds per step)", flush=True)
                finally:
                    gossip.close()
    finally:
        ray.shutdown()
        cluster.shutdown()

    print()
    print(f"{'agents':>6} {'params':>7} {'sim ms':>9} {'ray ms':>9} {'ray/sim':>8} {'ray cpu ms':>10} "
          f"{'MB/round':>9}  transport")
    for r in sorted(results, key=lambda r: (r["n"], r["d"])):
        print(f"{r['n']:>6} {r['d']:>7.0e} {r['sim'] * 1e3:>9.3f} {r['ray'] * 1e3:>9.3f} {r['ratio']:>8.2f} "
              f"{r['cpu'] * 1e3:>10.2f} {r['bytes'] / 1e6:>9.3f}  {r['transport']}")
    print("(ray cpu ms: CPU time of all agent processes per round, all their threads, summed over agents)")
    n, d, goal = GOAL
    at_goal = [r for r in results if (r["n"], r["d"]) == (n, d)]
    print(f"\ngoal: ray/sim at {n} agents × {d:.0e} params ≤ {goal}: " + ("; ".join(
        f"{r['transport']} {r['ratio']:.2f} ({'met' if r['ratio'] <= goal else 'MISSED'})" for r in at_goal)
        or "not measured in this run"))

if __name__ == "__main__":
    main()

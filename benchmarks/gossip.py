"""Cost of one gossip round on a ring: vectorized simulation (``MatrixMix``) vs. Ray actors.

For each number of agents ``n`` and parameter count ``d`` (one ``d``-vector per agent; ``--dtype``,
default float32), on ``TopologyMixing("ring", n)`` (Metropolis weights, 2n directed edges):

* **sim**: one call of ``bilevel_ray.decentralized.sim.MatrixMix(W)`` on the stacked ``(n, d)``
  tensor (``W @ X``; the ``MatrixMix`` is built once, outside the timing), in this process with
  ``--threads`` intra-op threads (default 1: on this shared 2-core machine two OpenMP threads are
  slower and far noisier, e.g. 8 × 1e5 float32: 0.28 ms with one thread, 3 to 13 ms with two).
* **ray**: one synchronous gossip round of ``n`` agent actors, each calling the project's own gossip
  operator ``AgentWorker._mix(w_row)`` on its ``d``-vector (flatten, ``ray.put``, ``deliver.remote``
  to both ring neighbours, wait on the mailbox, weighted sum). The actors are instances of
  :class:`GossipWorker`, a subclass of ``AgentWorker`` whose constructor runs the real one with a
  null algorithm/problem, placed as ``RayBackend`` places them (one 1-CPU bundle per agent,
  ``SPREAD``, ``max_concurrency=4``, one torch thread). ``ray.get([a.gossip.remote(k) ...])`` runs
  ``k`` back-to-back rounds on all agents; round time = driver wall time / ``k``.

Timing: per (n, d), after a warm-up, each of ``--repeats`` repeats times one sim block and one ray
block per gossip operator (each ≥ ``--min-block`` seconds) back to back; the table shows the medians
of the per-call times and the median of the per-repeat ratio ray/sim (so that the noise of the shared
machine hits both alike). ``MB/round`` = directed edges × d × itemsize (what ``MatrixMix.bytes``
counts; checked against the actors' ``bytes_sent``). ``ray cpu ms`` = CPU time of all agent processes
(all their threads, Ray's included; not the raylet's) per round, summed over agents. Every operator is
checked once per n against ``W @ X`` (smallest d).

``--prototype`` adds rows for two prototype gossip operators defined here, timed the same way and
checked against ``W @ X``: ``*_mix_shm`` (the project's operator with a same-node shared-memory data
path, ``deliver`` carries a slot index: :meth:`GossipWorker._mix_shm`)
and ``*_mix_pipe`` (shared memory plus FIFO notifications instead of ``deliver.remote``:
:meth:`GossipWorker._mix_pipe`). ``--profile`` prints, per configuration, where the time of a round
goes inside an instrumented copy of ``AgentWorker._mix`` (flatten, put, deliver submission, mailbox
wait, weighted sum, unflatten).

The Ray cluster is one head node on loopback (127.0.0.2, no dashboard) with ``max(--agents)``
logical CPUs, on this 2-core machine: the n actor processes share 2 cores. Ray starts its workers at
nice 15 (``RAY_worker_niceness``), which on a shared machine lets any other load starve the actors
while the simulation runs at nice 0; ``--niceness`` (default 0) sets it. Shut down at the end.

    .venv/bin/python benchmarks/gossip.py [--agents 4 8 16] [--params 1e4 1e5 1e6] [--dtype float32]
                                          [--repeats 5] [--min-block 0.3] [--threads 1]
                                          [--niceness 0] [--prototype] [--profile] [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics
import struct
import time
import uuid
import warnings
from typing import Any, Callable

import numpy as np
import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from bilevel_ray.decentralized.gossip import TopologyMixing
from bilevel_ray.decentralized.ray_backend import AgentWorker
from bilevel_ray.decentralized.sim import MatrixMix
from bilevel_ray.tree import PyTree

RAY_NODE_IP = "127.0.0.2"  # loopback only (as tests/conftest.py)
GOAL = (8, 1_000_000, 3.0)  # ratio ray/sim at 8 agents × 1e6 parameters must be ≤ 3
INLINE_BYTES = 100 * 1024  # Ray's max_direct_call_object_size: smaller task arguments are inlined
LABELS = {"project": "AgentWorker._mix", "shm": "*_mix_shm", "pipe": "*_mix_pipe"}
PHASES = ("flatten", "put", "submit", "wait", "sum", "unflatten")


class _NullAlgo:
    name = "null"

    def init(self, problem: Any, x: Any, y: Any, *, seed: int, rank: Any) -> None:
        return None


class _NullProblem:
    def init(self, seed: int) -> tuple[None, None]:
        return None, None


def agent_vector(rank: int, d: int, dtype: torch.dtype) -> torch.Tensor:
    """Agent ``rank``'s iterate (the driver rebuilds the same stack for the ``W @ X`` check)."""
    return torch.randn(d, generator=torch.Generator().manual_seed(1000 + rank), dtype=torch.float64).to(dtype)


class GossipWorker(AgentWorker):
    """An ``AgentWorker`` without algorithm: only its gossip (the real ``_mix`` / ``deliver``)."""

    def __init__(self, rank: int, n: int, mixing_at: Callable[[int], np.ndarray], dtype: str):
        super().__init__(_NullAlgo(), _NullProblem(), rank, n, mixing_at, seed=0, torch_threads=1)
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        self.dtype = getattr(torch, dtype)
        self.vectors: dict[int, torch.Tensor] = {}
        self.phases = dict.fromkeys(PHASES, 0.0)

    def ready(self) -> int:
        return self.rank

    def _operator(self, variant: str) -> Callable[[PyTree], PyTree]:
        w_row = np.asarray(self.mixing_at(0), dtype=np.float64)[self.rank]
        return {"project": self._mix, "shm": self._mix_shm, "pipe": self._mix_pipe,
                "profiled": self._mix_profiled}[variant](w_row)

    def _vector(self, d: int) -> torch.Tensor:
        if d not in self.vectors:
            self.vectors[d] = agent_vector(self.rank, d, self.dtype)
        return self.vectors[d]

    def gossip(self, k: int, d: int, variant: str = "project") -> dict[str, Any]:
        """``k`` back-to-back gossip rounds of this agent's ``d``-vector (all agents run this at once)."""
        self.phases.update(dict.fromkeys(PHASES, 0.0))  # in place: the profiled operator holds it
        x, mix = self._vector(d), self._operator(variant)
        sent, cpu, start = self.bytes_sent, time.process_time(), time.perf_counter()
        for _ in range(k):
            out = mix(x)
        assert out.dtype == x.dtype and out.shape == x.shape
        return {"seconds": time.perf_counter() - start, "cpu": time.process_time() - cpu,
                "bytes": self.bytes_sent - sent, "phases": dict(self.phases)}

    def mixed(self, d: int, variant: str = "project") -> np.ndarray:
        """One gossip round; returns the mixed vector (correctness check)."""
        return self._operator(variant)(self._vector(d)).numpy()

    # ---- prototypes (same protocol: ray.put once, deliver.remote to each neighbour, mailbox) ----

    def shm_create(self, prefix: str, d: int) -> None:
        """Prototype transport: this agent's two send slots, a file in /dev/shm, touched once."""
        path = f"/dev/shm/{prefix}-{self.rank}-{d}"
        own = np.memmap(path, dtype=np.dtype(str(self.dtype).removeprefix("torch.")), mode="w+", shape=(2, d))
        own[:] = 0
        self.shm_files = getattr(self, "shm_files", []) + [path]
        self.shm = getattr(self, "shm", {})
        self.shm[d] = (own, {})

    def shm_attach(self, prefix: str, d: int) -> None:
        own, views = self.shm[d]
        for j in range(self.n):
            if j != self.rank:
                views[j] = np.memmap(f"/dev/shm/{prefix}-{j}-{d}", dtype=own.dtype, mode="r", shape=(2, d))
                views[j].sum()  # map the pages now (one minor fault per page, once)

    def shm_close(self) -> None:
        self.shm = {}
        for path in getattr(self, "shm_files", []):
            os.unlink(path)
        self.shm_files = []

    def _mix_shm(self, w_row: np.ndarray) -> Callable[[PyTree], PyTree]:
        """Prototype: the project's ``_mix`` with a same-node shared-memory transport. Each agent writes its
        buffer into one of two preallocated, already-mapped slots (round parity) and ``deliver``s
        only the slot index (a tiny inlined call); the neighbour sums straight from its mapping of
        the sender's slots. Two slots suffice on a symmetric graph: agent i can only reach round
        r + 2 after j's round r + 1 message, which j sends after its round-r sum. (Peers on other
        nodes would keep the object-store path; on one node the object store costs a page fault
        per 4 KiB page on every put and on every get.)"""
        neighbors = [j for j in range(self.n) if j != self.rank and w_row[j] != 0]
        w_self, w_nb = float(w_row[self.rank]), [float(w_row[j]) for j in neighbors]

        def mix(tree: PyTree) -> PyTree:
            leaves, spec = tree_flatten(tree)
            flats = [t.detach().reshape(-1) for t in leaves]
            flat = flats[0] if len(flats) == 1 else torch.cat(flats)
            own, views = self.shm[flat.numel()]
            e, r = self.epoch, self.gossip_round
            self.gossip_round += 1
            slot = r % 2
            np.copyto(own[slot], flat.numpy())
            for j in neighbors:
                self.peers[j].deliver.remote(e, r, self.rank, slot)
            self.bytes_sent += own[slot].nbytes * len(neighbors)
            with self.cond:
                self.cond.wait_for(lambda: self.aborted or all((e, r, j) in self.mailbox for j in neighbors))
                if self.aborted:
                    raise RuntimeError(f"agent {self.rank}: round aborted (a neighbour failed)")
                received = [self.mailbox.pop((e, r, j)) for j in neighbors]
            out = torch.mul(flat, w_self)
            for w, j, k in zip(w_nb, neighbors, received):
                out.add_(torch.from_numpy(views[j][k]), alpha=w)
            pieces = [p.view(t.shape) for p, t in zip(out.split([t.numel() for t in leaves]), leaves)]
            return tree_unflatten(pieces, spec)

        return mix

    def pipe_open(self, prefix: str) -> None:
        """Prototype signalling: a FIFO per agent (opened read-write, so no open blocks or EOFs)."""
        path = f"/dev/shm/{prefix}-fifo-{self.rank}"
        os.mkfifo(path)
        self.fifo, self.rfd, self.wfds, self.pipe_box = path, os.open(path, os.O_RDWR), {}, {}

    def pipe_attach(self, prefix: str) -> None:
        for j in range(self.n):
            if j != self.rank:
                self.wfds[j] = os.open(f"/dev/shm/{prefix}-fifo-{j}", os.O_WRONLY)

    def pipe_close(self) -> None:
        for fd in [self.rfd, *self.wfds.values()]:
            os.close(fd)
        os.unlink(self.fifo)

    def _mix_pipe(self, w_row: np.ndarray) -> Callable[[PyTree], PyTree]:
        """Prototype: ``_mix_shm`` with the notifications through per-agent FIFOs instead of
        ``deliver.remote`` (a 16-byte ``os.write`` per neighbour; the mixing thread blocks in
        ``os.read`` with the GIL released; no Ray call, no thread hand-off). Abort is not wired
        (a real version would write an abort record into the agent's own FIFO)."""
        neighbors = [j for j in range(self.n) if j != self.rank and w_row[j] != 0]
        w_self, w_nb = float(w_row[self.rank]), [float(w_row[j]) for j in neighbors]
        record = struct.Struct("<iiii")

        def mix(tree: PyTree) -> PyTree:
            leaves, spec = tree_flatten(tree)
            flats = [t.detach().reshape(-1) for t in leaves]
            flat = flats[0] if len(flats) == 1 else torch.cat(flats)
            own, views = self.shm[flat.numel()]
            e, r = self.epoch, self.gossip_round
            self.gossip_round += 1
            slot = r % 2
            np.copyto(own[slot], flat.numpy())
            msg = record.pack(e, r, self.rank, slot)
            for j in neighbors:
                os.write(self.wfds[j], msg)
            self.bytes_sent += own[slot].nbytes * len(neighbors)
            box = self.pipe_box
            while not all((e, r, j) in box for j in neighbors):
                data = os.read(self.rfd, 4096)  # whole records: each write is atomic (≤ PIPE_BUF)
                for e2, r2, src, k in record.iter_unpack(data):
                    box[(e2, r2, src)] = k
            received = [box.pop((e, r, j)) for j in neighbors]
            out = torch.mul(flat, w_self)
            for w, j, k in zip(w_nb, neighbors, received):
                out.add_(torch.from_numpy(views[j][k]), alpha=w)
            pieces = [p.view(t.shape) for p, t in zip(out.split([t.numel() for t in leaves]), leaves)]
            return tree_unflatten(pieces, spec)

        return mix

    def _mix_profiled(self, w_row: np.ndarray) -> Callable[[PyTree], PyTree]:
        """``AgentWorker._mix`` verbatim, with a clock between its phases (``self.phases``)."""
        import ray

        neighbors = [j for j in range(self.n) if j != self.rank and w_row[j] != 0]
        ph, clock = self.phases, time.perf_counter

        def mix(tree: PyTree) -> PyTree:
            t0 = clock()
            leaves, spec = tree_flatten(tree)
            buf = np.concatenate([t.detach().reshape(-1).numpy() for t in leaves])
            e, r = self.epoch, self.gossip_round
            self.gossip_round += 1
            t1 = clock()
            if neighbors:
                ref = ray.put(buf)
                t2 = clock()
                for j in neighbors:
                    self.peers[j].deliver.remote(e, r, self.rank, ref)
                self.bytes_sent += buf.nbytes * len(neighbors)
            else:
                t2 = t1
            t3 = clock()
            with self.cond:
                self.cond.wait_for(lambda: self.aborted or all((e, r, j) in self.mailbox for j in neighbors))
                if self.aborted:
                    raise RuntimeError(f"agent {self.rank}: round aborted (a neighbour failed)")
                received = [self.mailbox.pop((e, r, j)) for j in neighbors]
            t4 = clock()
            out = w_row[self.rank] * buf
            for j, other in zip(neighbors, received):
                out = out + w_row[j] * other
            t5 = clock()
            pieces, i = [], 0
            for t in leaves:
                pieces.append(torch.from_numpy(out[i:i + t.numel()].reshape(t.shape)).to(t.dtype))
                i += t.numel()
            res = tree_unflatten(pieces, spec)
            t6 = clock()
            for name, a, b in zip(PHASES, (t0, t1, t2, t3, t4, t5), (t1, t2, t3, t4, t5, t6)):
                ph[name] += b - a
            return res

        return mix


class RayGossip:
    """``n`` :class:`GossipWorker` actors placed like ``RayBackend`` places its agents."""

    def __init__(self, n: int, dtype: str):
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.n, self.mixing = n, TopologyMixing("ring", n)
        self.pg = placement_group([{"CPU": 1.0}] * n, strategy="SPREAD")
        ray.get(self.pg.ready(), timeout=120)
        cls = ray.remote(GossipWorker)
        self.actors = [cls.options(num_cpus=1.0, max_concurrency=4, scheduling_strategy=
                                   PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i)
                                   ).remote(i, n, self.mixing, dtype) for i in range(n)]
        ray.get([a.ready.remote() for a in self.actors], timeout=300)
        ray.get([a.set_peers.remote(dict(enumerate(self.actors))) for a in self.actors])
        self.prefix, self.shm_sizes, self.pipes = f"bilevel-gossip-{uuid.uuid4().hex[:8]}", set(), False

    def prepare(self, d: int, variant: str) -> None:
        import ray

        if variant in ("shm", "pipe") and d not in self.shm_sizes:
            ray.get([a.shm_create.remote(self.prefix, d) for a in self.actors])
            ray.get([a.shm_attach.remote(self.prefix, d) for a in self.actors])
            self.shm_sizes.add(d)
        if variant == "pipe" and not self.pipes:
            ray.get([a.pipe_open.remote(self.prefix) for a in self.actors])
            ray.get([a.pipe_attach.remote(self.prefix) for a in self.actors])
            self.pipes = True

    def run(self, k: int, d: int, variant: str) -> tuple[float, list[dict[str, Any]]]:
        import ray

        start = time.perf_counter()
        reports = ray.get([a.gossip.remote(k, d, variant) for a in self.actors])
        return time.perf_counter() - start, reports

    def mixed(self, d: int, variant: str) -> np.ndarray:
        import ray
        return np.stack(ray.get([a.mixed.remote(d, variant) for a in self.actors]))

    def close(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        try:  # unlink the prototypes' files in /dev/shm
            if self.shm_sizes:
                ray.get([a.shm_close.remote() for a in self.actors], timeout=60)
            if self.pipes:
                ray.get([a.pipe_close.remote() for a in self.actors], timeout=60)
        except Exception as exc:  # noqa: BLE001 - still kill the actors
            print(f"warning: prototype cleanup failed ({exc!r}); see /dev/shm/{self.prefix}-*")
        for a in self.actors:
            ray.kill(a)
        remove_placement_group(self.pg)


def time_sim(mix: MatrixMix, x: torch.Tensor, min_block: float) -> float:
    """Seconds per ``mix(x)`` over a block of ≥ ``min_block`` seconds."""
    calls, start = 0, time.perf_counter()
    while True:
        mix(x)
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_block:
            return elapsed / calls


def check(gossip: RayGossip, d: int, dtype: torch.dtype, variant: str) -> None:
    gossip.prepare(d, variant)
    w = torch.tensor(gossip.mixing(0), dtype=torch.float64)
    x = torch.stack([agent_vector(i, d, dtype) for i in range(gossip.n)]).double()
    got = torch.from_numpy(gossip.mixed(d, variant)).double()
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    err = float((got - w @ x).abs().max())
    if err > tol * float(x.abs().max()):
        raise AssertionError(f"{variant} gossip of {gossip.n} agents × {d}: max error {err:.3g} vs W @ X")


def bench_config(gossip: RayGossip, d: int, args: argparse.Namespace, variants: list[str]) -> dict[str, Any]:
    dtype = getattr(torch, args.dtype)
    n = gossip.n
    x = torch.randn(n, d, dtype=dtype)
    mix = MatrixMix(gossip.mixing(0))
    mix(x)
    nbytes, mix.bytes = mix.bytes, 0
    # warm-up and block sizes (k rounds per ray block, ≥ min_block seconds)
    time_sim(mix, x, min(0.05, args.min_block))
    ks = {}
    for v in variants:
        gossip.prepare(d, v)
        gossip.run(2, d, v)
        wall, _ = gossip.run(3, d, v)
        ks[v] = max(3, min(2000, int(np.ceil(args.min_block / (wall / 3)))))
    sims, rays, ratios = [], {v: [] for v in variants}, {v: [] for v in variants}
    cpus, phases = {v: [] for v in variants}, {}
    for _ in range(args.repeats):
        sim = time_sim(mix, x, args.min_block)
        sims.append(sim)
        for v in variants:
            wall, reports = gossip.run(ks[v], d, v)
            per_round = wall / ks[v]
            rays[v].append(per_round)
            ratios[v].append(per_round / sim)
            cpus[v].append(sum(r["cpu"] for r in reports) / ks[v])
            sent = sum(r["bytes"] for r in reports) / ks[v]
            if sent != nbytes:
                raise AssertionError(f"actors sent {sent} bytes per round, MatrixMix counts {nbytes}")
    if args.profile:
        wall, reports = gossip.run(ks["project"], d, "profiled")
        phases = {p: statistics.median(r["phases"][p] for r in reports) / ks["project"] for p in PHASES}
        phases["round"] = wall / ks["project"]
        phases["cpu"] = sum(r["cpu"] for r in reports) / ks["project"]
    med = statistics.median
    return {"n": n, "d": d, "bytes": nbytes, "sim": med(sims),
            "ray": {v: med(rays[v]) for v in variants}, "ratio": {v: med(ratios[v]) for v in variants},
            "cpu": {v: med(cpus[v]) for v in variants}, "k": ks, "phases": phases}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, nargs="+", default=None, help="default 4 8 16")
    parser.add_argument("--params", type=float, nargs="+", default=None, help="default 1e4 1e5 1e6")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--repeats", type=int, default=None, help="default 5 (3 with --quick)")
    parser.add_argument("--min-block", type=float, default=None,
                        help="seconds per timed block (default 0.3, 0.1 with --quick)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads of the simulation")
    parser.add_argument("--niceness", type=int, default=0,
                        help="nice value of the Ray worker processes (RAY_worker_niceness; Ray's default is 15)")
    parser.add_argument("--prototype", action="store_true", help="also time the prototype gossip operators")
    parser.add_argument("--profile", action="store_true", help="phase breakdown of AgentWorker._mix")
    parser.add_argument("--quick", action="store_true", help="8 agents, 1e4 and 1e6 params, 3 short repeats")
    args = parser.parse_args()
    args.agents = args.agents or ([8] if args.quick else [4, 8, 16])
    args.params = [int(p) for p in (args.params or ([1e4, 1e6] if args.quick else [1e4, 1e5, 1e6]))]
    args.repeats = args.repeats or (3 if args.quick else 5)
    args.min_block = args.min_block or (0.1 if args.quick else 0.3)
    torch.set_num_threads(args.threads)
    variants = ["project"] + (["shm", "pipe"] if args.prototype else [])

    os.environ["RAY_worker_niceness"] = str(args.niceness)  # read by the raylet this process starts
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
            gossip = RayGossip(n, args.dtype)
            try:
                for v in variants:
                    check(gossip, min(args.params), getattr(torch, args.dtype), v)
                for d in args.params:
                    results.append(bench_config(gossip, d, args, variants))
                    r = results[-1]
                    print(f"  done: {n} agents × {d:.0e}: sim {r['sim'] * 1e3:.3f} ms, ray "
                          f"{r['ray']['project'] * 1e3:.3f} ms (k={r['k']})", flush=True)
            finally:
                gossip.close()
    finally:
        ray.shutdown()
        cluster.shutdown()

    print()
    wide = len(variants) > 1
    print(f"{'agents':>6} {'params':>7} {'sim ms':>9} {'ray ms':>9} {'ray/sim':>8} {'ray cpu ms':>10} "
          f"{'MB/round':>9}" + (f"  {'gossip operator':<16}" if wide else ""))
    for r in results:
        for v in variants:
            print(f"{r['n']:>6} {r['d']:>7.0e} {r['sim'] * 1e3:>9.3f} {r['ray'][v] * 1e3:>9.3f} "
                  f"{r['ratio'][v]:>8.2f} {r['cpu'][v] * 1e3:>10.2f} {r['bytes'] / 1e6:>9.3f}"
                  + (f"  {LABELS[v]:<16}" if wide else ""))
    print("(ray cpu ms: CPU time of all agent processes per round, all their threads, summed over agents)")
    if args.profile:
        print("\nper agent, per round (median over agents), instrumented copy of AgentWorker._mix, ms:")
        print(f"{'agents':>6} {'params':>7} " + " ".join(f"{p:>9}" for p in PHASES) + f" {'round':>9} {'cpu':>9}")
        for r in results:
            ph = r["phases"]
            print(f"{r['n']:>6} {r['d']:>7.0e} " + " ".join(f"{ph[p] * 1e3:>9.3f}" for p in PHASES)
                  + f" {ph['round'] * 1e3:>9.3f} {ph['cpu'] * 1e3:>9.2f}")
    n, d, goal = GOAL
    for r in results:
        if (r["n"], r["d"]) == (n, d):
            ratio = r["ratio"]["project"]
            print(f"\ngoal: ray/sim at {n} agents × {d:.0e} params ≤ {goal}: {ratio:.2f} "
                  f"({'met' if ratio <= goal else 'MISSED'})"
                  + "".join(f"; {LABELS[v]}: {r['ratio'][v]:.2f}" for v in variants[1:]))


if __name__ == "__main__":
    main()

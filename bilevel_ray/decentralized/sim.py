"""In-process vectorized simulation of ``N`` agents: states stacked on a leading agent axis, gossip as a
product with the mixing matrix ``W``, every agent's oracles from one pass over the summed objective
(see :class:`~bilevel_ray.decentralized.data.StackedProblem`).

Reductions inside a step (BOME's barrier, AID-CG's conjugate gradient) and SABA's memory tables run
per agent: the stacked problem says ``stacked = True`` and the algorithms pass ``batch=1`` to
``tree`` / ``linalg`` or keep one table per agent. The Lanczos solver and BOME's ``phi: value`` are
not stacked; they run on the Ray backend (one agent per actor) and are refused here with a clear error.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np
import torch
from torch.utils._pytree import tree_flatten, tree_map

from bilevel_ray.decentralized.data import AgentProblem, StackedProblem, stack, unstack
from bilevel_ray.device import to_device
from bilevel_ray.decentralized.placement import start
from bilevel_ray.problem import bind
from bilevel_ray.tree import PyTree

__all__ = ["MatrixMix", "SimBackend", "refusal"]

def refusal(algo: Any) -> str | None:
    """Why ``algo`` cannot run on several simulated agents (a one-line error), or None."""
    if getattr(algo, "solver", None) == "lanczos":
        return ("decentralized.backend: the Lanczos solver needs per-agent Krylov spaces; "
                "use algorithm.solver: dense or backend: ray")
    if algo.name == "bome" and algo.phi == "value":
        return ("algorithm.phi: 'value' needs each agent's value of g, which the simulation sums; "
                "use phi: grad_norm or decentralized.backend: ray")
    return None


class MatrixMix:
    """``X ← W X`` along the leading agent axis of every leaf (``W`` copied once to each device and dtype
    it meets, not once per leaf and call)."""

    def __init__(self, w: np.ndarray):
        self.matrix = np.array(w, dtype=np.float64)
        self._placed: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        self.edges = int(np.count_nonzero(w - np.diag(np.diag(w))))  # directed: one message each
        self.bytes = 0  # what a real gossip of these calls sends
        self.seconds = 0.0

    def _on(self, t: torch.Tensor) -> torch.Tensor:
        key = (t.device, t.dtype)
        if key not in self._placed:
            self._placed[key] = torch.from_numpy(self.matrix).to(t.device, t.dtype)
        return self._placed[key]

    def __call__(self, tree: PyTree) -> PyTree:
        """``W X`` for every leaf, counting the bytes and seconds a real gossip would take."""
        start = time.perf_counter()
        self.bytes += self.edges * sum(t[0].numel() * t.element_size() for t in _leaves(tree))
        out = tree_map(lambda t: torch.tensordot(self._on(t), t, dims=1), tree)
        self.seconds += time.perf_counter() - start
        return out


class SimBackend:
    """Runs ``algo`` on ``agents`` with mixing matrix ``mixing_at(round)`` in this process."""

    name = "sim"

    def __init__(self, algo: Any, agents: list[AgentProblem], mixing_at: Callable[[int], np.ndarray], *,
                 seed: int, device: torch.device | str = "cpu", dtype: str = "float32"):
        why = refusal(algo) if len(agents) > 1 else None
        if why:
            raise ValueError(why)
        self.algo, self.n = algo, len(agents)
        self.device = torch.device(device)
        agents = to_device(list(agents), self.device)  # the task's data moved once, shared by every agent
        self.problem, self.state = start(algo, StackedProblem(agents), seed=seed, rank=tuple(range(self.n)),
                                         device=self.device, dtype=dtype)
        self.task = getattr(agents[0], "task", agents[0])  # the driver's view (metrics, learner)
        self.mixing_at = mixing_at
        self._mixes: dict[bytes, MatrixMix] = {}
        self.bytes_last_round = 0
        self.gossip_last_round = self.latency_last_round = 0.0

    def step(self) -> None:
        """One outer round for every agent at once, gossip by the round's ``W``."""
        start = time.perf_counter()
        w = np.asarray(self.mixing_at(self.state.t), dtype=np.float64)
        key = w.tobytes()  # each distinct W of the schedule is placed once (a time-varying one cycles)
        if key not in self._mixes:
            if len(self._mixes) >= 64:  # a schedule of ever-new matrices: keep the cache bounded
                self._mixes.clear()
            self._mixes[key] = MatrixMix(w)
        mix = self._mixes[key]
        sent, spent = mix.bytes, mix.seconds
        self.state = self.algo.step(self.state, bind(self.problem, self.state), mix)
        self.bytes_last_round = mix.bytes - sent
        self.gossip_last_round = mix.seconds - spent
        self.latency_last_round = time.perf_counter() - start

    def states(self) -> list[Any]:
        """Per-agent views of the stacked state (fields with an agent axis are split)."""
        n = self.n
        fields = {}
        for name, value in self.state._asdict().items():
            if name == "rank":
                fields[name] = list(range(n))
            else:
                fields[name] = unstack(value, n) if _stacked(value, n) else [value] * n
        return [type(self.state)(**{k: v[i] for k, v in fields.items()}) for i in range(n)]

    def load_states(self, states: list[Any]) -> None:
        """Restack per-agent states (the inverse of :meth:`states`)."""
        fields = {}
        for name in self.state._fields:
            values = [getattr(s, name) for s in states]
            if name == "rank":
                fields[name] = tuple(range(self.n))
            else:  # fields that states() shared out (not stacked per agent) come back as they went
                fields[name] = stack(values) if _stacked(getattr(self.state, name), self.n) else values[0]
        self.state = to_device(type(self.state)(**fields), self.device)

    def close(self) -> None:
        """Nothing to release."""
        pass


def _leaves(tree: PyTree) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


def _stacked(value: Any, n: int) -> bool:
    leaves = _leaves(value)
    return bool(leaves) and all(t.ndim >= 1 and t.shape[0] == n for t in leaves)

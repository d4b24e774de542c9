"""A bilevel problem whose lower level is nonconvex but PL (Polyak–Łojasiewicz).

``g(x, y) = mean_i Σ_j [ (y_j − x_j − e_ij)² + 3 sin²(y_j − x_j − e_ij) ]`` is the classic nonconvex
PL function ``u² + 3 sin² u`` (Karimi, Nutini, Schmidt 2016) in ``u = y − x − e``; its curvature
``2 + 6 cos 2u`` is negative near ``u = ±π/2``. With zero-mean offsets ``e`` (``noise``) the minibatches
differ but, at ``noise = 0``, ``y*(x) = x``. ``f(x, y) = ½‖y − c‖² + (ρ/2)‖x‖²`` so ``x* = c/(1 + ρ)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from bilevel_ray.params import hp
from bilevel_ray.problem import FiniteSampler
from bilevel_ray.tasks import Task, register_task
from bilevel_ray.tasks._data import DTYPES


@register_task("nonconvex_pl")
@dataclass(frozen=True)
class NonconvexPLTask(Task):
    """Bilevel problem with a nonconvex PL lower level ``u² + 3 sin² u`` (see the module docstring)."""

    dim: int = hp(5, low=1, strict=False, doc="dimension of x and y")
    n_samples: int = hp(64, low=1, strict=False, doc="offset samples e_i in g")
    noise: float = hp(0.0, low=0, strict=False, doc="std of the offsets e_i (0: y*(x) = x exactly)")
    batch_size: int | None = hp(16, low=1, strict=False, doc="minibatch rows (null: full batch)")
    rho: float = hp(1.0, low=0, doc="ρ, weight of ½‖x‖² in f")
    y_offset: float = hp(1.3, doc="y0 − x0: starts in the region of negative curvature")
    dtype: str = hp("float64", choices=tuple(DTYPES))
    seed: int = hp(0, low=0, strict=False, doc="seed of c and of the offsets")

    def __post_init__(self) -> None:
        super().__post_init__()
        rng = np.random.default_rng(self.seed)
        dt = DTYPES[self.dtype]
        c = torch.as_tensor(rng.standard_normal(self.dim), dtype=dt)
        e = rng.standard_normal((self.n_samples, self.dim)) * self.noise
        e = torch.as_tensor(e - e.mean(0) if self.n_samples > 1 else e, dtype=dt)
        object.__setattr__(self, "c", c)
        object.__setattr__(self, "inner", FiniteSampler((e,), self.batch_size, shuffle_seed=None))
        object.__setattr__(self, "outer", FiniteSampler((c[None],), None, shuffle_seed=None))

    def g(self, x: torch.Tensor, y: torch.Tensor, batch: Any) -> torch.Tensor:
        """Lower objective: mean over the offsets in ``batch`` of ``Σ_j u_j² + 3 sin² u_j``, ``u = y − x − e``."""
        u = y - x - batch[0]
        return (u ** 2 + 3 * torch.sin(u) ** 2).sum(1).mean()

    def f(self, x: torch.Tensor, y: torch.Tensor, batch: Any) -> torch.Tensor:
        """Upper objective: ``½‖y − c‖² + (ρ/2)‖x‖²``."""
        return 0.5 * ((y - batch[0][0]) ** 2).sum() + 0.5 * self.rho * (x ** 2).sum()

    def init(self, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """``x = 0`` and ``y = x + y_offset``."""
        x = torch.zeros(self.dim, dtype=DTYPES[self.dtype])
        return x, x + self.y_offset

    @property
    def x_star(self) -> torch.Tensor:
        """Exact at ``noise = 0``."""
        return self.c / (1 + self.rho)

    def metrics(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """Full-batch ``f`` and ``g``, and the relative error of ``x`` to ``x*``."""
        xs = self.x_star
        return {
            "outer_objective": float(self.f(x, y, self.outer.full())),
            "lower_objective": float(self.g(x, y, self.inner.full())),
            "rel_error": float(torch.linalg.vector_norm(x - xs) / torch.linalg.vector_norm(xs)),
        }

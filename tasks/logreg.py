"""Hyperparameter selection for ℓ2-regularized logistic regression, one weight per feature.

``g(x, y) = mean_train logloss(y) + ½ Σ_j exp(x_j) y_j²`` (strongly convex in ``y``),
``f(x, y) = mean_val logloss(y)``. Data: scikit-learn's shipped breast_cancer (569 × 30, real) or a
synthetic set of any size (sparse true weights, label flips). Features are standardized on the
training split. ``value(x)`` solves the lower level exactly (Newton) and ``optimum()`` computes
``h* = min_x h(x)`` once (L-BFGS on exact hypergradients), so runs can log suboptimality.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from bilevel_ray.params import hp
from bilevel_ray.problem import FiniteSampler
from bilevel_ray.tasks import Task, register_task
from bilevel_ray.tasks._data import DTYPES, split, standardize


def _logloss(w: torch.Tensor, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    features, signs = batch
    return F.softplus(-signs * (features @ w)).mean()


def _load(dataset: str, n: int, p: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if dataset == "breast_cancer":
        from sklearn.datasets import load_breast_cancer

        data = load_breast_cancer()
        return data.data.astype(np.float64), data.target.astype(np.float64)
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(p) * (rng.random(p) < 0.2)
    features = rng.standard_normal((n, p))
    labels = (features @ w + 0.5 * rng.standard_normal(n) > 0).astype(np.float64)
    flip = rng.random(n) < 0.05
    labels[flip] = 1 - labels[flip]
    return features, labels


@register_task("logreg_hpo")
@dataclass(frozen=True)
class LogRegHPOTask(Task):
    """Per-feature ℓ2 regularization of logistic regression, tuned on a validation split (see the module docstring)."""

    label_column: ClassVar[int] = 1
    dataset: str = hp("breast_cancer", choices=("breast_cancer", "synthetic"))
    n_samples: int = hp(2000, low=10, strict=False, doc="synthetic only: number of samples")
    n_features: int = hp(50, low=1, strict=False, doc="synthetic only: number of features")
    val_fraction: float = hp(0.25, low=0, high=1, doc="share of samples in the validation split")
    test_fraction: float = hp(0.25, low=0, high=1, doc="share of samples in the test split")
    batch_size: int | None = hp(64, low=1, strict=False, doc="minibatch rows (null: full batch)")
    x0: float = hp(-2.0, doc="initial log-regularization of every feature")
    dtype: str = hp("float64", choices=tuple(DTYPES))
    seed: int = hp(0, low=0, strict=False, doc="seed of the split (and of the synthetic data)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("task.val_fraction: val_fraction + test_fraction must be < 1")
        feats, labels = _load(self.dataset, self.n_samples, self.n_features, self.seed)
        tr, va, te = split(len(labels), (1 - self.val_fraction - self.test_fraction, self.val_fraction,
                                         self.test_fraction), self.seed)
        xs = standardize(feats[tr], feats[va], feats[te])
        dt = DTYPES[self.dtype]
        sets = [(torch.as_tensor(a, dtype=dt), torch.as_tensor(2 * labels[i] - 1, dtype=dt))
                for a, i in zip(xs, (tr, va, te))]
        object.__setattr__(self, "inner", FiniteSampler(sets[0], self.batch_size, shuffle_seed=self.seed))
        object.__setattr__(self, "outer", FiniteSampler(sets[1], self.batch_size, shuffle_seed=self.seed + 1))
        object.__setattr__(self, "test", sets[2])

    @property
    def dim(self) -> int:
        """Number of features, the dimension of ``x`` and ``y``."""
        return self.inner.data[0].shape[1]

    def f(self, x: torch.Tensor, y: torch.Tensor, batch: Any) -> torch.Tensor:
        """Upper objective: validation log-loss of the weights ``y`` on ``batch``."""
        return _logloss(y, batch)

    def g(self, x: torch.Tensor, y: torch.Tensor, batch: Any) -> torch.Tensor:
        """Lower objective: training log-loss on ``batch`` plus ``½ Σ_j exp(x_j) y_j²``."""
        return _logloss(y, batch) + 0.5 * (torch.exp(x) * y * y).sum()

    def init(self, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Every log-regularization at ``x0``, zero weights."""
        dt = DTYPES[self.dtype]
        return torch.full((self.dim,), self.x0, dtype=dt), torch.zeros(self.dim, dtype=dt)

    # -- exact quantities (float64, full batch) ----------------------------------------------------
    def y_star(self, x: torch.Tensor, tol: float = 1e-12, max_iter: int = 50) -> torch.Tensor:
        """Exact lower-level solution by Newton's method."""
        x = x.detach().double()
        data = tuple(t.double() for t in self.inner.full())
        y = torch.zeros(self.dim, dtype=torch.float64, device=x.device)
        for _ in range(max_iter):
            grad, hess = self._grad_hess(x, y, data)
            step = torch.linalg.solve(hess, grad)
            y = y - step
            if torch.linalg.vector_norm(grad) < tol:
                break
        return y

    @staticmethod
    def _grad_hess(x, y, data):
        feats, signs = data
        z = signs * (feats @ y)
        s = torch.sigmoid(-z)
        grad = -(feats * (signs * s)[:, None]).mean(0) + torch.exp(x) * y
        hess = (feats.T * (s * (1 - s))) @ feats / len(z) + torch.diag(torch.exp(x))
        return grad, hess

    def value(self, x: torch.Tensor) -> torch.Tensor:
        """Exact ``h(x) = f(x, y*(x))`` on the full validation split (float64)."""
        y = self.y_star(x)
        return _logloss(y, tuple(t.double() for t in self.outer.full()))

    def hypergradient(self, x: torch.Tensor) -> torch.Tensor:
        """Exact ``∇h(x)``; here ``∇²_xy g = diag(exp(x) ⊙ y)`` and ``∇_x f = 0``."""
        x = x.detach().double()
        y = self.y_star(x)
        _, hess = self._grad_hess(x, y, tuple(t.double() for t in self.inner.full()))
        feats, signs = (t.double() for t in self.outer.full())
        fy = -(feats * (signs * torch.sigmoid(-signs * (feats @ y)))[:, None]).mean(0)
        return -(torch.exp(x) * y) * torch.linalg.solve(hess, fy)

    def optimum(self) -> float:
        """``h* = min_x h(x)`` (cached), by L-BFGS with exact hypergradients."""
        if "_hstar" not in self.__dict__:
            from scipy.optimize import minimize

            def fun(xv: np.ndarray):
                x = torch.as_tensor(xv)
                return float(self.value(x)), self.hypergradient(x).numpy()

            res = minimize(fun, np.full(self.dim, self.x0), jac=True, method="L-BFGS-B",
                           bounds=[(-12.0, 12.0)] * self.dim, options={"maxiter": 2000, "gtol": 1e-10})
            object.__setattr__(self, "_hstar", float(res.fun))
        return self._hstar

    def metrics(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """Validation loss, exact ``h(x)`` and its suboptimality, test loss and accuracy."""
        feats, signs = self.test
        value = float(self.value(x))
        return {
            "outer_objective": float(self.f(x, y, self.outer.full())),
            "value": value,
            "suboptimality": value - self.optimum(),
            "test_loss": float(_logloss(y, self.test)),
            "test_acc": float(((feats @ y) * signs > 0).double().mean()),
        }

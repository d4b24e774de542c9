"""Data hyper-cleaning (Franceschi et al. 2017) on scikit-learn's shipped digits (1797 real 8×8 images).

A share ``noise_rate`` of the training labels is replaced by a different class drawn uniformly. The
outer variable holds one logit per training sample; the lower level fits a multinomial logistic model
with weights ``σ(x_i)``: ``g(x, W) = mean_i σ(x_i) CE(W; s_i) + (reg/2)‖W‖²``; the upper level is the
cross-entropy on a clean validation split, ``f(x, W) = mean_val CE(W)``. Metrics report test accuracy
on a third clean split and the mean weight on clean and on corrupted samples.
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

N_CLASSES = 10


def _logits(w: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
    return feats @ w[:-1] + w[-1]


@register_task("hypercleaning")
@dataclass(frozen=True)
class HyperCleaningTask(Task):
    """Data hyper-cleaning on the digits: one weight logit per training sample (see the module docstring)."""

    label_column: ClassVar[int] = 1
    noise_rate: float = hp(0.5, low=0, high=1, strict=False, doc="p, share of corrupted training labels")
    train_fraction: float = hp(0.5, low=0, high=1, doc="share of samples in the (noisy) training split")
    val_fraction: float = hp(0.2, low=0, high=1, doc="share in the clean validation split; the rest is test")
    reg: float = hp(1e-3, low=0, doc="ridge weight of the lower level (strong convexity)")
    batch_size: int | None = hp(128, low=1, strict=False, doc="minibatch rows (null: full batch)")
    dtype: str = hp("float64", choices=tuple(DTYPES))
    seed: int = hp(0, low=0, strict=False, doc="seed of the split and of the corruption")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.train_fraction + self.val_fraction >= 1:
            raise ValueError("task.val_fraction: train_fraction + val_fraction must be < 1")
        from sklearn.datasets import load_digits

        data = load_digits()
        tr, va, te = split(len(data.target), (self.train_fraction, self.val_fraction,
                                              1 - self.train_fraction - self.val_fraction), self.seed)
        feats = standardize(data.data[tr], data.data[va], data.data[te])
        labels = data.target[tr].copy()
        rng = np.random.default_rng([self.seed, 1])
        corrupt = rng.random(len(tr)) < self.noise_rate
        labels[corrupt] = (labels[corrupt] + rng.integers(1, N_CLASSES, corrupt.sum())) % N_CLASSES
        dt = DTYPES[self.dtype]
        as_t = lambda a: torch.as_tensor(a, dtype=dt)  # noqa: E731
        train = (as_t(feats[0]), torch.as_tensor(labels), torch.arange(len(tr)))
        object.__setattr__(self, "inner", FiniteSampler(train, self.batch_size, shuffle_seed=self.seed))
        object.__setattr__(self, "outer", FiniteSampler((as_t(feats[1]), torch.as_tensor(data.target[va])),
                                                        self.batch_size, shuffle_seed=self.seed + 1))
        object.__setattr__(self, "test", (as_t(feats[2]), torch.as_tensor(data.target[te])))
        object.__setattr__(self, "corrupted", torch.as_tensor(corrupt))

    @property
    def n_train(self) -> int:
        """Number of (noisy) training samples, the dimension of ``x``."""
        return self.inner.size

    def f(self, x: torch.Tensor, y: torch.Tensor, batch: Any) -> torch.Tensor:
        """Upper objective: cross-entropy of the model ``y`` on a clean validation ``batch``."""
        feats, labels = batch
        return F.cross_entropy(_logits(y, feats), labels)

    def g(self, x: torch.Tensor, y: torch.Tensor, batch: Any) -> torch.Tensor:
        """Lower objective: ``σ(x_i)``-weighted training cross-entropy on ``batch`` plus the ridge term."""
        feats, labels, idx = batch
        losses = F.cross_entropy(_logits(y, feats), labels, reduction="none")
        return (torch.sigmoid(x[idx]) * losses).mean() + 0.5 * self.reg * (y * y).sum()

    def init(self, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero logits (every weight 1/2) and a zero model."""
        dt = DTYPES[self.dtype]
        dim = self.inner.data[0].shape[1]
        return torch.zeros(self.n_train, dtype=dt), torch.zeros(dim + 1, N_CLASSES, dtype=dt)

    def accuracy(self, y: torch.Tensor) -> float:
        """Test accuracy of the model ``y``."""
        feats, labels = self.test
        return float((_logits(y, feats).argmax(1) == labels).double().mean())

    def fit_lower(self, x: torch.Tensor, max_iter: int = 500) -> torch.Tensor:
        """Solve the lower level for fixed sample weights (L-BFGS, full batch)."""
        data = self.inner.full()
        y = self.init()[1].to(data[0].device).requires_grad_(True)
        opt = torch.optim.LBFGS([y], max_iter=max_iter, tolerance_grad=1e-10, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = self.g(x, y, data)
            loss.backward()
            return loss

        opt.step(closure)
        return y.detach()

    def noisy_baseline(self) -> float:
        """Test accuracy of the model trained on the noisy set with equal weights."""
        return self.accuracy(self.fit_lower(torch.zeros(self.n_train, dtype=DTYPES[self.dtype], device=self.test[0].device)))

    def metrics(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """Validation loss, test accuracy and the mean weight on clean and on corrupted samples."""
        w = torch.sigmoid(x)
        return {
            "outer_objective": float(self.f(x, y, self.outer.full())),
            "test_acc": self.accuracy(y),
            "weight_clean": float(w[~self.corrupted].mean()) if (~self.corrupted).any() else float("nan"),
            "weight_corrupted": float(w[self.corrupted].mean()) if self.corrupted.any() else float("nan"),
        }

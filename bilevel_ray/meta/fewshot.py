"""The few-shot API: a trained meta-learner saved as a checkpoint, adapted to new classes.

>>> learner = load("runs/omniglot/learner.pt")
>>> predict = learner.adapt(support_images, support_labels)   # N-way K-shot, any N
>>> predict(query_images).labels

Images are tensors in [0, 1], 28×28 grayscale (or the size the learner was trained on), shaped
``(n, S, S)`` or ``(n, 1, S, S)``, **ink dark on white** (Omniglot's convention; invert white-on-black
images first). Support labels are ``0..N-1``, each present at least once. Checkpoints hold tensors,
strings and numbers only and load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from bilevel_ray.files import atomic_write
from bilevel_ray.meta.learners import KINDS, episode_task_logits
from bilevel_ray.meta.augment import RandomAffine, warp

__all__ = ["FORMAT", "Prediction", "FewShotLearner", "load", "Evaluation", "evaluate", "mean_ci95"]

FORMAT = "bilevel-ray-fewshot/1"


class Prediction(NamedTuple):
    """Predicted ``labels`` of the query images and the ``logits`` they are the argmax of."""

    labels: torch.Tensor
    logits: torch.Tensor


class Evaluation(NamedTuple):
    """:func:`evaluate`'s result: mean accuracy, the half-width of its 95% interval, the per-task
    accuracies, and ``constant``, the fraction of tasks on which the learner gave every query the same
    label (1.0 for a collapsed learner, which scores chance with a zero interval)."""
    mean: float
    half: float
    accs: np.ndarray
    constant: float


def _images(x: Any, size: int, dtype: torch.dtype, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError(f"{name}: must be a float tensor in [0, 1], got {type(x).__name__}"
                         + (f" of {x.dtype}" if isinstance(x, torch.Tensor) else ""))
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or x.shape[1] != 1 or x.shape[2:] != (size, size) or x.shape[0] == 0:
        raise ValueError(f"{name}: must have shape (n, {size}, {size}) or (n, 1, {size}, {size}), "
                         f"got {tuple(x.shape)}")
    if x.min() < 0 or x.max() > 1:
        raise ValueError(f"{name}: values must lie in [0, 1] (ink dark on white), got [{float(x.min()):.3g}, "
                         f"{float(x.max()):.3g}]")
    return x.to(dtype)


@dataclass(frozen=True)
class FewShotLearner:
    """A meta-trained learner: ``kind`` (one of ``KINDS``), its meta-parameters and the adaptation
    settings it was trained with (``steps``, ``lr``, ``lam``, ``cg_iters``, ``reg``, ``head_steps``,
    ``size``; a ridge learner's ``scale`` and ``reg`` are its starting values, the learned ones are
    ``params["ridge.log_scale"]`` and ``params["ridge.log_reg"]``), and its test-time support warps
    (``support_warps`` copies of magnitude ``support_warp_magnitude``, see :meth:`with_support_warps`)."""

    kind: str
    params: dict[str, torch.Tensor]
    hyper: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind: must be one of {', '.join(KINDS)}, got {self.kind!r}")

    @property
    def size(self) -> int:
        """Side of the square images the learner takes (28 unless trained otherwise)."""
        return int(self.hyper.get("size", 28))

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the meta-parameters."""
        return next(iter(self.params.values())).dtype

    def with_support_warps(self, copies: int, magnitude: float = 1.0) -> "FewShotLearner":
        """This learner adapting to each support drawing plus ``copies`` randomly warped copies of it
        (:class:`~bilevel_ray.meta.augment.RandomAffine` of ``magnitude``; test-time augmentation of
        the support set: prototypes average the copies, heads and MAML's steps fit them all). The warps
        come from fixed seeds, so a prediction is a pure function of the support and query images.
        ``copies=0`` turns them off."""
        if not (isinstance(copies, int) and not isinstance(copies, bool) and copies >= 0):
            raise ValueError(f"support_warps: must be an integer >= 0, got {copies!r}")
        if not (isinstance(magnitude, (int, float)) and 0 <= magnitude <= 2):
            raise ValueError(f"support_warp_magnitude: must be a number in [0, 2], got {magnitude!r}")
        return replace(self, hyper={**self.hyper, "support_warps": copies, "support_warp_magnitude": float(magnitude)})

    def _warped(self, support: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Support ``(B, n, ...)`` and labels ``(B, n)`` followed by ``support_warps`` warped copies of them.
        Copy ``c`` of the ``i``-th drawing gets the same warp in every task (drawn from seed ``(2718, c)``),
        so a task's prediction does not depend on the other tasks of its batch."""
        copies = int(self.hyper.get("support_warps", 0))
        if copies == 0:
            return support, labels
        augment, (b, n) = RandomAffine(self.hyper.get("support_warp_magnitude", 1.0)), labels.shape
        flat = support.flatten(0, 1)
        out = [support] + [warp(flat, augment.theta(n, np.random.default_rng([2718, c])).repeat(b, 1, 1))
                           .clamp_(0.0, 1.0).view_as(support) for c in range(copies)]
        return torch.cat(out, 1), labels.repeat(1, copies + 1)

    def adapt(self, support_images: torch.Tensor, support_labels: torch.Tensor) -> "Adapted":
        """Adapt to one N-way task (N = number of distinct labels, ``0..N-1``)."""
        sup = _images(support_images, self.size, self.dtype, "support_images")
        if not isinstance(support_labels, torch.Tensor) or support_labels.dtype not in (torch.int64, torch.int32):
            raise ValueError("support_labels: must be an integer tensor of labels 0..N-1")
        labels = support_labels.long().reshape(-1)
        if labels.shape[0] != sup.shape[0]:
            raise ValueError(f"support_labels: {labels.shape[0]} labels for {sup.shape[0]} support images")
        ways = int(labels.max()) + 1
        if labels.min() < 0 or torch.bincount(labels, minlength=ways).min() == 0:
            raise ValueError(f"support_labels: must cover 0..N-1, each at least once; got {sorted(set(labels.tolist()))}")
        return Adapted(self, sup, labels, ways)

    def episode_logits(self, support, support_labels, query, ways: int) -> torch.Tensor:
        """Query logits of a batch of tasks ``(B, n, 1, S, S)``, all adapted at once
        (:func:`~bilevel_ray.meta.learners.episode_task_logits`)."""
        support, support_labels = self._warped(support.to(self.dtype), support_labels)
        with torch.no_grad():
            return episode_task_logits(self.kind, self.params, self.hyper, support, support_labels,
                                       query.to(self.dtype), ways)

    def save(self, path: str | Path) -> None:
        """Write the checkpoint atomically (a crash leaves any previous file intact)."""
        payload = {"format": FORMAT, "kind": self.kind, "params": {k: v.detach().cpu() for k, v in self.params.items()},
                   "hyper": dict(self.hyper)}
        atomic_write(Path(path), lambda tmp: torch.save(payload, tmp))


@dataclass(frozen=True)
class Adapted:
    """A learner adapted to one task; call it on query images."""

    learner: FewShotLearner
    support: torch.Tensor
    support_labels: torch.Tensor
    ways: int

    def __call__(self, query_images: torch.Tensor) -> Prediction:
        q = _images(query_images, self.learner.size, self.learner.dtype, "query_images")
        logits = self.learner.episode_logits(self.support[None], self.support_labels[None], q[None], self.ways)[0]
        return Prediction(logits.argmax(1), logits)


def load(path: str | Path) -> FewShotLearner:
    """Load a learner saved by :meth:`FewShotLearner.save` (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint: {path} does not exist")
    payload = torch.load(path, weights_only=True, map_location="cpu")
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"checkpoint: {path} is not a few-shot learner (format {FORMAT}); a run's "
                         "learner.pt is, its checkpoint.pt is not")
    return FewShotLearner(payload["kind"], payload["params"], payload["hyper"])


def mean_ci95(values: np.ndarray) -> tuple[float, float]:
    """Mean and the half-width of its normal 95% interval."""
    values = np.asarray(values, dtype=np.float64)
    half = 1.96 * values.std(ddof=1) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return float(values.mean()), float(half)


def evaluate(learner: FewShotLearner, sampler: Any, *, tasks: int = 600, seed: int = 0, chunk: int = 50
             ) -> Evaluation:
    """Accuracy over ``tasks`` episodes of ``sampler`` (drawn from ``seed``), as an :class:`Evaluation`."""
    if not (isinstance(tasks, int) and tasks >= 2):
        raise ValueError(f"tasks: must be an integer >= 2, got {tasks!r}")
    rng = np.random.default_rng([seed, 7919])
    accs, constant = [], 0
    done = 0
    while done < tasks:
        b = min(chunk, tasks - done)
        ep = sampler.episodes(rng, b)
        labels = learner.episode_logits(ep.support, ep.support_labels, ep.query, ep.ways).argmax(-1)
        accs.append((labels == ep.query_labels).double().mean(1).numpy())
        constant += int((labels == labels[:, :1]).all(1).sum())
        done += b
    accs = np.concatenate(accs)
    return Evaluation(*mean_ci95(accs), accs, constant / tasks)

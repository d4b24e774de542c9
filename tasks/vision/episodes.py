"""N-way K-shot episodes, vectorized over a meta-batch, and the same episodes through learn2learn.

A :class:`ClassPool` holds a labelled image set grouped by class; with ``rotations=4`` every class
also appears rotated by 90°, 180° and 270° as three extra classes (Santoro et al. 2016; Vinyals et al.
2016). :class:`EpisodeSampler` draws a meta-batch of tasks at once: ``ways`` distinct classes per task,
``shots`` support and ``queries`` query drawings per class (distinct drawings), labels remapped to
``0..ways-1`` in a random order. Draws are a pure function of the numpy generator they get.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import numpy as np
import torch

__all__ = ["Episode", "ClassPool", "EpisodeSampler", "learn2learn_tasks", "split_l2l_task"]


class Episode(NamedTuple):
    """A meta-batch of ``B`` tasks. Images are float in [0, 1] (ink dark on white), ``(B, n, 1, S, S)``;
    labels ``(B, n)`` in ``0..ways-1``; ``classes[b, k]`` is the pool class behind label ``k`` of task b."""

    support: torch.Tensor
    support_labels: torch.Tensor
    query: torch.Tensor
    query_labels: torch.Tensor
    classes: torch.Tensor

    @property
    def ways(self) -> int:
        """Classes per task."""
        return self.classes.shape[1]


@dataclass(frozen=True)
class ClassPool:
    """Images grouped by class: ``images`` ``(n, S, S)`` uint8 (255 = white), ``labels`` ``(n,)``."""

    images: torch.Tensor
    labels: torch.Tensor
    rotations: int = 1

    def __post_init__(self) -> None:
        if self.rotations not in (1, 4):
            raise ValueError(f"task.rotations: must be 1 or 4, got {self.rotations!r}")
        labels = self.labels.numpy()
        n_base = int(labels.max()) + 1 if len(labels) else 0
        counts = np.bincount(labels, minlength=n_base)
        if n_base == 0 or counts.min() == 0:
            raise ValueError("ClassPool: labels must cover 0..C-1 with at least one image each")
        order = np.argsort(labels, kind="stable")
        table = np.full((n_base, counts.max()), -1, dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        for c in range(n_base):
            table[c, :counts[c]] = order[starts[c]:starts[c] + counts[c]]
        object.__setattr__(self, "_table", table)
        object.__setattr__(self, "_counts", counts)

    @property
    def num_classes(self) -> int:
        """Classes, rotated copies included."""
        return len(self._counts) * self.rotations

    @property
    def min_count(self) -> int:
        """Drawings of the smallest class."""
        return int(self._counts.min())

    def split_drawings(self, first: int) -> tuple["ClassPool", "ClassPool"]:
        """Two pools over the same classes: each class's first ``first`` drawings, and the rest."""
        if not 0 < first < self.min_count:
            raise ValueError(f"must be in 1..{self.min_count - 1} (drawings of the smallest class - 1), got {first}")
        rank = np.empty(len(self.labels), dtype=np.int64)
        for c in range(len(self._counts)):
            rows = self._table[c, :self._counts[c]]
            rank[rows] = np.arange(len(rows))
        keep = torch.from_numpy(rank < first)
        return (ClassPool(self.images[keep], self.labels[keep], self.rotations),
                ClassPool(self.images[~keep], self.labels[~keep], self.rotations))

    def gather(self, classes: np.ndarray, picks: np.ndarray) -> torch.Tensor:
        """Images of drawings ``picks[..., j]`` (indices into each class's drawings) of ``classes[...]``
        (rotated ids), as float ``(..., J, 1, S, S)``."""
        base, rot = classes // self.rotations, classes % self.rotations
        rows = self._table[base[..., None], picks]
        imgs = self.images[torch.from_numpy(rows)]
        rot_t = torch.from_numpy(np.broadcast_to(rot[..., None], rows.shape).copy())
        for r in range(1, self.rotations):
            mask = rot_t == r
            if mask.any():
                imgs[mask] = torch.rot90(imgs[mask], r, dims=(-2, -1))
        return (imgs.float() / 255.0).unsqueeze(-3)


def _pick(rng: np.random.Generator, counts: np.ndarray, n: int) -> np.ndarray:
    """``n`` distinct drawing indices per entry of ``counts`` (uniform, without replacement)."""
    keys = rng.random((*counts.shape, int(counts.max())))
    keys[np.arange(keys.shape[-1]) >= counts[..., None]] = np.inf
    return np.argsort(keys, axis=-1)[..., :n]


@dataclass(frozen=True)
class EpisodeSampler:
    """Meta-batches of ``ways``-way ``shots``-shot tasks with ``queries`` query drawings per class.
    ``query_pool`` (same classes, other drawings) supplies the queries when given; ``augment`` (e.g.
    :class:`~bilevel_ray.meta.augment.RandomAffine`, for training) warps every drawing with
    parameters drawn from the same generator."""

    pool: ClassPool
    ways: int
    shots: int
    queries: int
    meta_batch: int = 1
    query_pool: ClassPool | None = None
    augment: Callable[[torch.Tensor, np.random.Generator], torch.Tensor] | None = None

    def __post_init__(self) -> None:
        for name in ("ways", "shots", "meta_batch"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise ValueError(f"task.{name}: must be an integer >= 1, got {getattr(self, name)!r}")
        if not (isinstance(self.queries, int) and self.queries >= 0):
            raise ValueError(f"task.queries: must be an integer >= 0, got {self.queries!r}")
        if self.ways > self.pool.num_classes:
            raise ValueError(f"task.ways: {self.ways} ways need as many classes; the pool has {self.pool.num_classes}")
        need = self.shots + (0 if self.query_pool is not None else self.queries)
        if need > self.pool.min_count:
            raise ValueError(f"task.shots: shots + queries = {need} drawings per class, but a class of the pool "
                             f"has only {self.pool.min_count}")
        if self.query_pool is not None and self.queries > self.query_pool.min_count:
            raise ValueError(f"task.queries: {self.queries} queries per class, the query pool has {self.query_pool.min_count}")

    num_batches = None  # an infinite stream

    def episodes(self, rng: np.random.Generator, meta_batch: int | None = None, *,
                 among: np.ndarray | None = None, class_rng: np.random.Generator | None = None) -> Episode:
        """``meta_batch`` tasks (default ``self.meta_batch``), their classes drawn from ``among``
        (pool class ids, rotated copies included; default all) with ``class_rng`` (default ``rng``),
        their drawings and warps with ``rng``."""
        b = self.meta_batch if meta_batch is None else meta_batch
        n, k, q = self.ways, self.shots, self.queries
        size = self.pool.num_classes if among is None else len(among)
        classes = np.argsort((rng if class_rng is None else class_rng).random((b, size)), axis=1)[:, :n]
        if among is not None:
            classes = np.asarray(among)[classes]
        counts = self.pool._counts[classes // self.pool.rotations]
        if self.query_pool is None:
            picks = _pick(rng, counts, k + q)
            imgs = self.pool.gather(classes, picks)
            sup, qry = imgs[:, :, :k], imgs[:, :, k:]
        else:
            sup = self.pool.gather(classes, _pick(rng, counts, k))
            qcounts = self.query_pool._counts[classes // self.pool.rotations]
            qry = self.query_pool.gather(classes, _pick(rng, qcounts, q))
        if self.augment is not None:
            sup, qry = self.augment(sup, rng), self.augment(qry, rng)
        labels = torch.arange(n, device=sup.device)
        shape = sup.shape[-3:]
        return Episode(sup.reshape(b, n * k, *shape), labels.repeat_interleave(k).expand(b, -1).contiguous(),
                       qry.reshape(b, n * q, *shape), labels.repeat_interleave(q).expand(b, -1).contiguous(),
                       torch.from_numpy(classes).to(sup.device))

    def sample(self, rng: np.random.Generator) -> tuple[int, Episode]:
        """``(-1, episode)``: one meta-batch drawn with ``rng`` (an infinite stream)."""
        return -1, self.episodes(rng)


def learn2learn_tasks(pool: ClassPool, ways: int, shots: int, queries: int, *, num_tasks: int = -1) -> Any:
    """The same episodes through learn2learn's pipeline: a ``TaskDataset`` with the transforms
    ``FusedNWaysKShots`` (``shots + queries`` per class), ``LoadData``, ``RemapLabels`` and
    ``ConsecutiveLabels``; with ``rotations=4`` every rotated copy is a class of its own. A task is
    ``(images (ways·(shots+queries), 1, S, S) in [0, 1], labels)`` grouped by class, shots first
    (split with :func:`split_l2l_task`). learn2learn draws from Python's ``random`` module."""
    from bilevel_ray.tasks.vision.l2l import import_learn2learn

    l2l = import_learn2learn()
    n_base = len(pool._counts)
    rows = [(c * pool.rotations + r, j) for c in range(n_base) for r in range(pool.rotations)
            for j in range(pool._counts[c])]

    class _Rotated(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(rows)

        def __getitem__(self, i: int):
            cls, j = rows[i]
            return pool.gather(np.array([cls]), np.array([[j]]))[0, 0], cls

    meta = l2l.data.MetaDataset(_Rotated())
    transforms = [l2l.data.transforms.FusedNWaysKShots(meta, n=ways, k=shots + queries),
                  l2l.data.transforms.LoadData(meta), l2l.data.transforms.RemapLabels(meta),
                  l2l.data.transforms.ConsecutiveLabels(meta)]
    return l2l.data.TaskDataset(meta, task_transforms=transforms, num_tasks=num_tasks)


def split_l2l_task(task: tuple[torch.Tensor, torch.Tensor], ways: int, shots: int, queries: int):
    """``(support, support_labels, query, query_labels)`` of one learn2learn task (labels ``0..ways-1``)."""
    images, labels = task
    per = shots + queries
    order = torch.argsort(labels, stable=True)
    images, labels = images[order].reshape(ways, per, *images.shape[1:]), labels[order].reshape(ways, per)
    flat = lambda t: t.reshape(-1, *t.shape[2:])  # noqa: E731
    return flat(images[:, :shots]), flat(labels[:, :shots]), flat(images[:, shots:]), flat(labels[:, shots:])

"""Few-shot Omniglot as a hyper-representation bilevel problem (Franceschi et al. 2018; Bertinetto et
al. 2019), solvable by every core algorithm and on every backend.

Upper variable ``x``: the conv backbone (:mod:`~bilevel_ray.meta.backbone`). Lower variable
``y``: a table of linear class heads, one row ``[w_c, b_c]`` per training class (rotated copies are
classes of their own). A task is an N-way episode; its linear head is the N rows of its classes, so
class identity persists across tasks and ``y`` is a genuine shared lower-level variable:

``g(x, y) = E_task CE(head_task(y); support drawings) + reg/2 ‖y‖²`` (strongly convex in ``y``),
``f(x, y) = E_task CE(head_task(y); query drawings)``,

with support and query drawn from disjoint drawings of each character (the first
``support_drawings`` and the rest). With ``softmax="all"`` a drawing is scored against every row of
``y`` (every training class), not only its task's: each step then pushes every head away from the
batch's drawings of other classes, as in classifier pre-training (Tian et al. 2020), and the lower
level stays strongly convex. New classes are handled by fitting a fresh head on the support
embeddings (:func:`~bilevel_ray.meta.learners.fit_head`); ``metrics`` reports that few-shot accuracy
on the test split's unseen alphabets. Decentralized agents each take their own alphabets.

With ``head="prototype"`` a row of ``y`` is a class centre ``c`` (prototypical networks' metric, Snell
et al. 2017, with persistent centres): ``g`` is, per class of the batch, half the mean squared distance
of its row to its support features (plus the ridge term), minimised by the class's mean support
feature, and ``f`` scores a query drawing by ``−s‖φ − c‖²`` (``s = distance_scale``, ½ by default).
A new task's lower level is then solved exactly by its support features' class means, which is how its
learner classifies (no head fitting).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from bilevel_ray.params import hp
from bilevel_ray.tasks import Task, register_task
from bilevel_ray.tasks._data import DTYPES
from bilevel_ray.meta.augment import RandomAffine
from bilevel_ray.meta.backbone import feature_dim, features, init_backbone
from bilevel_ray.tasks.vision.episodes import ClassPool, EpisodeSampler
from bilevel_ray.tasks.vision.omniglot import SPLITS, load_omniglot

__all__ = ["OmniglotTask", "HEADS"]

#: spawn key of the generator that picks a step's classes with ``paired`` tasks
PAIRED_KEY = 0x5EED
#: spawn key of the generator of a step's support drawings and warps with ``fixed_support``
FIXED_KEY = 0x5EEE

#: what a row of ``y`` is: a linear class head ``[w_c, b_c]``, or a class centre ``c`` (prototype)
HEADS = ("linear", "prototype")


@register_task("omniglot")
@dataclass(frozen=True)
class OmniglotTask(Task):
    """Few-shot Omniglot as hyper-representation learning: backbone ``x``, class heads or centres ``y``
    (see the module docstring)."""

    root: str | None = hp(None, doc="folder holding the Omniglot zips (default: $BILEVEL_RAY_DATA, ../shared/data/omniglot)")
    train_split: str = hp("images_background_small1", choices=SPLITS, doc="meta-training characters")
    test_split: str | None = hp("images_background_small2", choices=(*SPLITS, None),
                                doc="its alphabets absent from train_split give test_acc (null: none)")
    ways: int = hp(20, low=2, strict=False, doc="classes per training task")
    shots: int = hp(5, low=1, strict=False, doc="support drawings per class (lower level)")
    queries: int = hp(5, low=1, strict=False, doc="query drawings per class (upper level)")
    meta_batch: int = hp(4, low=1, strict=False, doc="tasks per minibatch")
    rotations: int = hp(4, choices=(1, 4), doc="4: rotated characters are extra classes")
    augment: float = hp(0.0, low=0, high=2, strict=False, doc="magnitude of random affine warps of training drawings (0: none)")
    support_drawings: int = hp(10, low=1, strict=False, doc="first drawings of each character for the lower level")
    width: int = hp(32, low=1, strict=False, doc="channels of the conv backbone")
    depth: int = hp(4, low=1, high=4, strict=False, doc="conv blocks")
    paired: bool = hp(False, doc="a step's lower- and upper-level minibatches are the same tasks (support and "
                                 "query drawings of the same classes, as in episodic meta-learning); false: "
                                 "independent draws")
    fixed_support: bool = hp(False, doc="with paired: every lower-level draw of a step (lower steps, linear system, "
                                        "cross-derivative) is the same support batch, drawings and warps, so one step "
                                        "differentiates one episode, as prototypical networks do; false: fresh "
                                        "drawings of the step's classes each time")
    softmax: str = hp("task", choices=("task", "all"),
                      doc="classes a drawing is scored against: its task's ways, or every training class")
    head: str = hp("linear", choices=HEADS,
                   doc="rows of y: linear heads (lower level: support CE), or class centres (lower level: "
                       "squared distance to the support features; logits -s||phi - y_c||^2, s = distance_scale)")
    distance_scale: float = hp(0.5, low=0,
                               doc="prototype head: logits are -distance_scale * squared distance to the centres "
                                   "(0.5: the centres' quadratic form; 1: prototypical networks' logits)")
    reg: float = hp(1e-3, low=0, doc="ridge weight of the heads (strong convexity)")
    temperature: float = hp(10.0, low=0, strict=False, doc="features are L2-normalised and scaled by this (0: raw features)")
    head_steps: int = hp(50, low=0, strict=False,
                         doc="gradient steps fitting a new task's linear head (prototype rows: none, its class centres)")
    eval_ways: int = hp(5, low=2, strict=False, doc="ways of the test_acc tasks")
    eval_shots: int = hp(1, low=1, strict=False, doc="shots of the test_acc tasks")
    eval_tasks: int = hp(100, low=2, strict=False, doc="tasks in test_acc (fixed set)")
    dtype: str = hp("float32", choices=tuple(DTYPES))
    seed: int = hp(0, low=0, strict=False, doc="seed of the fixed metric tasks")

    def __post_init__(self) -> None:
        super().__post_init__()
        train = load_omniglot(self.train_split, root=self.root)
        pool = ClassPool(train.images, train.labels, self.rotations)
        try:
            inner, outer = pool.split_drawings(self.support_drawings)
        except ValueError as err:
            raise ValueError(f"task.support_drawings: {err}") from None
        object.__setattr__(self, "data", train)
        object.__setattr__(self, "num_classes", pool.num_classes)
        if self.fixed_support and not self.paired:
            raise ValueError("task.fixed_support: needs task.paired: true (the same support batch for a step's "
                             "lower-level draws pairs them with its query tasks)")
        object.__setattr__(self, "inner", self._sampler(inner, self.shots, "shots", fixed=self.fixed_support))
        object.__setattr__(self, "outer", self._sampler(outer, self.queries, "queries"))
        test = None
        if self.test_split is not None:
            data = load_omniglot(self.test_split, root=self.root).select(exclude=train.alphabets)
            test = EpisodeSampler(ClassPool(data.images, data.labels), self.eval_ways, self.eval_shots, 15)
        object.__setattr__(self, "test", test)

    def _sampler(self, pool: ClassPool, shots: int, name: str, *, fixed: bool = False) -> "_TaskSampler":
        try:
            sampler = EpisodeSampler(pool, self.ways, shots, 0, self.meta_batch, augment=RandomAffine(self.augment))
            return _TaskSampler(sampler, None, self.seed, self.paired, fixed)
        except ValueError as err:
            raise ValueError(str(err).replace("task.shots", f"task.{name}")) from None

    # -- the bilevel problem -------------------------------------------------------------------------
    def _features(self, x: dict[str, torch.Tensor], batch: Any, dtype: torch.dtype) -> torch.Tensor:
        images = batch.support
        b, n = batch.support_labels.shape
        return features(x, images.reshape(b * n, *images.shape[2:]).to(dtype), self.temperature,
                        channels_last=True).reshape(b, n, -1)

    def _logits(self, x: dict[str, torch.Tensor], y: torch.Tensor, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits of the batch's images and their targets: ``(B·n, ways)`` under their tasks' rows of ``y``
        with ``softmax="task"``, ``(B·n, classes)`` under every row with ``"all"``. A prototype row ``c``
        scores ``2s(φ·c − ‖c‖²/2)``, which is ``−s‖φ − c‖²`` (``s = distance_scale``) up to a per-drawing
        constant (the softmax's)."""
        feats, classes = self._features(x, batch, y.dtype), batch.classes
        b, n, _ = feats.shape
        if self.head == "prototype":
            y = 2 * self.distance_scale * torch.cat([y, -0.5 * (y * y).sum(1, keepdim=True)], 1)
        if self.softmax == "all":
            return (F.linear(feats.reshape(b * n, -1), y[:, :-1], y[:, -1]),
                    torch.gather(classes, 1, batch.support_labels).reshape(-1))
        heads = y[classes]
        logits = torch.einsum("bnd,bkd->bnk", feats, heads[..., :-1]) + heads[..., -1][:, None, :]
        return logits.reshape(b * n, -1), batch.support_labels.reshape(-1)

    def _loss(self, x: dict[str, torch.Tensor], y: torch.Tensor, batch: Any) -> torch.Tensor:
        return F.cross_entropy(*self._logits(x, y, batch))

    def g(self, x: dict[str, torch.Tensor], y: torch.Tensor, batch: Any) -> torch.Tensor:
        """Lower objective on the support ``batch``: the heads' cross-entropy, or the prototype rows' squared
        distances to the support features, plus the ridge term."""
        ridge = 0.5 * self.reg * (y * y).sum()
        if self.head == "linear":
            return self._loss(x, y, batch) + ridge
        # per class of the batch, ½ the mean squared distance of its row to its support features (a class
        # drawn by several tasks of the batch counts once): the minimiser is every class's mean support
        # feature, and a step ρ moves a sampled row a fraction ρ of the way to its batch mean (an
        # exponential moving average of the class centre)
        feats = self._features(x, batch, y.dtype)
        ids = torch.gather(batch.classes, 1, batch.support_labels).reshape(-1)
        count = torch.bincount(ids)[ids]  # drawings of each drawing's class in the batch
        sq = ((y[ids] - feats.reshape(ids.numel(), -1)) ** 2).sum(1)
        return 0.5 * (sq / count).sum() + ridge

    def f(self, x: dict[str, torch.Tensor], y: torch.Tensor, batch: Any) -> torch.Tensor:
        """Upper objective: cross-entropy of the query ``batch`` under the rows of ``y``."""
        return self._loss(x, y, batch)

    def init(self, *, seed: int = 0) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """A fresh backbone from ``seed`` and a zero row of ``y`` per training class."""
        x = init_backbone(width=self.width, depth=self.depth, seed=seed, dtype=DTYPES[self.dtype])
        dim = feature_dim(x, self.data.images.shape[-1]) + (self.head == "linear")
        return x, torch.zeros(self.num_classes, dim, dtype=DTYPES[self.dtype])

    # -- agents, learner, metrics --------------------------------------------------------------------
    def shard(self, n_agents: int, *, split: str = "iid", alpha: float = 0.5, seed: int = 0):
        """Each agent's ``(inner, outer)`` samplers over its own alphabets (characters when there are
        more agents than alphabets); ``y`` keeps the global class numbering, so heads mix consistently."""
        if split != "iid":
            raise ValueError("decentralized.split: the omniglot task splits by alphabet; use 'iid'")
        alphabets = self.data.alphabets
        owner_of_char = np.empty(len(self.data.classes), dtype=np.int64)
        if n_agents <= len(alphabets):
            order = np.random.default_rng([seed, 3]).permutation(len(alphabets))
            agent_of = {alphabets[a]: i % n_agents for i, a in enumerate(order)}
            for c, (a, _) in enumerate(self.data.classes):
                owner_of_char[c] = agent_of[a]
        else:
            owner_of_char[:] = np.random.default_rng([seed, 3]).permutation(len(self.data.classes)) % n_agents
        owner = np.repeat(owner_of_char, self.rotations)  # rotated ids are c * rotations + r
        out = []
        for i in range(n_agents):
            mine = np.flatnonzero(owner == i)
            if len(mine) < self.ways:
                raise ValueError(f"decentralized.agents: agent {i} gets {len(mine)} classes, fewer than task.ways="
                                 f"{self.ways}; use fewer agents or fewer ways")
            out.append((_TaskSampler(self.inner.sampler, mine, self.seed + i, self.paired, self.fixed_support),
                        _TaskSampler(self.outer.sampler, mine, self.seed + i, self.paired)))
        return out

    def learner(self, x: dict[str, torch.Tensor], y: torch.Tensor) -> Any:
        """The few-shot learner of backbone ``x``: new tasks get a head fitted on their support set, or with
        ``head="prototype"`` their support prototypes, scored as in training (``−s‖φ − c‖²``)."""
        from bilevel_ray.meta.fewshot import FewShotLearner

        head = ({"reg": self.reg, "head_steps": self.head_steps} if self.head == "linear"
                else {"distance_scale": self.distance_scale})  # prototypes, scored with the training logits' scale
        hyper = {**head, "temperature": self.temperature, "train_split": self.train_split,
                 "size": int(self.data.images.shape[-1])}
        return FewShotLearner("hyperrep", {k: v.detach() for k, v in x.items()}, hyper)

    def metrics(self, x: dict[str, torch.Tensor], y: torch.Tensor) -> dict[str, float]:
        """Query loss and accuracy on the fixed query set and, with a ``test_split``, few-shot ``test_acc``
        on its unseen alphabets."""
        with torch.no_grad():  # one forward pass for both (f is the cross-entropy of these logits)
            logits, labels = self._logits(x, y, self.outer.full())
        out = {"outer_objective": float(F.cross_entropy(logits, labels)),
               "query_acc": float((logits.argmax(1) == labels).double().mean())}
        if self.test is not None:
            from bilevel_ray.meta.fewshot import evaluate

            out["test_acc"] = evaluate(self.learner(x, y), self.test, tasks=self.eval_tasks, seed=self.seed)[0]
        return out


@dataclass(frozen=True)
class _TaskSampler:
    """An :class:`EpisodeSampler` restricted to ``classes`` (all when ``None``), as a problem sampler;
    ``full()`` is a fixed set of 4 meta-batches (for metrics and full-batch methods). ``paired``: the
    classes come from a generator derived from the seed of ``rng`` (not from its draws so far), so every
    draw from one step's generator, lower or upper level, has the same tasks; ``fixed``: so do the
    drawings and warps (every draw from one step's generator is the same batch)."""

    sampler: EpisodeSampler
    classes: np.ndarray | None
    seed: int
    paired: bool = False
    fixed: bool = False

    num_batches = None

    def sample(self, rng: np.random.Generator) -> tuple[int, Any]:
        return -1, self._draw(rng, self.sampler.meta_batch)

    def _draw(self, rng: np.random.Generator, b: int) -> Any:
        class_rng = None
        if self.paired:
            seq = rng.bit_generator.seed_seq
            class_rng = np.random.default_rng(np.random.SeedSequence(seq.entropy, spawn_key=(*seq.spawn_key, PAIRED_KEY)))
            if self.fixed:
                rng = np.random.default_rng(np.random.SeedSequence(seq.entropy, spawn_key=(*seq.spawn_key, FIXED_KEY)))
        return self.sampler.episodes(rng, b, among=self.classes, class_rng=class_rng)

    def full(self) -> Any:
        cached = self.__dict__.get("_full")
        if cached is None:
            cached = self._draw(np.random.default_rng([self.seed, 104729]), 4 * self.sampler.meta_batch)
            object.__setattr__(self, "_full", cached)
        return cached

"""Episodic meta-training of the baselines (MAML, first-order MAML, iMAML, prototypical networks, ridge heads):
Adam on the meta-parameters, one vmapped meta-gradient per meta-batch, reproducible from ``seed``,
at a constant meta learning rate or one decayed to zero along a half cosine (Loshchilov & Hutter 2017)."""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np
import torch

from bilevel_ray.algorithms.base import cosine_decay
from bilevel_ray.meta.fewshot import FewShotLearner
from bilevel_ray.meta.learners import check_batching, meta_loss_and_grad, meta_params
from bilevel_ray.meta.backbone import init_backbone

__all__ = ["DEFAULTS", "SCHEDULES", "meta_train"]

#: meta learning-rate schedules: constant, or ``lr · (1 + cos(π · progress)) / 2``, with progress the
#: fraction of ``steps`` done or of ``budget_s`` elapsed, whichever is further
SCHEDULES = ("constant", "cosine")

#: adaptation settings of each kind (``lr``/``steps``: inner SGD; ``batching``: MAML's batched form,
#: ``"grouped"`` or ``"vmap"``; ``lam``/``cg_iters``: iMAML; ``scale``/``reg``: the starting logit scale and
#: ridge weight of ridge heads, which meta-training then learns)
DEFAULTS: dict[str, dict[str, Any]] = {
    "maml": {"steps": 1, "lr": 0.4, "batching": "grouped"},
    "fomaml": {"steps": 3, "lr": 0.4, "batching": "grouped"},
    "imaml": {"steps": 8, "lr": 0.2, "lam": 0.5, "cg_iters": 5},
    "protonet": {},
    "ridge": {"scale": 10.0, "reg": 1.0},
}


def _progress(t: int, steps: int | None, elapsed: float, budget_s: float | None) -> float:
    """How far training is, in [0, 1) until it stops: the larger of the step and time fractions."""
    by_steps = 0.0 if steps is None else (t / steps if steps > 0 else 1.0)
    by_time = 0.0 if budget_s is None else (elapsed / budget_s if budget_s > 0 else 1.0)
    return max(by_steps, by_time)


def meta_train(kind: str, sampler: Any, *, steps: int | None = None, budget_s: float | None = None,
               meta_lr: float = 1e-3, width: int = 64, depth: int = 4, seed: int = 0,
               dtype: torch.dtype = torch.float32, hyper: dict[str, Any] | None = None,
               theta: dict[str, torch.Tensor] | None = None, log: Callable[[dict[str, float]], None] | None = None,
               log_every: int = 50, train_split: str | None = None, schedule: str = "constant") -> FewShotLearner:
    """Meta-train a learner of ``kind`` on ``sampler``'s meta-batches for ``steps`` steps or until
    ``budget_s`` seconds of wall time, whichever comes first, with ``meta_lr`` following ``schedule``
    (one of ``SCHEDULES``), from ``theta`` (a backbone, with or without a kind's extra meta-parameters)
    or a fresh backbone of ``width``/``depth``. ``train_split`` is recorded in the learner
    (``bilevel-ray eval`` then tests on the other alphabets only)."""
    if kind not in DEFAULTS:
        raise ValueError(f"kind: must be one of {', '.join(DEFAULTS)}, got {kind!r}")
    if steps is None and budget_s is None:
        raise ValueError("meta_train: give steps or budget_s")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule: must be {' or '.join(SCHEDULES)}, got {schedule!r}")
    settings = {**DEFAULTS[kind], **(hyper or {})}
    for key in settings:
        if key not in DEFAULTS[kind]:
            raise ValueError(f"hyper.{key}: unknown for {kind}; allowed: {', '.join(DEFAULTS[kind]) or 'none'}")
    if "batching" in settings:
        check_batching(settings["batching"])
    if theta is None:
        theta = init_backbone(width=width, depth=depth, seed=seed, dtype=dtype)
    theta = {**meta_params(kind, theta, settings), **theta}  # a given theta keeps its own ridge parameters
    params = {k: v.clone().requires_grad_(True) for k, v in theta.items()}
    opt = torch.optim.Adam(params.values(), lr=meta_lr)
    start, t = time.perf_counter(), 0
    while (progress := _progress(t, steps, time.perf_counter() - start, budget_s)) < 1:
        if schedule == "cosine":
            opt.param_groups[0]["lr"] = cosine_decay(meta_lr, progress)
        episode = sampler.episodes(np.random.default_rng([seed, 0, t]))
        loss, grads = meta_loss_and_grad(kind, {k: v.detach() for k, v in params.items()}, settings, episode)
        for k, p in params.items():
            p.grad = grads[k]
        opt.step()
        t += 1
        if log is not None and (t % log_every == 0):
            log({"step": t, "wall": time.perf_counter() - start, "loss": float(loss), "lr": opt.param_groups[0]["lr"]})
    size = int(sampler.pool.images.shape[-1])
    return FewShotLearner(kind, {k: v.detach().clone() for k, v in params.items()},
                          {**settings, "size": size, "steps_trained": t, "train_split": train_split})

"""Episodic few-shot learners with per-task inner problems batched over the meta-batch (``torch.func.vmap``).

Every function of one task takes ``(support, support_labels, query, query_labels)`` of that task and the
shared meta-parameters ``theta`` (the backbone of :mod:`bilevel_ray.meta.backbone`, plus a
``head.*`` pair when the head is meta-learned); ``vmap`` maps it over the tasks of an episode.

- MAML (Finn, Abbeel, Levine 2017): ``steps`` SGD steps on the support loss from ``theta``, query loss
  differentiated through the steps (second order). The head starts at ``theta``'s head or at zero
  (any number of ways; the first step then gives prototype-like rows). Its meta-gradient has a second,
  faster batched form (:func:`maml_meta_grad`: the tasks as groups of one grouped network, plain autograd);
  ``hyper["batching"]`` picks ``"grouped"`` (default) or ``"vmap"``.
- First-order MAML: the same, with the adaptation's Jacobian dropped.
- iMAML (Rajeswaran, Finn, Kakade, Levine 2019), the proximal bilevel form
  ``y*(x) = argmin_y L_support(y) + λ/2‖y − x‖²``: solved by ``steps`` gradient steps; meta-gradient
  ``(I + ∇²L_support/λ)⁻¹ ∇L_query(y*)`` by ``cg_iters`` conjugate-gradient steps on HVPs.
- Prototypical networks (Snell, Swersky, Zemel 2017): class means of embeddings, logits
  ``−‖f(q) − c_k‖²``.
- Hyper-representation heads: a linear head fitted on the support embeddings
  (``argmin CE + reg/2‖W‖²``, from the prototype classifier, ``head_steps`` gradient steps).
- Ridge heads (R2-D2, Bertinetto, Henriques, Torr, Vedaldi 2019), the hyper-representation bilevel form
  with a per-task lower level: ``W*(x) = argmin_W ½ mean ‖[φ_x(S), 1] Wᵀ − Y_S‖² + λ/2‖W‖²`` (strongly
  convex, solved exactly in closed form), upper level the query cross-entropy of ``α [φ_x(Q), 1] W*ᵀ``.
  Differentiating through the linear solve is the exact implicit hypergradient; the meta-parameters are
  the backbone and ``log α``, ``log λ`` (``ridge.log_scale``, ``ridge.log_reg``).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.func import grad, grad_and_value, vjp, vmap

from bilevel_ray.meta.backbone import embed, embed_tasks, feature_dim, features

__all__ = ["KINDS", "BATCHINGS", "check_batching", "meta_params", "with_head", "forward", "maml_adapt",
           "maml_task_loss", "maml_tasks_logits", "imaml_solve", "imaml_task_grad", "proto_logits",
           "shared_meta_loss", "fit_head", "ridge_head", "head_logits", "task_logits", "episode_task_logits",
           "maml_meta_grad", "meta_loss_and_grad", "cg_fixed"]

Params = dict[str, torch.Tensor]
KINDS = ("maml", "fomaml", "imaml", "protonet", "ridge", "hyperrep")
#: kinds whose embedding does not depend on the task: every image of a batch is embedded at once
SHARED_EMBEDDING = ("protonet", "ridge", "hyperrep")
#: of those, the kinds that score the backbone's raw embedding and train episodically (``hyperrep``
#: normalises its features and is trained by the bilevel algorithms)
RAW_EMBEDDING = ("protonet", "ridge")
#: images per embedding call at test time (bounds the activations' memory: whole evaluation chunks of
#: tens of thousands of images at once ran several times slower, and 50 vmapped 20-way MAML tasks at
#: width 64 with support warps, 17,000 images, took more than 24 GiB)
EMBED_CHUNK = 2048
#: MAML's batched forms of the meta-gradient
BATCHINGS = ("grouped", "vmap")


def check_batching(value: Any) -> None:
    """Refuse an unknown ``hyper["batching"]`` with a one-line error naming the allowed values."""
    if value not in BATCHINGS:
        raise ValueError(f"hyper.batching: must be {' or '.join(BATCHINGS)}, got {value!r}")


def meta_params(kind: str, backbone: Params, hyper: dict[str, Any]) -> Params:
    """The meta-parameters a learner of ``kind`` starts from: the backbone, plus for ridge heads the
    logarithms of the logit scale ``hyper["scale"]`` and the ridge weight ``hyper["reg"]``."""
    if kind != "ridge":
        return dict(backbone)
    for key in ("scale", "reg"):
        if not (isinstance(hyper[key], (int, float)) and hyper[key] > 0):
            raise ValueError(f"hyper.{key}: must be a number > 0, got {hyper[key]!r}")
    like = next(iter(backbone.values()))
    return {**backbone, "ridge.log_scale": like.new_tensor(math.log(hyper["scale"])),
            "ridge.log_reg": like.new_tensor(math.log(hyper["reg"]))}


def _map(fn: Callable, *trees: Params) -> Params:
    return {k: fn(*(t[k] for t in trees)) for k in trees[0]}


def _dot(a: Params, b: Params) -> torch.Tensor:
    return sum((a[k] * b[k]).sum() for k in a)


def with_head(theta: Params, ways: int, dim: int) -> Params:
    """``theta`` plus a zero ``ways``-way head, unless it carries a head of that many rows."""
    if "head.weight" in theta and theta["head.weight"].shape[0] == ways:
        return dict(theta)
    like = next(iter(theta.values()))
    return {**{k: v for k, v in theta.items() if not k.startswith("head.")},
            "head.weight": like.new_zeros(ways, dim), "head.bias": like.new_zeros(ways)}


def forward(params: Params, images: torch.Tensor) -> torch.Tensor:
    """Logits of the backbone followed by the linear head ``params['head.*']``."""
    return F.linear(embed(params, images), params["head.weight"], params["head.bias"])


def _loss(params: Params, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(forward(params, images), labels)


def _dim(theta: Params, images: torch.Tensor) -> int:
    return feature_dim(theta, images.shape[-1])


def maml_adapt(theta: Params, support: torch.Tensor, labels: torch.Tensor, ways: int, *, steps: int,
               lr: float, first_order: bool = False) -> Params:
    """``steps`` SGD steps on the support loss from ``theta`` (with its head or a zero one)."""
    params = with_head(theta, ways, _dim(theta, support))
    for _ in range(steps):
        g = grad(_loss)(params, support, labels)
        if first_order:
            g = _map(torch.Tensor.detach, g)
        params = _map(lambda p, d: p - lr * d, params, g)
    return params


def maml_task_loss(theta: Params, support, support_labels, query, query_labels, *, ways: int, steps: int,
                   lr: float, first_order: bool = False) -> torch.Tensor:
    """Query loss after adaptation: differentiating it in ``theta`` gives the MAML meta-gradient."""
    return _loss(maml_adapt(theta, support, support_labels, ways, steps=steps, lr=lr, first_order=first_order),
                 query, query_labels)


def _tasks_logits(params: Params, images: torch.Tensor) -> torch.Tensor:
    """Logits ``(B, n, ways)`` of ``B`` tasks' images, task ``b`` under ``params[k][b]``."""
    return torch.matmul(embed_tasks(params, images), params["head.weight"].mT) + params["head.bias"][:, None, :]


def _tasks_loss(params: Params, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over tasks of each task's mean cross-entropy (``params`` with a leading task axis)."""
    logits = _tasks_logits(params, images)
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum") / labels.shape[1]


def _grouped_adapt(theta: Params, support: torch.Tensor, labels: torch.Tensor, *, ways: int, steps: int,
                   lr: float, create_graph: bool) -> tuple[Params, Params]:
    """MAML's ``steps`` SGD steps on every task's support loss, all tasks as one grouped network (call
    with grad enabled). Returns the leaves (a detached, grad-requiring copy of ``theta`` with its head or a
    zero one) and the adapted parameters, which carry a leading task axis."""
    leaves = {k: v.detach().requires_grad_(True) for k, v in with_head(theta, ways, _dim(theta, support)).items()}
    params = {k: v.expand(support.shape[0], *v.shape) for k, v in leaves.items()}
    for _ in range(steps):
        g = torch.autograd.grad(_tasks_loss(params, support, labels), list(params.values()), create_graph=create_graph)
        params = {k: p - lr * d for (k, p), d in zip(params.items(), g)}
    return leaves, params


def maml_meta_grad(theta: Params, episode: Any, *, steps: int, lr: float, first_order: bool = False
                   ) -> tuple[torch.Tensor, Params]:
    """``(mean query loss, meta-gradient)`` of (first-order) MAML over the episode's tasks, all tasks at
    once: ``theta`` broadcast along a task axis, each task's SGD steps as one grouped network
    (:func:`~bilevel_ray.meta.backbone.embed_tasks`), the query loss differentiated back through
    the steps by ``torch.autograd`` (``create_graph`` unless ``first_order``). Equals the vmapped
    :func:`maml_task_loss` form."""
    tasks, ways = episode.classes.shape
    with torch.enable_grad():
        leaves, params = _grouped_adapt(theta, episode.support, episode.support_labels, ways=ways, steps=steps,
                                        lr=lr, create_graph=not first_order)
        loss = _tasks_loss(params, episode.query, episode.query_labels) / tasks
        grads = torch.autograd.grad(loss, [leaves[k] for k in theta])
    return loss.detach(), dict(zip(theta, grads))


def maml_tasks_logits(theta: Params, hyper: dict[str, Any], support, support_labels, query, *, ways: int
                      ) -> torch.Tensor:
    """Query logits ``(B, q, ways)`` of a batch of tasks after MAML's test-time adaptation (first order:
    nothing is differentiated through it), as one grouped network: :func:`task_logits` of each task."""
    with torch.enable_grad():
        _, params = _grouped_adapt(theta, support, support_labels, ways=ways, steps=hyper["steps"], lr=hyper["lr"],
                                   create_graph=False)
    with torch.no_grad():
        return _tasks_logits(params, query)


def imaml_solve(theta: Params, support, labels, ways: int, *, lam: float, steps: int, lr: float) -> Params:
    """Approximate ``argmin_y L_support(y) + λ/2‖y − θ‖²`` by gradient steps from ``θ`` (head from 0)."""
    anchor = _map(torch.Tensor.detach, with_head(theta, ways, _dim(theta, support)))
    y = anchor
    for _ in range(steps):
        g = grad(_loss)(y, support, labels)
        y = _map(lambda p, d, a: p - lr * (d + lam * (p - a)), y, g, anchor)
    return _map(torch.Tensor.detach, y)


def cg_fixed(apply: Callable[[Params], Params], b: Params, iters: int) -> Params:
    """``iters`` conjugate-gradient steps for ``A u = b`` (no data-dependent stopping, so it vmaps)."""
    u = _map(torch.zeros_like, b)
    r, p = b, b
    rs = _dot(r, r)
    tiny = torch.finfo(rs.dtype).tiny
    for _ in range(iters):
        ap = apply(p)
        alpha = rs / (_dot(p, ap) + tiny)
        u = _map(lambda a, d: a + alpha * d, u, p)
        r = _map(lambda a, d: a - alpha * d, r, ap)
        rs_new = _dot(r, r)
        p = _map(lambda a, d: a + (rs_new / (rs + tiny)) * d, r, p)
        rs = rs_new
    return u


def imaml_task_grad(theta: Params, support, support_labels, query, query_labels, *, ways: int, lam: float,
                    steps: int, lr: float, cg_iters: int) -> tuple[torch.Tensor, Params]:
    """``(query loss, meta-gradient)`` of one task: ``P^T (I + H/λ)⁻¹ ∇L_query(y*)``, where ``H`` is the
    support loss's Hessian at ``y*`` and ``P`` keeps ``θ``'s entries (the head's anchor is fixed at 0)."""
    y = imaml_solve(theta, support, support_labels, ways, lam=lam, steps=steps, lr=lr)
    gq, lq = grad_and_value(_loss)(y, query, query_labels)
    _, pull = vjp(lambda p: grad(_loss)(p, support, support_labels), y)
    u = cg_fixed(lambda v: _map(lambda a, h: a + h / lam, v, pull(v)[0]), gq, cg_iters)
    return lq, {k: u[k] for k in theta}


def _prototypes(feats: torch.Tensor, labels: torch.Tensor, ways: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(one-hot labels, class means)`` of support features ``(..., n, d)`` (any leading task axes)."""
    onehot = F.one_hot(labels, ways).to(feats.dtype)
    return onehot, onehot.transpose(-1, -2) @ feats / onehot.sum(-2)[..., None]


def _proto_scores(support_feats: torch.Tensor, labels: torch.Tensor, query_feats: torch.Tensor, ways: int) -> torch.Tensor:
    """``−‖f(q) − c_k‖²`` from support and query features ``(..., n, d)``."""
    _, protos = _prototypes(support_feats, labels, ways)
    return -((query_feats[..., :, None, :] - protos[..., None, :, :]) ** 2).sum(-1)


def proto_logits(theta: Params, support, support_labels, query, *, ways: int) -> torch.Tensor:
    """``−‖f(q) − c_k‖²`` with ``c_k`` the mean embedding of class ``k``'s support images."""
    return _proto_scores(embed(theta, support), support_labels, embed(theta, query), ways)


def shared_meta_loss(kind: str, theta: Params, episode: Any) -> torch.Tensor:
    """Mean query cross-entropy over the episode's tasks of prototypical networks or ridge heads, every
    image of every task embedded in one batch (the embedding does not depend on the task, so no ``vmap``
    is needed: one large batch runs faster than vmap's per-layer rewriting)."""
    logits = episode_task_logits(kind, theta, {}, episode.support, episode.support_labels, episode.query,
                                 episode.ways)
    return F.cross_entropy(logits.flatten(0, 1), episode.query_labels.flatten())


def fit_head(feats: torch.Tensor, labels: torch.Tensor, *, ways: int, reg: float, steps: int) -> torch.Tensor:
    """``argmin_W mean CE([f, 1] W^T) + reg/2‖W‖²`` for one task, ``W`` of shape ``(ways, d+1)``: gradient
    steps of size ``1/L`` (``L`` bounds the Hessian) from the prototype classifier ``[2c_k, −‖c_k‖²]``."""
    onehot, protos = _prototypes(feats, labels, ways)
    w = torch.cat([2 * protos, -(protos ** 2).sum(1, keepdim=True)], 1)
    scale = (protos ** 2).sum(1).mean().clamp_min(1e-12) ** 0.5
    w = w / scale  # prototype logits at unit scale: the CE steps start from moderate confidences
    fa = torch.cat([feats, feats.new_ones(feats.shape[0], 1)], 1)
    step = 1.0 / (0.5 * (fa ** 2).sum(1).mean() + reg)
    for _ in range(steps):
        p = torch.softmax(fa @ w.T, 1)
        w = w - step * ((p - onehot).T @ fa / fa.shape[0] + reg * w)
    return w


def ridge_head(feats: torch.Tensor, labels: torch.Tensor, *, ways: int, reg: torch.Tensor) -> torch.Tensor:
    """``argmin_W ½ mean_i ‖[f_i, 1] Wᵀ − onehot_i‖² + reg/2‖W‖²``, ``W`` of shape ``(..., ways, d+1)``,
    for support features ``(..., n, d)`` with any leading task axes: ``Fᵀ(F Fᵀ + n·reg I)⁻¹ Y`` with the
    ``n × n`` kernel when ``n ≤ d+1``, else ``(Fᵀ F + n·reg I)⁻¹ Fᵀ Y`` (the same solution; ``F = [f, 1]``).
    The mean makes it invariant to repeating the support set."""
    fa = torch.cat([feats, feats.new_ones(*feats.shape[:-1], 1)], -1)
    onehot = F.one_hot(labels, ways).to(feats.dtype)
    n, d = fa.shape[-2:]
    if n <= d:
        kernel = fa @ fa.mT + n * reg * torch.eye(n, dtype=fa.dtype, device=fa.device)
        return (fa.mT @ torch.linalg.solve(kernel, onehot)).mT
    return torch.linalg.solve(fa.mT @ fa + n * reg * torch.eye(d, dtype=fa.dtype, device=fa.device), fa.mT @ onehot).mT


def _ridge_scores(theta: Params, support_feats, labels, query_feats, ways: int) -> torch.Tensor:
    """``α [f(q), 1] W*ᵀ`` with ``W*`` the ridge head of the support features (any leading task axes)."""
    w = ridge_head(support_feats, labels, ways=ways, reg=theta["ridge.log_reg"].exp())
    return theta["ridge.log_scale"].exp() * head_logits(w, query_feats)


def _hyperrep_scores(hyper: dict[str, Any], support_feats: torch.Tensor, labels: torch.Tensor,
                     query_feats: torch.Tensor, ways: int) -> torch.Tensor:
    """A hyper-representation learner's query logits for one task's features: a head fitted on the support
    (:func:`fit_head`, ``head_steps`` steps), or for a prototype-head learner (``distance_scale`` in
    ``hyper``) its training logits ``−s‖f(q) − c_k‖²`` to the support prototypes."""
    if "distance_scale" in hyper:
        return hyper["distance_scale"] * _proto_scores(support_feats, labels, query_feats, ways)
    w = fit_head(support_feats, labels, ways=ways, reg=hyper["reg"], steps=hyper["head_steps"])
    return head_logits(w, query_feats)


def head_logits(w: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
    """``[f, 1] wᵀ`` for heads ``(..., ways, d+1)`` and features ``(..., n, d)``."""
    return feats @ w[..., :-1].mT + w[..., None, :, -1]


def task_logits(kind: str, theta: Params, hyper: dict[str, Any], support, support_labels, query, ways: int
                ) -> torch.Tensor:
    """Query logits of one task after the learner of ``kind`` adapted to its support set."""
    if kind in ("maml", "fomaml"):
        params = maml_adapt(theta, support, support_labels, ways, steps=hyper["steps"], lr=hyper["lr"],
                            first_order=True)
        return forward(params, query)
    if kind == "imaml":
        y = imaml_solve(theta, support, support_labels, ways, lam=hyper["lam"], steps=hyper["steps"], lr=hyper["lr"])
        return forward(y, query)
    if kind == "protonet":
        return proto_logits(theta, support, support_labels, query, ways=ways)
    if kind == "ridge":
        return _ridge_scores(theta, embed(theta, support), support_labels, embed(theta, query), ways)
    if kind == "hyperrep":
        tau = hyper["temperature"]
        return _hyperrep_scores(hyper, features(theta, support, tau), support_labels, features(theta, query, tau), ways)
    raise ValueError(f"kind: must be one of {', '.join(KINDS)}, got {kind!r}")


def episode_task_logits(kind: str, theta: Params, hyper: dict[str, Any], support, support_labels, query, ways: int
                        ) -> torch.Tensor:
    """:func:`task_logits` of every task of a batch ``(B, n, 1, S, S)``: MAML's adaptation as one grouped
    network (:func:`maml_tasks_logits`), iMAML's vmapped over tasks; for ProtoNet, ridge and
    hyper-representation heads, whose embedding does not depend on the task, every image embedded in one
    batch first. Either way at most about ``EMBED_CHUNK`` images go through the network at once (at
    least one task)."""
    if kind not in SHARED_EMBEDDING:
        per_call = max(1, EMBED_CHUNK // (support.shape[1] + query.shape[1]))
        adapt = (partial(maml_tasks_logits, theta, hyper, ways=ways) if kind in ("maml", "fomaml") else
                 vmap(lambda s, sl, q: task_logits(kind, theta, hyper, s, sl, q, ways)))
        return torch.cat([adapt(*part) for part in zip(support.split(per_call), support_labels.split(per_call),
                                                        query.split(per_call))])
    tasks, n = support.shape[:2]
    images = torch.cat([support, query], 1).flatten(0, 1)
    if kind in RAW_EMBEDDING:
        embedding = lambda part: embed(theta, part, channels_last=True)  # noqa: E731
    else:
        embedding = lambda part: features(theta, part, hyper["temperature"], channels_last=True)  # noqa: E731
    feats = torch.cat([embedding(part) for part in images.split(EMBED_CHUNK)]).unflatten(0, (tasks, -1))
    if kind == "protonet":
        return _proto_scores(feats[:, :n], support_labels, feats[:, n:], ways)
    if kind == "ridge":
        return _ridge_scores(theta, feats[:, :n], support_labels, feats[:, n:], ways)
    return vmap(partial(_hyperrep_scores, hyper, ways=ways))(feats[:, :n], support_labels, feats[:, n:])


def meta_loss_and_grad(kind: str, theta: Params, hyper: dict[str, Any], episode: Any) -> tuple[torch.Tensor, Params]:
    """Mean query loss over the episode's tasks and its meta-gradient in ``theta``, all tasks at once:
    per-task inner problems in one vmapped call (MAML's default batching: one grouped network);
    ProtoNet's and ridge heads' embeddings in one batch."""
    if kind in RAW_EMBEDDING:  # plain autograd: torch.func's grad is ~1.5x slower on this network on CPU
        leaves = {k: v.detach().requires_grad_(True) for k, v in theta.items()}
        with torch.enable_grad():
            loss = shared_meta_loss(kind, leaves, episode)
            return loss.detach(), dict(zip(theta, torch.autograd.grad(loss, list(leaves.values()))))
    ways = episode.classes.shape[1]
    args = (episode.support, episode.support_labels, episode.query, episode.query_labels)
    if kind == "imaml":
        per = vmap(lambda s, sl, q, ql: imaml_task_grad(theta, s, sl, q, ql, ways=ways, lam=hyper["lam"],
                                                        steps=hyper["steps"], lr=hyper["lr"],
                                                        cg_iters=hyper["cg_iters"]))
        losses, grads = per(*args)
        return losses.mean(), _map(lambda g: g.mean(0), grads)
    if kind not in ("maml", "fomaml"):
        raise ValueError(f"kind: episodic training supports maml, fomaml, imaml, protonet, ridge; got {kind!r}")
    batching = hyper.get("batching", "grouped")
    check_batching(batching)
    if batching == "grouped":
        return maml_meta_grad(theta, episode, steps=hyper["steps"], lr=hyper["lr"], first_order=kind == "fomaml")

    def total(th: Params) -> torch.Tensor:
        return vmap(lambda s, sl, q, ql: maml_task_loss(th, s, sl, q, ql, ways=ways, steps=hyper["steps"],
                                                        lr=hyper["lr"], first_order=kind == "fomaml"))(*args).mean()

    g, loss = grad_and_value(total)(theta)
    return loss, g

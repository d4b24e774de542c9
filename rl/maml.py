"""MAML for RL with a VPG inner step and a TRPO outer step (Finn et al. 2017, MAML-RL).

Per task ``τ``: ``φ_τ(θ) = θ + α ∇_θ S_τ(θ)`` with ``S_τ`` the DiCE surrogate of the per-step return on
episodes of ``π_θ`` (``inner_steps`` > 1 reuses them through importance weights). The outer objective is
the TRPO surrogate ``L(θ) = -mean_τ E[ρ_t A_t]`` on fresh episodes of the adapted policies, with
``ρ_t = π_{φ_τ(θ)}(a_t|s_t) / π_{φ_τ(θ_old)}(a_t|s_t)``, maximized under ``mean_τ KL(π_{φ_τ(θ_old)} ‖
π_{φ_τ(θ)}) ≤ δ``: natural-gradient direction by conjugate gradient on Fisher-vector products (HVPs of
the KL, through the adaptation when second order), then a backtracking line search.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, Sequence

import torch
from torch import Tensor

from bilevel_ray import tree
from bilevel_ray.algorithms.base import Calls, Hyperparams, Mix, identity_mix, register
from bilevel_ray.linalg import cg
from bilevel_ray.params import hp
from bilevel_ray.problem import rng_for
from bilevel_ray.rl.core import EnvTask
from bilevel_ray.rl.estimators import dice_surrogate, per_task_advantages
from bilevel_ray.rl.policies import PolicyParams, Policy
from bilevel_ray.rl.rollouts import Episodes, RolloutSampler

__all__ = ["Adaptation", "adapt", "TaskBatch", "collect", "MAMLTRPOStep", "maml_trpo_step", "adapted_returns",
           "MAMLTRPO", "MAMLTRPOState"]


@dataclass(frozen=True)
class Adaptation:
    """The lower level: ``steps`` policy-gradient ascent steps of size ``lr`` on the per-step return,
    discounting ``gamma`` and GAE ``lam`` (linear baseline, normalized advantages)."""

    lr: float = 0.1
    steps: int = 1
    gamma: float = 0.99
    lam: float = 1.0

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"algorithm.inner_lr: must be > 0, got {self.lr!r}")
        if not (isinstance(self.steps, int) and self.steps >= 1):
            raise ValueError(f"algorithm.inner_steps: must be an integer >= 1, got {self.steps!r}")


def adapt(policy: Policy, params: PolicyParams, eps: Episodes, adv: Tensor, ad: Adaptation, *,
          create_graph: bool = False) -> PolicyParams:
    """``ad.steps`` ascent steps on the surrogate of ``eps``, importance-weighted by the policy that
    sampled them (DiCE where ``params`` is that policy); with ``create_graph`` the result is
    differentiable in ``params`` (second-order MAML, with DiCE's score-function terms)."""
    horizon = eps.mask.shape[0]
    behaviour = eps.log_probs
    with torch.enable_grad():  # the inner gradient is needed even where the caller disables autograd
        cur = params
        for _ in range(ad.steps):
            names = list(cur)
            if not create_graph:
                cur = {k: v.detach().requires_grad_(True) for k, v in cur.items()}
            else:  # constants (no graph) become leaves so the inner gradient exists
                cur = {k: v if v.requires_grad else v.detach().requires_grad_(True) for k, v in cur.items()}
            logp = policy.log_prob(cur, eps.obs, eps.actions)
            surrogate = dice_surrogate(logp, adv, eps.mask, behaviour) / horizon
            grads = torch.autograd.grad(surrogate, [cur[k] for k in names], create_graph=create_graph)
            cur = {k: cur[k] + ad.lr * g for k, g in zip(names, grads)}
    return cur if create_graph else {k: v.detach() for k, v in cur.items()}


class TaskBatch(NamedTuple):
    """One task's data for a meta-step: episodes before (``train``) and after (``valid``) adaptation,
    their advantages, and the adapted policy that sampled ``valid``."""

    train: Episodes
    train_adv: Tensor
    valid: Episodes
    valid_adv: Tensor
    adapted: PolicyParams


def collect(policy: Policy, sampler: RolloutSampler, params: PolicyParams, tasks: Sequence[EnvTask], episodes: int,
            ad: Adaptation, *, seed: int) -> list[TaskBatch]:
    """Sample ``episodes`` per task with ``params``, adapt per task, sample again with the adapted
    policies. Seeds: ``(seed, 0)`` before, ``(seed, 1)`` after adaptation."""
    n = len(tasks)
    per_task, train_adv = per_task_advantages(sampler.sample(params, tasks, episodes, seed=(seed, 0)), n,
                                              gamma=ad.gamma, lam=ad.lam)
    adapted = [adapt(policy, params, e, a, ad) for e, a in zip(per_task, train_adv)]
    valid, valid_adv = per_task_advantages(sampler.sample(adapted, tasks, episodes, seed=(seed, 1)), n,
                                           gamma=ad.gamma, lam=ad.lam)
    return [TaskBatch(*parts) for parts in zip(per_task, train_adv, valid, valid_adv, adapted)]


class MAMLTRPOStep(NamedTuple):
    """:func:`maml_trpo_step`'s result: the new parameters, the mean returns before and after adaptation,
    the mean KL of the accepted step (0 if none), whether the line search accepted one, and the
    environment steps sampled."""

    params: PolicyParams
    pre_return: float
    post_return: float
    kl: float
    accepted: bool
    env_steps: int


def _outer(policy: Policy, params: PolicyParams, batches: Sequence[TaskBatch], ad: Adaptation, *,
           order: int) -> tuple[Tensor, Tensor]:
    """``(L(θ), mean KL)`` over the tasks, differentiable in ``params``: through the adaptation
    (``order=2``), or with its Jacobian taken as the identity (``order=1``, first-order MAML)."""
    losses, kls = [], []
    for b in batches:
        phi = adapt(policy, params, b.train, b.train_adv, ad, create_graph=order == 2)
        if order == 1:
            phi = {k: params[k] + (phi[k] - params[k].detach()) for k in phi}
        v = b.valid
        n = v.mask.sum()
        ratio = torch.exp(policy.log_prob(phi, v.obs, v.actions) - v.log_probs)  # v was sampled by b.adapted
        losses.append(-(ratio * b.valid_adv * v.mask).sum() / n)
        kls.append((policy.kl(b.adapted, phi, v.obs) * v.mask).sum() / n)
    return torch.stack(losses).mean(), torch.stack(kls).mean()


def maml_trpo_step(policy: Policy, sampler: RolloutSampler, params: PolicyParams, tasks: Sequence[EnvTask], *,
                   episodes: int, ad: Adaptation, seed: int, first_order: bool = False, max_kl: float = 0.01,
                   cg_iters: int = 10, cg_damping: float = 1e-5, ls_steps: int = 15,
                   ls_backtrack: float = 0.8) -> MAMLTRPOStep:
    """One meta-iteration of MAML-TRPO on ``tasks``; returns the new (detached) parameters."""
    batches = collect(policy, sampler, params, tasks, episodes, ad, seed=seed)
    names = list(params)
    theta = {k: params[k].detach().requires_grad_(True) for k in names}
    leaves = [theta[k] for k in names]
    loss, kl = _outer(policy, theta, batches, ad, order=1 if first_order else 2)
    g = tree.flatten(list(torch.autograd.grad(loss, leaves, retain_graph=True)))
    kl_grad = tree.flatten(list(torch.autograd.grad(kl, leaves, create_graph=True)))

    def fisher(v: Tensor) -> Tensor:
        return tree.flatten(list(torch.autograd.grad(kl_grad @ v, leaves, retain_graph=True))) + cg_damping * v

    direction = cg(fisher, g.detach(), torch.zeros_like(g), cg_iters)
    shs = 0.5 * torch.dot(direction, fisher(direction)).detach()
    step = direction / torch.sqrt(shs / max_kl).clamp_min(1e-12)
    flat = tree.flatten([params[k].detach() for k in names])
    new, accepted, new_kl = params, False, 0.0
    for k in range(ls_steps):
        cand = tree.unflatten_like(flat - ls_backtrack ** k * step, [params[n] for n in names])
        cand = dict(zip(names, cand))
        with torch.no_grad():  # the adaptation takes its own inner gradient
            cand_loss, cand_kl = _outer(policy, cand, batches, ad, order=1)
        if float(cand_loss) < float(loss.detach()) and float(cand_kl) < max_kl:
            new, accepted, new_kl = {n: t.detach() for n, t in cand.items()}, True, float(cand_kl)
            break
    pre = torch.cat([b.train.returns for b in batches]).mean()
    post = torch.cat([b.valid.returns for b in batches]).mean()
    steps = sum(b.train.steps + b.valid.steps for b in batches)
    return MAMLTRPOStep({k: v.detach() for k, v in new.items()}, float(pre), float(post), new_kl, accepted, steps)


def adapted_returns(policy: Policy, sampler: RolloutSampler, params: PolicyParams, tasks: Sequence[EnvTask], *,
                    episodes: int, ad: Adaptation, seed: int) -> tuple[Tensor, Tensor]:
    """Per-task mean return before and after adapting ``params`` to each task, ``(len(tasks),)`` each."""
    batches = collect(policy, sampler, params, tasks, episodes, ad, seed=seed)
    pre = torch.stack([b.train.returns.mean() for b in batches])
    post = torch.stack([b.valid.returns.mean() for b in batches])
    return pre, post


class MAMLTRPOState(NamedTuple):
    """State of MAML-TRPO: the meta-policy ``x`` and the per-task policies ``y``, carried unchanged."""

    x: PolicyParams
    y: Any
    t: int
    seed: int
    rank: int
    calls: Calls


@register("maml_trpo")
@dataclass(frozen=True)
class MAMLTRPO(Hyperparams):
    """MAML-TRPO as a registered algorithm for the ``meta_rl`` task: ``x`` is the meta-policy; ``y`` (the
    proximal form's per-task policies) is carried unchanged. Each step draws ``task.meta_batch`` of the
    agent's training tasks; with several agents (Ray backend) ``x`` is gossiped after the TRPO step."""

    inner_lr: float = hp(0.1, low=0, doc="α, VPG step of the adaptation")
    inner_steps: int = hp(1, low=1, strict=False, doc="adaptation steps (reusing the episodes)")
    first_order: bool = hp(False, doc="drop the adaptation's Jacobian (FOMAML)")
    max_kl: float = hp(0.01, low=0, doc="δ, TRPO trust region")
    cg_iters: int = hp(10, low=1, strict=False, doc="conjugate-gradient iterations")
    cg_damping: float = hp(1e-5, low=0, strict=False, doc="added to the Fisher-vector products")
    ls_steps: int = hp(15, low=1, strict=False, doc="backtracking line-search steps")
    ls_backtrack: float = hp(0.8, low=0, high=1, doc="line-search shrink factor")

    def init(self, problem: Any, x: Any, y: Any, *, seed: int = 0, rank: int = 0) -> MAMLTRPOState:
        """Initial state at ``(x, y)``; one-line errors for stacked agents or a task other than meta-RL."""
        from bilevel_ray.rl.problem import MetaRLTask

        if isinstance(rank, tuple):
            raise ValueError("algorithm.name: maml_trpo runs one agent per process; use decentralized.backend: ray")
        if not isinstance(getattr(problem, "meta_rl", problem), MetaRLTask):
            raise ValueError("algorithm.name: maml_trpo needs a meta-RL task (task.name: meta_rl)")
        return MAMLTRPOState(tree.detach(x), tree.detach(y), 0, seed, rank, Calls())

    def step(self, s: MAMLTRPOState, problem: Any, mix: Mix = identity_mix) -> MAMLTRPOState:
        """One MAML-TRPO meta-iteration on a draw of training tasks, then gossip of ``x``."""
        task = getattr(problem, "meta_rl", problem)
        index = getattr(problem, "task_indices", task.inner)
        rng = rng_for(s.seed, s.rank, s.t)
        _, idx = index.sample(rng)
        ad = Adaptation(self.inner_lr, self.inner_steps, task.gamma, task.gae_lambda)
        out = maml_trpo_step(task.policy, task.training_sampler, s.x, [task.train[k] for k in idx], episodes=task.episodes,
                             ad=ad, seed=int(rng.integers(2**62)), first_order=self.first_order, max_kl=self.max_kl,
                             cg_iters=self.cg_iters, cg_damping=self.cg_damping, ls_steps=self.ls_steps,
                             ls_backtrack=self.ls_backtrack)
        calls = s.calls.add(grad_g=len(idx) * self.inner_steps, grad_f=1, hvp=self.cg_iters + 1)
        return MAMLTRPOState(tree.detach(mix(out.params)), s.y, s.t + 1, s.seed, s.rank, calls)

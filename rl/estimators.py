"""Policy-gradient estimators: returns, a linear feature baseline, GAE and a DiCE surrogate.

The surrogate (DiCE, Foerster et al. 2018, in the baseline form of Mao et al. 2019 / Farquhar et al.
2019) is ``S(θ) = (1/E) Σ_e Σ_t (⊡(W_t) − ⊡(W_{t−1})) A_t`` with ``W_t = Σ_{t'≤t} log π_θ(a_{t'}|s_{t'})``
and the "magic box" ``⊡(w) = exp(w − stop_grad(w))``. It evaluates to 0, its gradient is the usual
``Σ_t ∇log π_t A_t``, and with ``A_t`` = (undiscounted) return-to-go minus any baseline of the state its
derivatives of *every* order are unbiased estimates of those of the expected return. That makes the
Hessian-vector products that MAML's meta-gradient and the bilevel algorithms need meaningful.

The low-variance curvature (LVC) surrogate of ProMP (Rothfuss et al., ICLR 2019) weights each step by
its own likelihood ratio, ``S(θ) = (1/E) Σ_e Σ_t ρ_t A_t`` with ``ρ_t = π_θ(a_t|s_t) / ⊥π_θ(a_t|s_t)``.
Its value and gradient equal DiCE's; its Hessian keeps the per-step terms
``Σ_t (∇²log π_t + ∇log π_t ∇log π_tᵀ) A_t`` and drops the products of scores at different steps,
whose variance grows with the horizon. That Hessian is unbiased where those products have zero mean
(actions that do not change later states, e.g. a horizon of one) and biased, with far lower variance,
elsewhere (the bias vanishes near a local optimum, Rothfuss et al. 2019, section 5).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["discounted_returns", "baseline_features", "fit_linear_baseline", "gae", "advantages",
           "per_task_advantages", "dice_surrogate", "lvc_surrogate", "ESTIMATORS", "surrogate"]


def discounted_returns(rewards: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """``G_t = Σ_{t'≥t} γ^{t'−t} r_{t'}`` per episode, (T, E); zero on masked steps."""
    out = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[0])
    for t in range(rewards.shape[0] - 1, -1, -1):
        running = (rewards[t] + gamma * running) * mask[t]
        out[t] = running
    return out


def baseline_features(obs: Tensor, mask: Tensor) -> Tensor:
    """MAML-RL's baseline features ``[s, s², t, t², t³, 1]`` with ``t = step / 100``, (T, E, 2d + 4)."""
    steps = torch.arange(obs.shape[0], dtype=obs.dtype, device=obs.device).reshape(-1, 1, 1).expand(*obs.shape[:2], 1) / 100.0
    ones = torch.ones_like(steps)
    feats = torch.cat([obs, obs * obs, steps, steps ** 2, steps ** 3, ones], -1)
    return feats * mask.unsqueeze(-1)


def fit_linear_baseline(obs: Tensor, returns: Tensor, mask: Tensor, reg: float = 1e-5, groups: int = 1) -> Tensor:
    """Ridge regression of the returns on :func:`baseline_features`; the ridge grows ×10 until the solve
    is finite (as in MAML-RL). ``groups > 1`` fits one baseline per equal, consecutive block of episodes
    (a task's, in a task-major request). Returns the coefficients, ``(2d + 4,)`` or ``(groups, 2d + 4)``."""
    horizon, episodes, dim = obs.shape[0], obs.shape[1], obs.shape[-1] * 2 + 4
    if episodes % groups:
        raise ValueError(f"rl.groups: {episodes} episodes do not split into {groups} equal groups")
    feats = baseline_features(obs, mask).double().reshape(horizon, groups, -1, dim).transpose(0, 1).reshape(groups, -1, dim)
    target = (returns * mask).double().reshape(horizon, groups, -1).transpose(0, 1).reshape(groups, -1, 1)
    gram, rhs = feats.transpose(1, 2) @ feats, feats.transpose(1, 2) @ target
    eye = torch.eye(dim, dtype=gram.dtype, device=gram.device)
    coef = torch.full((groups, dim, 1), float("nan"), dtype=gram.dtype, device=gram.device)
    todo = torch.ones(groups, dtype=torch.bool, device=gram.device)
    for _ in range(6):
        coef[todo] = torch.linalg.solve(gram[todo] + reg * eye, rhs[todo])
        todo = ~torch.isfinite(coef).all(dim=(1, 2))
        if not bool(todo.any()):
            coef = coef.squeeze(-1).to(obs.dtype)
            return coef[0] if groups == 1 else coef
        reg *= 10
    raise FloatingPointError("rl.baseline: the linear baseline solve is not finite even with a large ridge")


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> Tensor:
    """Generalized advantage estimation (Schulman et al. 2016), (T, E); a masked step's value is 0."""
    values = values * mask
    next_values = torch.cat([values[1:], torch.zeros_like(values[:1])])
    deltas = (rewards + gamma * next_values - values) * mask
    out = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[0])
    for t in range(rewards.shape[0] - 1, -1, -1):
        running = (deltas[t] + gamma * lam * running) * mask[t]
        out[t] = running
    return out


def advantages(obs: Tensor, rewards: Tensor, mask: Tensor, *, gamma: float = 0.99, lam: float = 1.0,
               normalize: bool = True, groups: int = 1) -> Tensor:
    """GAE with a linear baseline fitted on these episodes (MAML-RL's estimator), optionally normalized
    to zero mean and unit variance over the unmasked steps. ``groups > 1``: the episodes are that many
    equal, consecutive blocks (tasks) and each gets its own baseline and normalization, in one pass. A
    constant of the policy (no gradient)."""
    with torch.no_grad():
        returns = discounted_returns(rewards, mask, gamma)
        coef = fit_linear_baseline(obs, returns, mask, groups=groups)
        feats = baseline_features(obs, mask)
        values = (feats.reshape(*feats.shape[:1], groups, -1, feats.shape[-1]) @ coef.reshape(groups, -1, 1)
                  ).reshape(rewards.shape)
        adv = gae(rewards, values, mask, gamma, lam)
        if normalize:
            a, m = adv.reshape(adv.shape[0], groups, -1), mask.reshape(mask.shape[0], groups, -1)
            n = m.sum(dim=(0, 2))
            mean = (a * m).sum(dim=(0, 2)) / n
            std = (((a - mean[:, None]) ** 2 * m).sum(dim=(0, 2)) / n).sqrt()
            adv = ((a - mean[:, None]) / (std[:, None] + 1e-8) * m).reshape(adv.shape)
    return adv


def per_task_advantages(eps, tasks: int, *, gamma: float = 0.99, lam: float = 1.0) -> tuple[list, list[Tensor]]:
    """A task-major request's episodes and :func:`advantages` per task (one baseline and normalization
    each, all fitted in one pass): ``([episodes of task k], [advantages of task k])``."""
    adv = advantages(eps.obs, eps.rewards, eps.mask, gamma=gamma, lam=lam, groups=tasks)
    per = adv.shape[1] // tasks
    cols = [range(k * per, (k + 1) * per) for k in range(tasks)]
    return [eps.select(c) for c in cols], [adv[:, c.start:c.stop] for c in cols]


def dice_surrogate(log_probs: Tensor, advantages: Tensor, mask: Tensor,
                   behaviour_log_probs: Tensor | None = None, max_log_ratio: float | None = None) -> Tensor:
    """``(1/E) Σ_e Σ_t (⊡(W_t) − ⊡(W_{t−1})) A_t`` for log-probabilities ``(T, E)`` of the taken actions.

    ``⊡(W_t) = exp(W_t − W_t^b)`` where ``W^b`` are the cumulative log-probabilities of the policy that
    sampled the episodes: ``behaviour_log_probs`` when given (the surrogate is then an importance-weighted
    estimate at a policy other than the sampling one, as a TRPO step or an inner loop needs), else
    ``log_probs`` detached (DiCE proper). The two agree with all their derivatives where the policies
    coincide. ``max_log_ratio = c`` soft-clips the cumulative log-ratio ``z`` to ``c·tanh(z/c)``: weights
    stay below ``e^c`` far from the sampling policy, while value, gradient and Hessian at it are unchanged
    (``c·tanh(z/c) = z + O(z³)``).
    """
    behaviour = log_probs.detach() if behaviour_log_probs is None else behaviour_log_probs.detach()
    cum = torch.cumsum((log_probs - behaviour) * mask, 0)
    if max_log_ratio is not None:
        cum = max_log_ratio * torch.tanh(cum / max_log_ratio)
    prev = torch.cat([torch.zeros_like(cum[:1]), cum[:-1]])
    weights = torch.exp(cum) - torch.exp(prev)
    return (weights * advantages * mask).sum(0).mean()


def lvc_surrogate(log_probs: Tensor, advantages: Tensor, mask: Tensor,
                  behaviour_log_probs: Tensor | None = None, max_log_ratio: float | None = None) -> Tensor:
    """ProMP's LVC surrogate ``(1/E) Σ_e Σ_t ρ_t A_t`` with per-step ratios ``ρ_t = exp(l_t − l_t^b)``
    against ``behaviour_log_probs`` (default: ``log_probs`` detached); ``max_log_ratio = c`` soft-clips
    each log-ratio to ``c·tanh(z/c)`` as :func:`dice_surrogate` does. Arguments as there."""
    behaviour = log_probs.detach() if behaviour_log_probs is None else behaviour_log_probs.detach()
    z = (log_probs - behaviour) * mask
    if max_log_ratio is not None:
        z = max_log_ratio * torch.tanh(z / max_log_ratio)
    return (torch.exp(z) * advantages * mask).sum(0).mean()


#: the second-order surrogates by config name (``task.estimator``)
ESTIMATORS = {"lvc": lvc_surrogate, "dice": dice_surrogate}


def surrogate(kind: str, log_probs: Tensor, advantages: Tensor, mask: Tensor,
              behaviour_log_probs: Tensor | None = None, max_log_ratio: float | None = None) -> Tensor:
    """The ``kind`` surrogate (``"lvc"`` or ``"dice"``); arguments as :func:`dice_surrogate`."""
    try:
        fn = ESTIMATORS[kind]
    except KeyError:
        raise ValueError(f"task.estimator: must be one of {', '.join(ESTIMATORS)}, got {kind!r}") from None
    return fn(log_probs, advantages, mask, behaviour_log_probs, max_log_ratio)

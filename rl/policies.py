"""Functional stochastic policies: parameters are a dict of tensors, so that adaptation steps,
``torch.func`` transforms and gossip all act on plain pytrees.

Sampling takes *pre-drawn noise* (standard normal for Gaussian policies, uniform for categorical ones)
rather than a generator: an episode's noise comes from its own seed, so the same episode gets the same
actions whichever process or batch it is sampled in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Union

import gymnasium as gym
import torch
from torch import Tensor
from torch.distributions import Categorical, Independent, Normal

__all__ = ["GaussianMLPPolicy", "CategoricalMLPPolicy", "Policy", "make_policy", "PolicyParams"]

PolicyParams = dict[str, Tensor]


def _check_hidden(hidden: tuple[int, ...]) -> tuple[int, ...]:
    hidden = tuple(hidden)
    if not all(isinstance(h, int) and not isinstance(h, bool) and h > 0 for h in hidden):
        raise ValueError(f"policy.hidden: must be a list of positive integers, got {list(hidden)!r}")
    return hidden


def _init_mlp(sizes: list[int], seed: int, dtype: torch.dtype) -> PolicyParams:
    """Uniform(±1/√fan_in) weights, zero biases; the last layer 100× smaller so the initial policy is
    close to its state-independent part."""
    gen = torch.Generator().manual_seed(int(seed))
    params: PolicyParams = {}
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        bound = 1.0 / math.sqrt(n_in) * (0.01 if i == len(sizes) - 2 else 1.0)
        params[f"layer{i}.weight"] = (torch.rand(n_out, n_in, generator=gen, dtype=torch.float64) * 2 - 1).mul(bound).to(dtype)
        params[f"layer{i}.bias"] = torch.zeros(n_out, dtype=dtype)
    return params


def _mlp(params: PolicyParams, x: Tensor, layers: int) -> Tensor:
    for i in range(layers):
        x = torch.nn.functional.linear(x, params[f"layer{i}.weight"], params[f"layer{i}.bias"])
        if i < layers - 1:
            x = torch.tanh(x)
    return x


def _mlp_stacked(params: PolicyParams, x: Tensor, layers: int) -> Tensor:
    """:func:`_mlp` of ``K`` policies at once: leaves ``(K, ...)``, inputs ``(K, E, in)`` (batched matmuls)."""
    for i in range(layers):
        x = torch.baddbmm(params[f"layer{i}.bias"].unsqueeze(1), x, params[f"layer{i}.weight"].transpose(1, 2))
        if i < layers - 1:
            x = torch.tanh(x)
    return x


@dataclass(frozen=True)
class GaussianMLPPolicy:
    """Diagonal Gaussian with an MLP mean (tanh hidden layers) and a state-independent log std
    (MAML-RL's policy: hidden ``(100, 100)``, initial std 1)."""

    obs_dim: int
    act_dim: int
    hidden: tuple[int, ...] = (100, 100)
    init_std: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "hidden", _check_hidden(self.hidden))
        if not self.init_std > 0:
            raise ValueError(f"policy.init_std: must be > 0, got {self.init_std!r}")

    @property
    def noise_shape(self) -> tuple[int, ...]:
        """Shape of one action's noise: ``(act_dim,)``."""
        return (self.act_dim,)

    def init(self, *, seed: int, dtype: torch.dtype = torch.float32) -> PolicyParams:
        """Initial parameters from ``seed``: the MLP's, and ``log_std`` at ``log(init_std)``."""
        params = _init_mlp([self.obs_dim, *self.hidden, self.act_dim], seed, dtype)
        params["log_std"] = torch.full((self.act_dim,), math.log(self.init_std), dtype=dtype)
        return params

    def distribution(self, params: PolicyParams, obs: Tensor) -> Independent:
        """The action distribution ``π(·|obs)``."""
        mean = _mlp(params, obs, len(self.hidden) + 1)
        return Independent(Normal(mean, params["log_std"].exp().expand_as(mean)), 1)

    def log_prob(self, params: PolicyParams, obs: Tensor, actions: Tensor) -> Tensor:
        """Written out (no ``torch.distributions`` argument checks), so it runs under ``torch.func``."""
        return self._log_density(params, _mlp(params, obs, len(self.hidden) + 1), actions)

    def _log_density(self, params: PolicyParams, mean: Tensor, actions: Tensor) -> Tensor:
        log_std = params["log_std"]
        z = (actions - mean) * torch.exp(-log_std)
        return -0.5 * (z * z).sum(-1) - log_std.sum() - 0.5 * self.act_dim * math.log(2 * math.pi)

    def sample(self, params: PolicyParams, obs: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
        """``(mean + std · noise, log_prob of it)`` from one pass of the MLP, ``noise`` standard normal of
        shape ``(..., act_dim)``."""
        mean = _mlp(params, obs, len(self.hidden) + 1)
        actions = mean + params["log_std"].exp() * noise
        return actions, self._log_density(params, mean, actions)

    def sample_stacked(self, params: PolicyParams, obs: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
        """:meth:`sample` for ``K`` policies at once: ``params`` stacked ``(K, ...)``, ``obs`` ``(K, E, obs_dim)``,
        ``noise`` ``(K, E, act_dim)``; one batched pass instead of ``K`` (rollouts of many tasks)."""
        mean = _mlp_stacked(params, obs, len(self.hidden) + 1)
        log_std = params["log_std"].unsqueeze(1)
        actions = mean + log_std.exp() * noise
        z = (actions - mean) * torch.exp(-log_std)
        logp = -0.5 * (z * z).sum(-1) - log_std.sum(-1) - 0.5 * self.act_dim * math.log(2 * math.pi)
        return actions, logp

    def kl(self, old: PolicyParams, new: PolicyParams, obs: Tensor) -> Tensor:
        """Per-state ``KL(π_old(·|s) ‖ π_new(·|s))``."""
        return torch.distributions.kl_divergence(self.distribution(old, obs), self.distribution(new, obs))


@dataclass(frozen=True)
class CategoricalMLPPolicy:
    """Softmax over ``n_actions`` logits from an MLP (tanh hidden layers)."""

    obs_dim: int
    n_actions: int
    hidden: tuple[int, ...] = (100, 100)

    def __post_init__(self) -> None:
        object.__setattr__(self, "hidden", _check_hidden(self.hidden))

    @property
    def noise_shape(self) -> tuple[int, ...]:
        """Shape of one action's noise: ``()``, one uniform number."""
        return ()

    def init(self, *, seed: int, dtype: torch.dtype = torch.float32) -> PolicyParams:
        """Initial MLP parameters from ``seed``."""
        return _init_mlp([self.obs_dim, *self.hidden, self.n_actions], seed, dtype)

    def distribution(self, params: PolicyParams, obs: Tensor) -> Categorical:
        """The action distribution ``π(·|obs)``."""
        return Categorical(logits=_mlp(params, obs, len(self.hidden) + 1))

    def log_prob(self, params: PolicyParams, obs: Tensor, actions: Tensor) -> Tensor:
        """``log π(actions|obs)``."""
        return self._pick(torch.log_softmax(_mlp(params, obs, len(self.hidden) + 1), -1), actions)

    @staticmethod
    def _pick(log_probs: Tensor, actions: Tensor) -> Tensor:
        return log_probs.gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)

    def sample(self, params: PolicyParams, obs: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
        """``(action, log_prob of it)`` from one pass of the MLP and one log-softmax, by inverse-CDF
        sampling with ``noise`` uniform in [0, 1) of shape ``(...)``."""
        log_probs = torch.log_softmax(_mlp(params, obs, len(self.hidden) + 1), -1)
        cdf = log_probs.exp().cumsum(-1)
        actions = torch.searchsorted(cdf, noise.unsqueeze(-1).to(cdf.dtype)).squeeze(-1).clamp_(max=self.n_actions - 1)
        return actions, self._pick(log_probs, actions)

    def sample_stacked(self, params: PolicyParams, obs: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
        """:meth:`sample` for ``K`` policies at once (``params`` stacked ``(K, ...)``, ``obs`` ``(K, E, obs_dim)``,
        ``noise`` ``(K, E)``)."""
        log_probs = torch.log_softmax(_mlp_stacked(params, obs, len(self.hidden) + 1), -1)
        cdf = log_probs.exp().cumsum(-1)
        actions = torch.searchsorted(cdf, noise.unsqueeze(-1).to(cdf.dtype)).squeeze(-1).clamp_(max=self.n_actions - 1)
        return actions, self._pick(log_probs, actions)

    def kl(self, old: PolicyParams, new: PolicyParams, obs: Tensor) -> Tensor:
        """Per-state ``KL(π_old(·|s) ‖ π_new(·|s))``."""
        return torch.distributions.kl_divergence(self.distribution(old, obs), self.distribution(new, obs))


Policy = Union[GaussianMLPPolicy, CategoricalMLPPolicy]


def make_policy(observation_space: gym.Space, action_space: gym.Space, hidden: tuple[int, ...] = (100, 100),
                init_std: float = 1.0) -> Policy:
    """The policy family for an environment's spaces (flat Box observations; Box or Discrete actions)."""
    if not (isinstance(observation_space, gym.spaces.Box) and len(observation_space.shape) == 1):
        raise ValueError(f"env.observation_space: must be a flat Box, got {observation_space}")
    obs_dim = observation_space.shape[0]
    if isinstance(action_space, gym.spaces.Discrete):
        return CategoricalMLPPolicy(obs_dim, int(action_space.n), tuple(hidden))
    if isinstance(action_space, gym.spaces.Box) and len(action_space.shape) == 1:
        return GaussianMLPPolicy(obs_dim, action_space.shape[0], tuple(hidden), init_std)
    raise ValueError(f"env.action_space: must be Discrete or a flat Box, got {action_space}")

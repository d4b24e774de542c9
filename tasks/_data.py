"""Small helpers for tasks built on in-memory datasets (scikit-learn ships the real ones used here)."""

from __future__ import annotations

import numpy as np
import torch

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def split(n: int, fractions: tuple[float, ...], seed: int) -> list[np.ndarray]:
    """Random disjoint index sets with the given fractions of ``n`` (the last takes the rest)."""
    perm = np.random.default_rng(seed).permutation(n)
    cuts = np.cumsum([int(round(fr * n)) for fr in fractions[:-1]])
    return np.split(perm, cuts)


def standardize(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """Scale every array with the mean and standard deviation of ``train`` (constant columns kept)."""
    mean, std = train.mean(0), train.std(0)
    std = np.where(std > 0, std, 1.0)
    return [(a - mean) / std for a in (train, *others)]

"""Random affine warps of drawings for meta-training: every image of an episode gets its own rotation,
shear, anisotropic scale and shift, drawn from the episode's generator (so augmented episodes stay a
pure function of the seed on every backend), the same family of distortions as Koch et al. 2015's
one-shot Omniglot networks. Only training episodes are warped; test tasks never are.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["RandomAffine", "warp"]


def warp(images: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Images ``(n, 1, S, S)`` in [0, 1] (ink dark on white) resampled (bilinear) at ``theta @ [u, v, 1]``
    for output pixel centre ``(u, v)`` in [-1, 1]² (``theta`` ``(n, 2, 3)``, PyTorch's ``affine_grid``
    convention); paper (white) fills what comes from outside."""
    grid = F.affine_grid(theta.to(images.device, images.dtype), list(images.shape), align_corners=False)
    return 1.0 - F.grid_sample(1.0 - images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


@dataclass(frozen=True)
class RandomAffine:
    """Independent random affine warp of each image. ``magnitude`` scales every range: rotation
    ±10·m degrees, shear ±15·m degrees, scale 1 ± 0.15·m per axis, shift ±0.1·m of the image side per
    axis (``magnitude=0`` is the identity)."""

    magnitude: float = 0.5

    def __post_init__(self) -> None:
        if not (isinstance(self.magnitude, (int, float)) and 0 <= self.magnitude <= 2):
            raise ValueError(f"RandomAffine.magnitude: must be a number in [0, 2], got {self.magnitude!r}")

    def theta(self, n: int, rng: np.random.Generator) -> torch.Tensor:
        """``(n, 2, 3)`` warps drawn from ``rng``."""
        m = float(self.magnitude)
        u = rng.uniform(-1.0, 1.0, size=(6, n))
        rot, shear = np.radians(10.0 * m) * u[0], np.radians(15.0 * m) * u[1]
        sx, sy = 1.0 + 0.15 * m * u[2], 1.0 + 0.15 * m * u[3]
        tx, ty = 0.2 * m * u[4], 0.2 * m * u[5]  # [-1, 1] spans the side: 0.2 is a tenth of it
        c, s, t = np.cos(rot), np.sin(rot), np.tan(shear)
        # rotation · shear · scale
        a = np.stack([np.stack([c * sx, (c * t - s) * sy, tx], -1), np.stack([s * sx, (s * t + c) * sy, ty], -1)], 1)
        return torch.from_numpy(a)

    def __call__(self, images: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """``images`` ``(..., 1, S, S)``, each warped by its own draw from ``rng``."""
        flat = images.reshape(-1, *images.shape[-3:])
        if self.magnitude == 0 or flat.shape[0] == 0:
            return images
        return warp(flat, self.theta(flat.shape[0], rng)).clamp_(0.0, 1.0).reshape(images.shape)

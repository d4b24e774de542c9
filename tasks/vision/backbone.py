"""The few-shot backbone: ``depth`` blocks of conv 3×3 → layer norm → ReLU → max-pool 2×2 (Vinyals et
al. 2016's "Conv-4", with per-image normalisation instead of batch statistics so that a prediction
never depends on the other images of its batch, and ``vmap`` over tasks needs no special care).

:func:`embed` is the functional form over a dict of tensors (``conv{i}.weight``, ``conv{i}.bias``,
``norm{i}.weight``, ``norm{i}.bias``); :class:`ConvNet` is the same network as an ``nn.Module`` with
the same parameter names (for learn2learn and other module-based code). Inputs are images in [0, 1],
ink dark on white (the Omniglot convention), shaped ``(n, 1, S, S)``; the network sees ``1 - image``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["init_backbone", "embed", "embed_tasks", "max_pool2", "features", "feature_dim", "ConvNet"]

Params = dict[str, torch.Tensor]


def init_backbone(*, width: int = 64, depth: int = 4, channels: int = 1, seed: int = 0,
                  dtype: torch.dtype = torch.float32) -> Params:
    """He-normal conv weights, zero biases, unit norm gains; a pure function of ``seed``."""
    gen = torch.Generator().manual_seed(int(seed))
    params: Params = {}
    cin = channels
    for i in range(depth):
        std = math.sqrt(2.0 / (cin * 9))
        params[f"conv{i}.weight"] = (torch.randn(width, cin, 3, 3, generator=gen, dtype=torch.float64) * std).to(dtype)
        params[f"conv{i}.bias"] = torch.zeros(width, dtype=dtype)
        params[f"norm{i}.weight"] = torch.ones(width, dtype=dtype)
        params[f"norm{i}.bias"] = torch.zeros(width, dtype=dtype)
        cin = width
    return params


def embed(params: Params, images: torch.Tensor) -> torch.Tensor:
    """Features ``(n, feature_dim)`` of images ``(n, 1, S, S)``."""
    h = 1.0 - images
    i = 0
    while f"conv{i}.weight" in params:
        h = F.conv2d(h, params[f"conv{i}.weight"], params[f"conv{i}.bias"], padding=1)
        h = F.group_norm(h, 1, params[f"norm{i}.weight"], params[f"norm{i}.bias"])
        h = F.relu(max_pool2(h))  # = max-pool of the ReLU (both monotone), on a quarter of the values
        i += 1
    return h.flatten(1)


class _MaxPool2(torch.autograd.Function):
    """2×2 max-pooling from four strided views (``F.max_pool2d``'s own forward is several times slower on
    CPU); the window's first maximum is recorded as ``F.max_pool2d`` records it, so the backward is
    PyTorch's, and differentiable again. Works under ``torch.func`` transforms (vmap rule generated)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        height, width = x.shape[-2:]
        h, w = height // 2 * 2, width // 2 * 2
        top, bottom = x[..., 0:h:2, :w], x[..., 1:h:2, :w]
        a, b, c, d = top[..., 0::2], top[..., 1::2], bottom[..., 0::2], bottom[..., 1::2]
        upper, lower = torch.maximum(a, b), torch.maximum(c, d)
        offset = torch.where(upper >= lower, (a < b).long(), width + (c < d).long())
        corner = torch.arange(0, h, 2, device=x.device)[:, None] * width + torch.arange(0, w, 2, device=x.device)
        return torch.maximum(upper, lower), offset + corner

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(inputs[0], output[1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
        x, indices = ctx.saved_tensors
        return torch.ops.aten.max_pool2d_with_indices_backward(grad, x, [2, 2], [2, 2], [0, 0], [1, 1], False,
                                                               indices)


def max_pool2(x: torch.Tensor) -> torch.Tensor:
    """``F.max_pool2d(x, 2)`` for ``(n, c, h, w)`` inputs: same values and gradients (ties go to the first
    maximum), several times faster on CPU, twice differentiable, under ``torch.func`` transforms too."""
    return _MaxPool2.apply(x)[0]


def embed_tasks(params: Params, images: torch.Tensor, *, unfold: bool = False) -> torch.Tensor:
    """Features ``(B, n, feature_dim)`` of ``B`` tasks' images ``(B, n, 1, S, S)``, task ``b`` under its
    own parameters ``params[k][b]`` (every tensor with a leading task axis): :func:`embed` of each task,
    computed as one grouped network (tasks stacked along channels, per-task groups in every convolution
    and group norm), the batched form of MAML's adaptation with plain autograd. ReLU follows the pooling
    (the same function: both are monotone). Convolutions with one input channel, or all of them with
    ``unfold``, run as im2col + batched matmul, whose higher derivatives are matmuls too (PyTorch
    differentiates a grouped convolution's backward one group at a time)."""
    tasks, n = images.shape[:2]
    h = (1.0 - images).transpose(0, 1).flatten(1, 2)  # (n, B*C, S, S): task b's channels are block b
    i = 0
    while f"conv{i}.weight" in params:
        w, bias = params[f"conv{i}.weight"], params[f"conv{i}.bias"]
        if unfold or w.shape[2] == 1:
            size = h.shape[-2:]
            cols = F.unfold(h, 3, padding=1).unflatten(1, (tasks, -1))  # (n, B, C*9, S*S)
            h = (torch.matmul(w.flatten(2), cols) + bias[:, :, None]).flatten(1, 2).unflatten(-1, size)
        else:
            h = F.conv2d(h, w.flatten(0, 1), bias.flatten(), padding=1, groups=tasks)
        h = F.group_norm(h, tasks, params[f"norm{i}.weight"].flatten(), params[f"norm{i}.bias"].flatten())
        h = F.relu(max_pool2(h))
        i += 1
    return h.reshape(n, tasks, -1).transpose(0, 1)


def features(params: Params, images: torch.Tensor, temperature: float) -> torch.Tensor:
    """Embeddings scaled to norm ``temperature`` (cosine-classifier features: bounded logit curvature)."""
    h = embed(params, images)
    return temperature * h / (h.norm(dim=-1, keepdim=True) + 1e-8)


def feature_dim(params: Params, size: int = 28) -> int:
    depth, width = 0, 0
    while f"conv{depth}.weight" in params:
        width = params[f"conv{depth}.weight"].shape[0]
        depth += 1
    for _ in range(depth):
        size //= 2
    return width * size * size


class ConvNet(nn.Module):
    """:func:`embed` followed by a linear ``ways``-way head, as a module (same parameter names plus
    ``head.weight``/``head.bias``), built from PyTorch's standard layers; ``fast_pool`` swaps
    ``F.max_pool2d`` for :func:`max_pool2` (same function)."""

    def __init__(self, params: Params, ways: int, size: int = 28, *, fast_pool: bool = False):
        super().__init__()
        self.fast_pool = fast_pool
        self.depth = sum(1 for k in params if k.endswith(".weight") and k.startswith("conv"))
        for i in range(self.depth):
            w = params[f"conv{i}.weight"]
            conv = nn.Conv2d(w.shape[1], w.shape[0], 3, padding=1)
            norm = nn.GroupNorm(1, w.shape[0])
            with torch.no_grad():
                conv.weight.copy_(w)
                conv.bias.copy_(params[f"conv{i}.bias"])
                norm.weight.copy_(params[f"norm{i}.weight"])
                norm.bias.copy_(params[f"norm{i}.bias"])
            setattr(self, f"conv{i}", conv)
            setattr(self, f"norm{i}", norm)
        self.head = nn.Linear(feature_dim(params, size), ways)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.to(next(iter(params.values())).dtype)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h = 1.0 - images
        for i in range(self.depth):
            h = getattr(self, f"norm{i}")(getattr(self, f"conv{i}")(h))
            h = F.relu(max_pool2(h)) if self.fast_pool else F.max_pool2d(F.relu(h), 2)
        return self.head(h.flatten(1))

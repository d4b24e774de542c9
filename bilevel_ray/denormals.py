"""Flush subnormal (denormal) floats to zero on CPU.

x86 cores take a slow microcode path for every arithmetic operation on a subnormal float32
(|v| < 1.2e-38). Long runs produce them: with raw (unnormalised) embeddings the distance logits grow,
``exp`` of the far classes' logits underflows into the subnormal range, and every backward pass then
multiplies tensors full of them. Measured (README, Results; ``benchmarks/denormals.py``): a SOBA
step of the episodic prototype configuration slowed from 2.7 to 0.53 steps/s over 5000 steps with
subnormals kept. :func:`flush_denormals` sets the CPU's flush-to-zero and denormals-are-zero modes.
"""

from __future__ import annotations

import os

__all__ = ["flush_denormals"]


def flush_denormals() -> bool:
    """Treat subnormal float inputs and results as zero in this process (float32 values below 1.2e-38,
    float64 below 2.2e-308 change by less than that). The mode is per thread and PyTorch's intra-op
    threads copy it when they start, so call this before the first parallel torch operation (the CLI,
    the Ray agents and the benchmarks do). Returns whether it took effect: False on CPUs without the
    modes, or when the environment sets ``BILEVEL_RAY_DENORMALS=keep``."""
    if os.environ.get("BILEVEL_RAY_DENORMALS", "flush") == "keep":
        return False
    import torch

    return bool(torch.set_flush_denormal(True))

"""Small helpers shared by local training functions (plain PyTorch, no NVFlare)."""

from __future__ import annotations

import contextlib
import random
import resource
import sys

import numpy as np
import torch

__all__ = ["autocast", "is_dp_optimizer", "peak_rss_mb", "resolve_device", "seed_everything"]


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``"auto"``/None -> CUDA if available else CPU; anything else -> ``torch.device(device)``."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def autocast(device: torch.device, amp: str | bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA when ``amp`` is ``"bf16"``/True; a no-op otherwise (and on CPU)."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp is True or amp == "bf16")


def is_dp_optimizer(optimizer: torch.optim.Optimizer) -> bool:
    """True for an Opacus ``DPOptimizer`` (clipping + noise + accounting)."""
    try:
        from opacus.optimizers import DPOptimizer
    except ImportError:  # pragma: no cover - opacus is a dependency
        return False
    return isinstance(optimizer, DPOptimizer)


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024.0 if sys.platform != "darwin" else rss / 2**20


def dp_noise_only_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """DP-SGD step for an empty Poisson batch: zero per-sample gradients, noise added, step counted.

    Skipping empty batches would make the number of released steps depend on the data; Opacus's
    optimiser adds the noise and its accountant counts the step like any other.
    """
    optimizer.zero_grad(set_to_none=True)
    for p in model.parameters():
        if p.requires_grad:
            p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)
    optimizer.step()

"""What both local training functions share (plain PyTorch, no NVFlare): the training loop and small helpers."""

from __future__ import annotations

import contextlib
import logging
import math
import random
import resource
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

__all__ = [
    "WARMUP_KEY",
    "LocalStep",
    "autocast",
    "dp_noise_only_step",
    "is_dp_optimizer",
    "peak_rss_mb",
    "resolve_device",
    "seed_everything",
    "train_loop",
]


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


WARMUP_KEY = "synthbrain_steps_taken"  # steps an optimiser has taken in train_loop (its warm-up clock)


class LocalStep:
    """What one model brings to :func:`train_loop`: ``unpack(batch)`` (the batch on the device, None when
    empty), ``loss(unpacked)`` (one batch's loss, under autocast; the loop does backward and the step),
    ``after_step(unpacked, loss, steps)`` (work after the optimiser step: metrics, extra updates; returns the
    batch's sample count), ``start_epoch()`` / ``epoch_metrics(n_batches)`` (the epoch's running metrics;
    ``n_batches``: this rank's optimiser batches) and ``validate()`` (after an epoch; None: no validation)."""

    def unpack(self, batch: Any) -> Any | None: ...
    def loss(self, unpacked: Any) -> torch.Tensor: ...
    def after_step(self, unpacked: Any, loss: torch.Tensor, steps: int) -> int: ...
    def start_epoch(self) -> None: ...
    def epoch_metrics(self, n_batches: int) -> dict[str, Any]: ...
    def validate(self) -> dict[str, Any] | None: ...


def train_loop(
    model: torch.nn.Module,
    train_loader: Iterable,
    optimizer: torch.optim.Optimizer,
    step: LocalStep,
    *,
    device: torch.device,
    epochs: int,
    max_steps: int | None,
    max_seconds: float | None,
    amp: str | bool,
    grad_clip: float | None,
    warmup_steps: int | None = None,
    decay_steps: int | None = None,
    min_lr_frac: float = 0.1,
    name: str = "train",
    on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """The local training loop both models share (the model's own work is ``step``, a :class:`LocalStep`).

    Per batch: zero the gradients, the loss under ``amp`` autocast, backward, average gradients over
    torchrun ranks, clip the batch gradient to ``grad_clip`` (non-DP; DP-SGD clips per sample), the warm-up
    learning rate, the optimiser step. An empty batch (Poisson sampling, unreadable files) still takes a
    noise-only DP-SGD step under DP, so the number of released steps does not depend on the data; under
    DDP every rank skips a batch that is empty on any rank, and a time budget stops all ranks together.
    ``warmup_steps`` (None: no warm-up clock) ramps the learning rate linearly over the optimiser's first
    steps, counted across calls in its first param group (``WARMUP_KEY``). ``decay_steps`` (None: a
    constant rate) then lowers it along a half cosine to ``min_lr_frac`` of the base rate at this call's
    ``decay_steps``-th step (a central run with a known step budget; federated rounds keep a constant rate).

    Returns ``{"epochs", "final", "steps", "train_seconds", "samples", "empty_batches", "dp", "world_size"}``
    (``samples`` and ``train_seconds`` are the site's: summed / averaged over ranks).
    """
    from fl_app.train import distributed as D

    dp = is_dp_optimizer(optimizer)
    ddp = D.is_distributed()
    if ddp and dp:
        raise ValueError("DP-SGD runs in one process only: a DP site must train with compute.nproc: 1")
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    steps_before = int(optimizer.param_groups[0].get(WARMUP_KEY, 0))

    def set_lr(step_idx: int) -> None:
        # linear warm-up over the optimiser's first steps: Adam's fresh moment estimates make the first
        # full-size steps unstable; later calls with the same optimiser (federated rounds) skip it
        frac = 1.0
        if warmup_steps:
            frac = min(1.0, (steps_before + step_idx + 1) / warmup_steps)
        if decay_steps:
            t = min(1.0, step_idx / decay_steps)
            frac *= min_lr_frac + (1.0 - min_lr_frac) * 0.5 * (1.0 + math.cos(math.pi * t))
        if warmup_steps or decay_steps:
            for g, lr0 in zip(optimizer.param_groups, base_lrs, strict=True):
                g["lr"] = lr0 * frac

    history: list[dict[str, Any]] = []
    steps = n_samples = n_empty = 0
    t_train = 0.0
    done = False
    for epoch in range(epochs):
        step.start_epoch()
        n_batches = 0
        t0 = time.perf_counter()
        D.next_epoch(train_loader)
        for batch in train_loader:
            unpacked = step.unpack(batch)
            if ddp and D.all_reduce_sum(torch.tensor([float(unpacked is None)])).item() > 0:
                unpacked = None  # some rank's batch is empty (unreadable files): every rank skips the step
            if unpacked is None:
                n_empty += 1
                if dp:
                    set_lr(steps)
                    dp_noise_only_step(model, optimizer)
                    steps += 1
            else:
                optimizer.zero_grad(set_to_none=True)
                with autocast(device, amp):
                    loss = step.loss(unpacked)
                loss.backward()
                D.average_gradients(model.parameters())
                if not dp and grad_clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
                set_lr(steps)
                optimizer.step()
                steps += 1
                n_batches += 1
                n_samples += step.after_step(unpacked, loss, steps)
            if max_steps is not None and steps >= max_steps:
                done = True
            if max_seconds is not None and t_train + (time.perf_counter() - t0) >= max_seconds:
                done = True
            if ddp and max_seconds is not None:  # clocks differ: stop together or not at all
                done = bool(D.all_reduce_sum(torch.tensor([float(done)])).item() > 0)
            if done:
                break
        t_train += time.perf_counter() - t0
        rec: dict[str, Any] = {"epoch": epoch + 1, "steps": steps, **step.epoch_metrics(n_batches)}
        rec["seconds"] = time.perf_counter() - t0
        val = step.validate()
        if val is not None:
            rec["val"] = val
            model.train()
        history.append(rec)
        log.info("%s epoch %d: %s", name, epoch + 1, {k: v for k, v in rec.items() if k != "val"})
        if on_epoch_end is not None:
            on_epoch_end(rec)
        if done:
            break
    for g, lr0 in zip(optimizer.param_groups, base_lrs, strict=True):
        g["lr"] = lr0
    if warmup_steps is not None:
        optimizer.param_groups[0][WARMUP_KEY] = steps_before + steps
    world = D.context().world_size
    if ddp:  # the site's total samples; the ranks' mean training time
        tot = D.sum_over_ranks({"n": float(n_samples), "t": t_train})
        n_samples, t_train = int(tot["n"]), tot["t"] / world
    return {
        "epochs": history,
        "final": history[-1] if history else {},
        "steps": steps,
        "train_seconds": t_train,
        "samples": n_samples,
        "empty_batches": n_empty,
        "dp": dp,
        "world_size": world,
    }

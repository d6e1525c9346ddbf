"""Several training processes at one site (``torchrun``, started by :mod:`fl_app.fl.launcher`): DDP helpers.

**Training (DDP).** :func:`init_from_env` joins torchrun's process group from its environment
(``nccl`` on CUDA, each rank on ``cuda:LOCAL_RANK``; ``gloo`` on CPU). The local training functions
(:func:`fl_app.train.vqvae_local.train_vqvae_local`, :func:`fl_app.train.prior_local.train_prior_local`)
detect the group: each rank takes its shard of the subjects (:func:`distributed_sampler`, the
``make_*_loader`` helpers do this), gradients are averaged after every backward pass
(:func:`average_gradients`), the VQ-VAE's EMA codebook statistics are summed over ranks, and counts and
losses are reduced, so every rank holds the same weights and reports the site's totals. Rank 0 sends.

DP-SGD is not combined with several processes (:func:`fl_app.fl.launcher.check_site_parallelism`).
Plain PyTorch: nothing here knows NVFlare.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)

__all__ = [
    "DistContext",
    "all_reduce_sum",
    "average_gradients",
    "broadcast_module_state",
    "broadcast_object",
    "context",
    "distributed_sampler",
    "init_from_env",
    "is_distributed",
    "main_process_first",
    "next_epoch",
    "shutdown",
    "sum_over_ranks",
]

_BUCKET_BYTES = 32 * 2**20


@dataclass(frozen=True)
class DistContext:
    """This process's place among the site's training processes (``world_size`` 1 = no torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """True on rank 0, the only rank that talks to NVFlare."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """True when several processes train together."""
        return self.world_size > 1


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def context() -> DistContext:
    """The current :class:`DistContext` (a single process when no group is initialised)."""
    if not is_distributed():
        return DistContext()
    return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def init_from_env(device: torch.device | str = "cpu") -> tuple[DistContext, torch.device]:
    """Join torchrun's process group when ``WORLD_SIZE`` > 1; returns ``(context, this rank's device)``.

    ``nccl`` on CUDA (the rank is pinned to ``cuda:LOCAL_RANK`` of the visible devices), ``gloo`` on CPU.
    Without torchrun (``WORLD_SIZE`` unset or 1) nothing happens and ``device`` is returned unchanged.
    """
    device = torch.device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext(), device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    ctx = DistContext(dist.get_rank(), dist.get_world_size(), local_rank)
    log.info("rank %d of %d on %s (%s)", ctx.rank, ctx.world_size, device, dist.get_backend())
    return ctx, device


def shutdown() -> None:
    """Leave the process group (no-op when none)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _comm_device() -> torch.device:
    """Where collective tensors must live for the group's backend."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@contextlib.contextmanager
def main_process_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. fills a cache), the other ranks after it (then hit the cache)."""
    if not is_distributed():
        yield
        return
    if dist.get_rank() != 0:
        dist.barrier()
    yield
    if dist.get_rank() == 0:
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (pickled; for small things: task headers, metadata)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_comm_device())
    return box[0]


@torch.no_grad()
def broadcast_module_state(module: nn.Module, src: int = 0) -> None:
    """Copy every parameter and buffer of ``module`` on rank ``src`` into the same module on all ranks."""
    if not is_distributed():
        return
    comm = _comm_device()
    for t in module.state_dict(keep_vars=True).values():
        data = t.data if isinstance(t, nn.Parameter) else t
        if not isinstance(data, torch.Tensor):
            continue
        if data.device == comm:
            dist.broadcast(data, src=src)
        else:
            tmp = data.to(comm)
            dist.broadcast(tmp, src=src)
            data.copy_(tmp)


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Element-wise sum over ranks (a new tensor on ``values``' device; ``values`` itself is unchanged)."""
    if not is_distributed():
        return values.clone()
    t = values.detach().to(_comm_device(), copy=True)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.to(values.device)


@torch.no_grad()
def average_gradients(params: Iterable[nn.Parameter]) -> None:
    """Average ``.grad`` over ranks in place (what DDP does after ``backward``), in flat buckets.

    A parameter without a gradient on some rank counts as a zero gradient there; one without a gradient
    on every rank keeps ``grad = None`` (so optimisers still skip it, as in a single process).
    """
    if not is_distributed():
        return
    params = [p for p in params if p.requires_grad]
    if not params:
        return
    world = dist.get_world_size()
    comm = _comm_device()
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=comm)
    dist.all_reduce(has, op=dist.ReduceOp.SUM)
    active = []
    for p, n in zip(params, has.tolist(), strict=True):
        if n == 0:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        active.append(p)
    bucket: list[torch.Tensor] = []
    size = 0

    def _flush() -> None:
        if not bucket:
            return
        flat = torch.cat([g.reshape(-1).to(comm, torch.float32) for g in bucket])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= world
        offset = 0
        for g in bucket:
            n = g.numel()
            g.copy_(flat[offset : offset + n].view_as(g))
            offset += n
        bucket.clear()

    for p in active:
        bucket.append(p.grad)
        size += p.grad.numel() * 4
        if size >= _BUCKET_BYTES:
            _flush()
            size = 0
    _flush()


def distributed_sampler(dataset: Any, shuffle: bool, seed: int = 0) -> Any:
    """A ``DistributedSampler`` giving this rank its shard of ``dataset`` (None outside a process group).

    Every rank gets the same number of items (the last ones are repeated when the size is not a multiple
    of the world size), so every rank takes the same number of optimiser steps.
    """
    if not is_distributed():
        return None
    from torch.utils.data.distributed import DistributedSampler

    return DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=False)


def next_epoch(loader: Any) -> None:
    """Advance a ``DistributedSampler``'s epoch (new shuffle each pass, same on every rank)."""
    from torch.utils.data.distributed import DistributedSampler

    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, DistributedSampler):
        epoch = getattr(sampler, "_synth_epoch", -1) + 1
        sampler._synth_epoch = epoch  # type: ignore[attr-defined]
        sampler.set_epoch(epoch)


def sum_over_ranks(values: Mapping[str, float]) -> dict[str, float]:
    """Sum a dict of floats over ranks (the same keys on every rank; float64)."""
    keys = sorted(values)
    t = all_reduce_sum(torch.tensor([float(values[k]) for k in keys], dtype=torch.float64))
    return dict(zip(keys, t.tolist(), strict=True))

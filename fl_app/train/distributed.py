"""Several training processes at one site: ``torchrun`` inside the site's NVFlare client, and DDP helpers.

**Launch (per site).** A site's YAML says how many processes it trains with (``compute.nproc``; the
site decides its hardware, the job never does). The job's client command is this module's launcher::

    python3 -u -m fl_app.train.distributed custom/client_vqvae.py --max-steps 50 ...

run by NVFlare's ``ClientAPIExecutor`` as an external process (:func:`recipe_launch_args`). The launcher
finds the site's YAML exactly as the client script does (``$SYNTHBRAIN_SITE_CONFIG``, ``--site-config``,
``<--site-config-dir>/<site>.yaml``; the site name comes from NVFlare's trainer bootstrap file) and
replaces itself (``exec``) with either the client script (``nproc: 1``) or ``torchrun --standalone
--nproc_per_node=N`` of it. torchrun's processes inherit NVFlare's bootstrap: rank 0 (``RANK=0``) opens
the Client API session and talks to the server; the other ranks have none (NVFlare 2.9's Cell Client
API is passive off rank 0) and get each round's task and global weights from rank 0 by broadcast
(:func:`broadcast_object`, :func:`broadcast_module_state`).

**Training (DDP).** :func:`init_from_env` joins torchrun's process group from its environment
(``nccl`` on CUDA, each rank on ``cuda:LOCAL_RANK``; ``gloo`` on CPU). The local training functions
(:func:`fl_app.train.vqvae_local.train_vqvae_local`, :func:`fl_app.train.prior_local.train_prior_local`)
detect the group: each rank takes its shard of the subjects (:func:`distributed_sampler`, the
``make_*_loader`` helpers do this), gradients are averaged after every backward pass
(:func:`average_gradients`), the VQ-VAE's EMA codebook statistics are summed over ranks, and counts and
losses are reduced, so every rank holds the same weights and reports the site's totals. Rank 0 sends.

DP-SGD is not combined with several processes: a site with ``privacy.enabled`` and ``compute.nproc`` > 1
is refused (:func:`check_site_parallelism`), because Opacus' per-sample clipping and the site's privacy
accounting assume one process sees the whole Poisson-sampled batch.

Nothing here imports NVFlare at module level except the launcher's bootstrap lookup.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)

__all__ = [
    "LAUNCHER_MODULE",
    "DistContext",
    "all_reduce_sum",
    "average_gradients",
    "broadcast_module_state",
    "broadcast_object",
    "check_site_parallelism",
    "context",
    "distributed_sampler",
    "init_from_env",
    "is_distributed",
    "launch_argv",
    "main",
    "main_process_first",
    "next_epoch",
    "recipe_launch_args",
    "shutdown",
    "sum_over_ranks",
]

LAUNCHER_MODULE = "fl_app.train.distributed"
"""``python -m`` target of the site launcher (the command the jobs give NVFlare's external launch)."""

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


# --------------------------------------------------------------------------- site configuration


def check_site_parallelism(cfg: Any, world_size: int | None = None) -> None:
    """Refuse what several processes cannot do at a site: DP-SGD (``privacy.enabled``) with ``nproc`` > 1.

    Args:
        cfg: the site's :class:`~fl_app.config.SiteConfig`.
        world_size: processes actually running (default: the YAML's ``compute.nproc``).
    """
    from fl_app.config import ConfigError

    n = cfg.compute.nproc if world_size is None else world_size
    if cfg.privacy.enabled and n > 1:
        where = cfg.path or f"the YAML of site {cfg.name}"
        raise ConfigError(
            f"{where}: compute.nproc is {n} but privacy.enabled is true: local DP-SGD runs in one process "
            "only (set compute.nproc: 1 in the site YAML, or turn privacy off)"
        )


def _site_name_from_bootstrap() -> str | None:
    """The site name NVFlare wrote into the external trainer's bootstrap file (None outside NVFlare)."""
    try:
        from nvflare.client.cell.bootstrap import BOOTSTRAP_FILE_ENV_VAR, BootstrapKey, read_bootstrap_config
    except ImportError:  # pragma: no cover - nvflare is a dependency
        return None
    path = os.environ.get(BOOTSTRAP_FILE_ENV_VAR)
    if not path:
        return None
    return read_bootstrap_config(path).get(BootstrapKey.SITE_NAME)


def _site_config_for(script_args: list[str], site_name: str | None) -> Any:
    import argparse

    from fl_app.config import find_site_config, load_site_config

    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--site-config", default=None)
    p.add_argument("--site-config-dir", default=None)
    known, _ = p.parse_known_args(script_args)
    path = find_site_config(site_name or "", known.site_config, known.site_config_dir)
    return load_site_config(path)


def _resolve_script(script: str) -> str:
    """The script's path in the app folder (the launcher's working directory).

    NVFlare names an absolute script ``custom/<basename>`` in the command but copies it to
    ``custom/<its path relative to the longest sys.path entry holding it>`` (``custom/jobs/...`` when the
    job is built from a clone); look it up under ``custom/`` when the named path does not exist.
    """
    if Path(script).exists():
        return script
    found = sorted(str(p) for p in Path("custom").rglob(Path(script).name)) if Path("custom").is_dir() else []
    if len(found) == 1:
        return found[0]
    raise FileNotFoundError(f"client script {script} not found in {Path.cwd()} (candidates: {found})")


def launch_argv(script: str, script_args: list[str], nproc: int, python: str | None = None) -> list[str]:
    """The command that runs ``script`` with ``nproc`` processes (``torchrun --standalone`` when > 1)."""
    py = python or sys.executable
    if nproc <= 1:
        return [py, "-u", script, *script_args]
    return [
        py,
        "-u",
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "--",  # the script's own options (--run ...) must not be taken as abbreviations of torchrun's
        script,
        *script_args,
    ]


def _max_nproc(site_config_dir: str | Path) -> int:
    from fl_app.config import load_site_config

    n = 1
    for p in sorted(Path(site_config_dir).glob("*.yaml")):
        if p.stem == "project":
            continue
        n = max(n, load_site_config(p).compute.nproc)
    return n


def recipe_launch_args(site_config_dir: str | Path | None) -> dict[str, Any]:
    """How a job launches its client script: keyword arguments for NVFlare's ``FedAvgRecipe``.

    * ``site_config_dir`` given (the simulator: every site's YAML is on this machine): the script runs
      inside the client (in-process) unless a site there asks for ``compute.nproc`` > 1; then every site
      goes through the launcher, with this interpreter (``sys.executable``).
    * ``site_config_dir`` None (POC, production: the sites' YAMLs are theirs alone): always the launcher,
      so each site can decide at run time; ``python3`` is the interpreter NVFlare's own startup scripts
      use at the site (``sub_start.sh``), i.e. the site's synthbrain environment.
    """
    if site_config_dir is not None:
        if _max_nproc(site_config_dir) <= 1:
            return {"launch_external_process": False}
        python = sys.executable
    else:
        python = "python3"
    return {
        "launch_external_process": True,
        "command": shlex.join([python, "-u", "-m", LAUNCHER_MODULE]),
    }


def main(argv: list[str] | None = None) -> int:
    """``python -m fl_app.train.distributed SCRIPT [ARGS...]``: run SCRIPT with the site's ``compute.nproc``.

    Reads the site's YAML, refuses DP with several processes, exports the site's GPUs
    (``CUDA_VISIBLE_DEVICES``) and per-process threads (``OMP_NUM_THREADS``) to the processes it starts,
    then replaces itself with the script or with ``torchrun`` of it (same process group, so NVFlare stops
    every rank when it stops the trainer).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(main.__doc__)
        return 0 if args else 2
    script, script_args = args[0], args[1:]
    cfg = _site_config_for(script_args, _site_name_from_bootstrap())
    check_site_parallelism(cfg)
    if cfg.compute.gpus:
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", ",".join(str(g) for g in cfg.compute.gpus))
    if cfg.compute.num_threads:
        os.environ.setdefault("OMP_NUM_THREADS", str(cfg.compute.num_threads))
    cmd = launch_argv(_resolve_script(script), script_args, cfg.compute.nproc)
    print(
        f"synthbrain site {cfg.name}: {cfg.compute.nproc} training process(es): {shlex.join(cmd)}", flush=True
    )
    os.execv(cmd[0], cmd)
    return 0  # pragma: no cover - execv does not return


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(main())

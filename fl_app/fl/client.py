"""Helpers shared by the thin NVFlare client scripts (``fl_app/train/client_vqvae.py``, ``client_prior.py``).

Nothing here does training math: it resolves the site's YAML, opens its data, applies the site's compute
settings, turns received global weights into a torch ``state_dict``, and computes the update
(``local − global``) the client sends back.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from fl_app.config import Profile
from fl_app.fl.site import FLSiteConfig, find_site_config, load_fl_site_config

log = logging.getLogger(__name__)

__all__ = [
    "add_common_client_args",
    "apply_compute",
    "data_health_metrics",
    "open_site_dataset",
    "planned_steps",
    "refusal_model",
    "resolve_site",
    "run_client",
    "state_delta",
    "to_state_dict",
]


def add_common_client_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments every synthbrain client script takes (set by the job; the site YAML can cap them)."""
    p.add_argument("--site-config", default=None, help="site YAML (default: $SYNTHBRAIN_SITE_CONFIG)")
    p.add_argument("--site-config-dir", default=None, help="folder of <site>.yaml (simulator / POC)")
    p.add_argument(
        "--local-epochs",
        type=int,
        default=1,
        help="local epochs per round (ignored when a step cap is given)",
    )
    p.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help="local optimiser steps per round (takes precedence over --local-epochs)",
    )
    p.add_argument("--batch-size", type=int, default=None, help="default: profile train.batch_size")
    p.add_argument("--lr", type=float, default=None, help="default: profile train.lr")
    p.add_argument("--seed", type=int, default=0)
    # DP: what the job asks; the site's YAML decides whether DP is on and caps the total ε
    p.add_argument("--rounds", type=int, default=1, help="the job's planned rounds (plans the DP noise)")
    p.add_argument("--dp-epsilon", type=float, default=None, help="target ε of this job at each DP site")
    p.add_argument("--run", default="", help="consortium run name (recorded in site privacy ledgers)")
    return p


def run_client(description: str | None, rounds: Callable[..., int], argv: list[str] | None = None) -> int:
    """Entry point of a client script: parse the job's arguments, open the NVFlare Client API, resolve the
    site's YAML and compute settings, join the site's torchrun group (when ``compute.nproc`` > 1), then run
    ``rounds(flare, args, cfg, site_name, device, dist_ctx)`` (the script's round loop) and leave the group."""
    import nvflare.client as flare

    from fl_app.train import distributed as D

    args = add_common_client_args(argparse.ArgumentParser(description=description)).parse_args(argv)
    flare.init()  # rank from $RANK: only rank 0 opens a Client API session
    site_name = flare.get_site_name()
    cfg = resolve_site(site_name, args)
    device = apply_compute(cfg)
    dist_ctx, device = D.init_from_env(device)
    try:
        D.check_site_parallelism(cfg, dist_ctx.world_size)
        return rounds(flare, args, cfg, site_name, device, dist_ctx)
    finally:
        D.shutdown()


def planned_steps(args: argparse.Namespace, cfg: FLSiteConfig, loader_len: int) -> tuple[int | None, int]:
    """``(max_steps for train_*_local, planned optimiser steps per round)`` after the site's caps."""
    max_steps = args.max_steps
    if cfg.training.max_steps_per_round:
        max_steps = min(max_steps or 10**9, cfg.training.max_steps_per_round)
    return max_steps, (max_steps if max_steps is not None else args.local_epochs * max(loader_len, 1))


def refusal_model(reason: str):
    """The reply of a site that refuses a round: no parameters, so the server's FedAvg controller skips
    it (``Empty result from client``) and the round goes on with the other sites."""
    from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

    return FLModel(params={}, params_type=ParamsType.DIFF, metrics={}, meta={"synthbrain_refused": reason})


def resolve_site(site_name: str, args: argparse.Namespace) -> FLSiteConfig:
    """The site's :class:`FLSiteConfig` (see :func:`fl_app.fl.site.find_site_config`)."""
    path = find_site_config(site_name, args.site_config, args.site_config_dir)
    cfg = load_fl_site_config(path)
    log.info("site %s: config %s", site_name, path)
    return cfg


def apply_compute(cfg: FLSiteConfig) -> torch.device:
    """Apply the site's compute settings; returns the training device."""
    if cfg.compute.gpus:
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", ",".join(str(g) for g in cfg.compute.gpus))
    if cfg.compute.num_threads:
        torch.set_num_threads(cfg.compute.num_threads)
    if cfg.compute.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.compute.device)


def open_site_dataset(cfg: FLSiteConfig, profile: Profile):
    """The site's :class:`~fl_app.data.dataset.SiteDataset` (preprocessed once into its cache)."""
    from fl_app.data.cohort import read_cohort
    from fl_app.data.dataset import SiteDataset

    cohort = read_cohort(cfg.site)
    ds = SiteDataset(
        cohort.valid(), profile, cache_dir=cfg.site.cache_dir, derive_labels=cfg.site.derive_labels
    )
    ds.skip_unreadable = True  # a file that stops reading mid-job is excluded, not fatal to the round
    if len(ds) < cfg.site.min_subjects:
        raise RuntimeError(
            f"site {cfg.name}: {len(ds)} usable subjects, fewer than its min_subjects ({cfg.site.min_subjects})"
        )
    log.info("site %s: %d subjects usable (%d skipped)", cfg.name, len(ds), ds.n_skipped)
    return ds


def data_health_metrics(dataset: Any) -> dict[str, float]:
    """Re-verify the site's files (:meth:`~fl_app.data.dataset.SiteDataset.recheck`) and return the counts
    a client reports each round: ``skipped_subjects`` (unreadable when the job started) and
    ``unreadable_subjects`` (stopped reading since; excluded from training from then on). Counts only:
    never which subject or what is wrong with its file."""
    recheck = getattr(dataset, "recheck", None)
    unreadable = recheck() if callable(recheck) else 0
    return {
        "skipped_subjects": float(getattr(dataset, "n_skipped", 0)),
        "unreadable_subjects": float(unreadable),
    }


def to_state_dict(params: Mapping[str, Any], prefix: str = "", exclude_prefix: str | None = None) -> dict:
    """Received FLModel params (numpy or torch) -> ``{name: tensor}``, optionally selecting a prefix."""
    out = {}
    for k, v in params.items():
        if exclude_prefix and k.startswith(exclude_prefix):
            continue
        if prefix and not k.startswith(prefix):
            continue
        t = v if isinstance(v, torch.Tensor) else torch.as_tensor(np.asarray(v))
        out[k[len(prefix) :]] = t
    return out


def state_delta(new: Mapping[str, torch.Tensor], old: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``new − old`` per tensor (CPU), the update a client sends (``ParamsType.DIFF``)."""
    if set(new) != set(old):
        raise ValueError(f"state keys differ: {sorted(set(new) ^ set(old))[:5]}")
    return {k: (new[k].detach().cpu() - old[k].detach().cpu().to(new[k].dtype)) for k in new}


def state_checksum(state: Mapping[str, torch.Tensor]) -> float:
    """Σ |w| over a state dict (float64): a cheap fingerprint proving which weights a client used."""
    return float(sum(float(v.detach().double().abs().sum()) for v in state.values()))

"""A hospital site's federation config: the data part (:class:`fl_app.config.SiteConfig`) plus what the site
controls when it runs an NVFlare client -- local DP settings and privacy budget, compute, local work caps.

One YAML per site (``site_configs/<site>.yaml``)::

    name: site-1
    bids_dir: /data/site-1             # or manifest: cohort.csv (relative paths: relative to this file)
    profile: cpu-demo
    cache_dir: /var/cache/synthbrain    # preprocessed volumes and code grids (never the data folder)
    min_subjects: 4
    privacy:                           # local DP-SGD (Opacus), enforced by the site's own client
      enabled: false
      noise_multiplier: null           # null: derived from the job's target ε for its planned steps
      max_grad_norm: 1.0               # per-sample clip bound
      delta: 1.0e-5
      epsilon_budget: 8.0              # total ε over all jobs; a task that would exceed it is refused
      job_epsilon: null                # target ε of a job that does not ask for one
      accountant: rdp                  # rdp | prv (Opacus)
      ledger: null                     # default <cache_dir>/privacy_ledger.json: every DP release composed
      release: [accounting]            # accepted data-dependent extras: accounting and/or metrics
    compute:
      device: auto                     # auto | cpu | cuda
      gpus: []                         # CUDA device ids the client may use (CUDA_VISIBLE_DEVICES)
      num_threads: null                # torch intra-op threads per process (null = torch's default)
      nproc: 1                         # training processes (torchrun, one per GPU); >1 needs privacy off
    training:                          # caps on the work the consortium's job may ask of this site
      max_steps_per_round: null
      batch_size: null

The client finds its YAML from ``$SYNTHBRAIN_SITE_CONFIG`` (what hospital IT sets in the startup kit's
environment), else from ``--site-config PATH``, else ``<--site-config-dir>/<site name>.yaml`` (the
simulator and POC, where every simulated site's YAML sits in one folder).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fl_app.config import ConfigError, SiteConfig

ENV_SITE_CONFIG = "SYNTHBRAIN_SITE_CONFIG"

__all__ = [
    "ENV_SITE_CONFIG",
    "FLSiteConfig",
    "SiteCompute",
    "SitePrivacy",
    "SiteTraining",
    "find_site_config",
    "load_fl_site_config",
    "write_site_yaml",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SitePrivacy(_Strict):
    """Local differential privacy (record-level DP-SGD at the site) and the site's privacy budget.

    Only the site's YAML sets these; no job setting can raise ``epsilon_budget`` (see docs/PRIVACY.md).
    """

    enabled: bool = False
    noise_multiplier: float | None = Field(
        None, gt=0.0, description="Fixed σ; null = derived from the job's target ε (or job_epsilon)."
    )
    max_grad_norm: float = Field(1.0, gt=0.0, description="Per-sample clip bound C.")
    delta: float = Field(1e-5, gt=0.0, lt=1.0)
    epsilon_budget: float | None = Field(
        None,
        gt=0.0,
        description="Largest total ε (all jobs composed) the site accepts; required when enabled.",
    )
    job_epsilon: float | None = Field(
        None, gt=0.0, description="Target ε of one job when the job does not ask for one."
    )
    accountant: Literal["rdp", "prv"] = "rdp"
    ledger: Path | None = Field(
        None, description="The site's privacy ledger file (default <cache_dir>/privacy_ledger.json)."
    )
    release: list[Literal["accounting", "metrics"]] = Field(
        default_factory=lambda: ["accounting"],
        description="Data-dependent values the site accepts to send besides the DP update: 'accounting' "
        "(ε, σ, sampling rate, steps, subject counts) and/or 'metrics' (losses, PSNR: NOT private).",
    )

    @model_validator(mode="after")
    def _budget_when_enabled(self) -> SitePrivacy:
        if self.enabled and self.epsilon_budget is None:
            raise ValueError("privacy.enabled needs privacy.epsilon_budget (the site's maximum ε)")
        return self


class SiteCompute(_Strict):
    """The hardware the site's client may use; only the site's YAML sets it (the job never does).

    ``nproc`` > 1 makes the site's client train with that many processes under ``torchrun`` (one per GPU
    on CUDA, each pinned to ``LOCAL_RANK`` of the visible ``gpus``; ``gloo`` processes on CPU), with
    gradients averaged across them (see :mod:`fl_app.train.distributed`). ``num_threads`` is per process.
    """

    device: Literal["auto", "cpu", "cuda"] = "auto"
    gpus: list[int] = Field(default_factory=list)
    num_threads: int | None = Field(None, gt=0)
    nproc: int = Field(
        1, ge=1, description="Training processes at this site (torchrun --nproc_per_node); 1 = no torchrun."
    )

    @model_validator(mode="after")
    def _enough_gpus(self) -> SiteCompute:
        if self.gpus and self.device != "cpu" and self.nproc > len(self.gpus):
            raise ValueError(f"nproc {self.nproc} exceeds the {len(self.gpus)} GPU(s) listed in gpus")
        return self


class SiteTraining(_Strict):
    max_steps_per_round: int | None = Field(None, gt=0)
    batch_size: int | None = Field(None, gt=0)


_FL_KEYS = {"privacy": SitePrivacy, "compute": SiteCompute, "training": SiteTraining}


@dataclass
class FLSiteConfig:
    """Everything a site's client reads from its YAML."""

    site: SiteConfig
    privacy: SitePrivacy
    compute: SiteCompute
    training: SiteTraining
    path: Path | None = None

    @property
    def name(self) -> str:
        return self.site.name


def _format(err: ValidationError, source: str, prefix: str = "") -> str:
    out = []
    for e in err.errors():
        loc = ".".join(str(p) for p in (prefix, *e["loc"]) if p != "")
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        out.append(f"{source}: {loc}: {msg}")
    return "\n".join(out)


def fl_site_config_from_dict(
    data: dict[str, Any], base: Path | None = None, source: str = "site"
) -> FLSiteConfig:
    """Validate a site dict; relative data paths are resolved against ``base``."""
    data = dict(data)
    parts: dict[str, Any] = {}
    for key, cls in _FL_KEYS.items():
        try:
            parts[key] = cls.model_validate(data.pop(key, None) or {})
        except ValidationError as exc:
            raise ConfigError(_format(exc, source, key)) from None
    try:
        site = SiteConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format(exc, source)) from None
    if base is not None:
        for key in ("bids_dir", "manifest", "cache_dir"):
            val = getattr(site, key)
            if val is not None and not Path(val).is_absolute():
                setattr(site, key, (base / val).resolve())
        led = parts["privacy"].ledger
        if led is not None and not Path(led).is_absolute():
            parts["privacy"].ledger = (base / led).resolve()
    return FLSiteConfig(site=site, **parts)


def load_fl_site_config(path: str | Path) -> FLSiteConfig:
    """Read a site YAML (see the module docstring)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    cfg = fl_site_config_from_dict(data, base=path.parent, source=str(path))
    cfg.path = path
    return cfg


def find_site_config(
    site_name: str, site_config: str | None = None, site_config_dir: str | None = None
) -> Path:
    """Where a client's site YAML is: ``$SYNTHBRAIN_SITE_CONFIG``, ``site_config``, ``<dir>/<site>.yaml``."""
    env = os.environ.get(ENV_SITE_CONFIG)
    for cand in (env, site_config):
        if cand:
            return Path(cand)
    if site_config_dir:
        p = Path(site_config_dir) / f"{site_name}.yaml"
        if p.exists():
            return p
        raise ConfigError(f"no site config for {site_name!r}: {p} does not exist")
    raise ConfigError(
        f"no site config for {site_name!r}: set ${ENV_SITE_CONFIG} to the site's YAML "
        "(or pass --site-config / --site-config-dir in the job)"
    )


def write_site_yaml(path: str | Path, data: dict[str, Any]) -> Path:
    """Write a site YAML (validated first)."""
    path = Path(path)
    fl_site_config_from_dict(data, base=path.parent, source=str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path

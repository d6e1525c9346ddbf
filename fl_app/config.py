"""One typed, validated configuration schema for synthbrain.

A *profile* fixes everything that must agree across the consortium: the voxel grid
(shape and spacing), intensity normalisation, the VQ-VAE and prior architectures and
the default training hyper-parameters. A *site config* is what a hospital controls:
where its data is, how its ``participants.tsv`` is spelt, its minimum cohort size and
(later) its privacy budget.

YAML goes in, pydantic validates it. Unknown keys and bad values raise
:class:`ConfigError` whose message names the offending key path, e.g.
``vqvae.num_embeddings: Input should be greater than 1``.

Built-in profiles live in ``fl_app/profiles/<name>.yaml`` (``cpu-demo`` and
``full-1mm``); a profile file may ``extends: <name>`` another and override any key.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

PROFILE_DIR = Path(__file__).parent / "profiles"

TISSUE_LABELS: dict[int, str] = {0: "background", 1: "CSF", 2: "GM", 3: "WM"}
"""Tissue label convention of every label map read or written by synthbrain."""


class ConfigError(ValueError):
    """A configuration file or dictionary is invalid; the message names the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


Triple = tuple[float, float, float]
IntTriple = tuple[int, int, int]


class DataSection(_Strict):
    """Voxel grid and intensity normalisation every site preprocesses to."""

    shape: IntTriple = Field(description="Model grid (x, y, z) in voxels, RAS order.")
    spacing: Triple = Field(description="Voxel size (x, y, z) in mm.")
    lower_percentile: float = Field(0.5, ge=0.0, lt=50.0)
    upper_percentile: float = Field(99.5, gt=50.0, le=100.0)
    min_fov_mm: Triple = Field(
        (140.0, 160.0, 110.0),
        description="Smallest physical field of view (x, y, z, mm) an input image may have.",
    )
    voxel_size_range_mm: tuple[float, float] = Field(
        (0.2, 6.0), description="Plausible voxel size range of input images, in mm."
    )
    anti_alias: bool = Field(True, description="Gaussian pre-filter when down-sampling.")
    brain_mask: Literal["none", "labels"] = Field(
        "none",
        description="'labels': brain-extract the image with the subject's tissue label map (intracranial "
        "voxels, dilated by brain_mask_dilate_mm); subjects without a label map are then unusable. "
        "'none': keep the whole head.",
    )
    brain_mask_dilate_mm: float = Field(3.0, ge=0.0, description="Margin kept around the label mask (mm).")

    @field_validator("shape")
    @classmethod
    def _positive_shape(cls, v: IntTriple) -> IntTriple:
        if any(s < 8 for s in v):
            raise ValueError(f"every dimension must be at least 8 voxels, got {list(v)}")
        return v

    @field_validator("spacing", "min_fov_mm")
    @classmethod
    def _positive(cls, v: Triple) -> Triple:
        if any(not math.isfinite(s) or s <= 0 for s in v):
            raise ValueError(f"every value must be a positive number, got {list(v)}")
        return v

    @model_validator(mode="after")
    def _range_ok(self) -> DataSection:
        lo, hi = self.voxel_size_range_mm
        if not 0 < lo < hi:
            raise ValueError("voxel_size_range_mm must be (low, high) with 0 < low < high")
        return self

    @property
    def fov_mm(self) -> Triple:
        return tuple(n * s for n, s in zip(self.shape, self.spacing, strict=True))  # type: ignore[return-value]


class VQVAESection(_Strict):
    """MONAI VQVAE architecture and quantiser; see fl_app.models.vqvae."""

    channels: tuple[int, ...] = (32, 64, 128)
    num_res_layers: int = Field(1, ge=0)
    num_res_channels: tuple[int, ...] = (32, 64, 128)
    num_embeddings: int = Field(256, gt=1)
    embedding_dim: int = Field(32, gt=0)
    commitment_cost: float = Field(0.25, ge=0.0)
    ema_decay: float = Field(0.99, gt=0.0, lt=1.0)
    quantiser: Literal["ema", "loss", "fsq"] = Field(
        "loss",
        description="'ema' = MONAI's EMA codebook; 'loss' = learned through the loss; 'fsq' = finite scalar "
        "quantisation (no codebook). 'loss' and 'fsq' are DP-safe; a site running DP-SGD refuses 'ema'.",
    )
    fsq_levels: tuple[int, ...] = Field(
        (8, 5, 5, 5),
        description="'fsq': values per code channel; num_embeddings = their product, embedding_dim = "
        "their count.",
    )
    joint_labels: bool = Field(True, description="Encode the tissue label map with the image.")
    label_weight: float = Field(1.0, ge=0.0, description="Weight of the label cross-entropy term.")
    dead_code_restart: bool = Field(
        True, description="Re-seed unused codes from local encoder outputs (never under DP)."
    )
    dead_code_every: int = Field(50, gt=0, description="Steps between dead-code checks.")
    codebook_init_scale: float | None = Field(
        None, gt=0.0, description="'loss' codebook init U(-s, s); None = 1/num_embeddings."
    )
    codebook_normalize: bool = Field(
        True, description="'loss' codebook: l2-normalised codes and encoder outputs (cosine lookup)."
    )
    entropy_weight: float = Field(
        0.1,
        ge=0.0,
        description="'loss' codebook: per-volume code-usage entropy term (anti-collapse, DP-safe).",
    )
    entropy_temperature: float = Field(0.1, gt=0.0)
    lr: float | None = Field(None, gt=0.0, description="VQ-VAE learning rate; None = train.lr.")
    warmup_steps: int = Field(
        20,
        ge=0,
        description="Linear learning-rate warm-up over an optimiser's first steps (a federated site's "
        "first rounds; counted across rounds, not restarted every round).",
    )
    grad_clip_norm: float | None = Field(
        1.0, gt=0.0, description="Clip the batch gradient norm (non-DP; DP-SGD clips per sample)."
    )
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant",
        description="After the warm-up: a constant rate, or a half cosine down to 10 % of it over a run's "
        "step budget (--max-steps; central runs such as pretrain; federated rounds stay constant).",
    )
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    checkpointing: bool = Field(False, description="Activation checkpointing (saves GPU memory).")
    recon_loss: Literal["l1", "l2", "l1+l2"] = Field("l1+l2", description="Image reconstruction loss.")
    adv_weight: float = Field(
        0.0, ge=0.0, description="Weight of the optional patch-adversarial term (non-DP only)."
    )

    @model_validator(mode="after")
    def _levels(self) -> VQVAESection:
        if len(self.channels) != len(self.num_res_channels):
            raise ValueError("channels and num_res_channels must have the same length (one per level)")
        if self.quantiser == "fsq":
            k, d = math.prod(self.fsq_levels), len(self.fsq_levels)
            if min(self.fsq_levels) < 2 or (self.num_embeddings, self.embedding_dim) != (k, d):
                raise ValueError(
                    f"quantiser 'fsq' with fsq_levels {list(self.fsq_levels)} needs every level >= 2, "
                    f"num_embeddings {k} (their product) and embedding_dim {d} (their count); got "
                    f"num_embeddings {self.num_embeddings}, embedding_dim {self.embedding_dim}"
                )
        return self

    @property
    def downsample_factor(self) -> int:
        return 2 ** len(self.channels)


class PriorSection(_Strict):
    """Conditional decoder-only transformer prior; see fl_app.models.prior."""

    d_model: int = Field(256, gt=0)
    n_layers: int = Field(8, gt=0)
    n_heads: int = Field(8, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    attention: Literal["softmax", "linear"] = "softmax"
    ordering: Literal["raster", "random"] = "raster"
    cond_dropout: float = Field(
        0.1,
        ge=0.0,
        le=1.0,
        description="Training-time probability of replacing covariates by 'unknown': all three at once "
        "with this probability, otherwise each one independently with it. 1.0 = unconditional model.",
    )
    age_range: tuple[float, float] = Field(
        (20.0, 95.0), description="Ages mapped to [0, 1] before the age embedding (years)."
    )
    age_frequencies: int = Field(6, ge=0, description="Fourier frequencies of the age embedding.")
    mlp_ratio: int = Field(4, gt=0, description="Hidden width of each block's MLP / d_model.")
    ordering_seed: int = Field(0, description="Seed of the fixed permutation when ordering is 'random'.")
    linear_impl: Literal["auto", "torch", "fast"] = Field(
        "auto",
        description="Linear attention kernel: 'fast' = pytorch-fast-transformers (the 'fast' extra), "
        "'torch' = pure PyTorch, 'auto' = fast when installed (float32) else torch.",
    )
    linear_chunk: int = Field(
        64, gt=0, description="Chunk length of the pure-PyTorch causal linear attention."
    )
    cond_every_position: bool = Field(
        False,
        description="Besides the prefix, add the condition (a learned projection of the three prefix "
        "embeddings, zero at initialisation) to every code position's input: a direct path from the "
        "covariates to each prediction instead of one only through attention to the prefix.",
    )
    warmup_steps: int = Field(
        0, ge=0, description="Linear learning-rate warm-up over an optimiser's first steps (as vqvae's)."
    )
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant",
        description="After the warm-up: a constant rate, or a half cosine down to 10 % of it over a run's "
        "step budget (--max-steps; central runs; federated rounds stay constant).",
    )

    @model_validator(mode="after")
    def _heads(self) -> PriorSection:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        lo, hi = self.age_range
        if not lo < hi:
            raise ValueError(f"age_range must be (low, high) with low < high, got {[lo, hi]}")
        return self


class TrainSection(_Strict):
    """Default local-training hyper-parameters."""

    batch_size: int = Field(4, gt=0)
    lr: float = Field(1e-3, gt=0.0)
    epochs: int = Field(10, gt=0)
    val_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    amp: Literal["none", "bf16"] = "none"
    seed: int = 0
    num_workers: int = Field(0, ge=0)


FINETUNE_PRESETS: dict[str, tuple[str, ...]] = {
    "all": ("*",),
    # VQ-VAE (MONAI VQVAE: encoder / decoder blocks; no normalisation layers)
    "decoder": ("net.decoder.*",),
    "decoder_last": ("net.decoder.blocks.3.*", "net.decoder.blocks.4.*"),
    "decoder_out": ("net.decoder.blocks.4.*",),
    "biases": ("*.bias",),
    # prior (transformer)
    "norms": ("*.ln1.*", "*.ln2.*", "ln_f.*"),
    "prior_last": ("blocks.{last}.*", "ln_f.*", "head.*"),
    "cond_embeddings": ("age_emb.*", "sex_emb.*", "dx_emb.*", "cond_proj.*"),
}
"""Named subsets of a model's parameters for fine-tuning (``finetune.vqvae`` / ``finetune.prior``); each is a
list of ``fnmatch`` patterns over parameter names (``{last}``: the index of the prior's last block)."""


class FinetuneSection(_Strict):
    """Which parameters a federated job trains; the others stay frozen at the initial (public) checkpoint.

    Each list holds preset names (:data:`FINETUNE_PRESETS`) and/or ``fnmatch`` patterns over parameter names
    (``net.decoder.blocks.4.*``). ``["all"]`` (default) trains every parameter and sends a full update. With
    a subset, only the trainable tensors are optimised (Opacus sees only them under DP) and sent; the frozen
    ones are public already (they are the checkpoint) and never leave a site.
    """

    vqvae: list[str] = Field(default_factory=lambda: ["all"], min_length=1)
    prior: list[str] = Field(default_factory=lambda: ["all"], min_length=1)
    lr: float | None = Field(
        None,
        gt=0.0,
        description="Learning rate of both federated jobs' local optimisers when set (None: each model's own, "
        "vqvae.lr / train.lr). A fine-tune from a converged checkpoint wants a smaller step than training from "
        "scratch, and DP-SGD more so: Adam turns the noise into a step of about lr on every trainable weight.",
    )

    @field_validator("vqvae", "prior")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        for item in v:
            if item not in FINETUNE_PRESETS and not any(c in item for c in "*?[."):
                raise ValueError(
                    f"{item!r} is neither a preset ({', '.join(FINETUNE_PRESETS)}) nor a parameter-name pattern"
                )
        return v

    def is_full(self, kind: str) -> bool:
        """True when the ``kind`` model (``"vqvae"`` / ``"prior"``) is trained whole."""
        return list(getattr(self, kind)) == ["all"]


class Profile(_Strict):
    """A complete, validated profile (``cpu-demo``, ``full-1mm`` or a custom one)."""

    name: str
    description: str = ""
    data: DataSection
    vqvae: VQVAESection = VQVAESection()
    prior: PriorSection = PriorSection()
    train: TrainSection = TrainSection()
    finetune: FinetuneSection = FinetuneSection()

    @model_validator(mode="after")
    def _grid_divisible(self) -> Profile:
        f = self.vqvae.downsample_factor
        if any(s % f for s in self.data.shape):
            raise ValueError(
                f"data.shape {list(self.data.shape)} must be divisible by the VQ-VAE's "
                f"down-sampling factor {f} (2 ** number of levels)"
            )
        return self

    @property
    def code_shape(self) -> IntTriple:
        f = self.vqvae.downsample_factor
        return tuple(s // f for s in self.data.shape)  # type: ignore[return-value]


class CohortColumns(_Strict):
    """How a site's participants.tsv (or CSV manifest) spells its columns and values."""

    participant_id: str = "participant_id"
    age: str = "age"
    sex: str = "sex"
    diagnosis: str = "diagnosis"
    path: str = "path"
    label_path: str = "label_path"
    sex_values: dict[str, Literal["F", "M"]] = Field(
        default_factory=lambda: {"F": "F", "M": "M", "female": "F", "male": "M"},
        description="Raw value (case-insensitive) -> F/M.",
    )
    diagnosis_values: dict[str, Literal["CN", "MCI", "AD"]] = Field(
        default_factory=lambda: {"CN": "CN", "MCI": "MCI", "AD": "AD"},
        description="Raw value (case-insensitive) -> CN/MCI/AD.",
    )
    age_range: tuple[float, float] = (0.0, 120.0)


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
        None, gt=0.0, description="Target ε of a job that does not ask for one."
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
    """Caps on the local work a consortium's job may ask of the site per round."""

    max_steps_per_round: int | None = Field(None, gt=0)
    batch_size: int | None = Field(None, gt=0)


class SiteConfig(_Strict):
    """What one hospital site controls: the whole site YAML (``site_configs/<site>.yaml``), read by its
    client, by ``site check`` and by ``audit-site``. Nothing in it is sent to the server::

        name: site-1
        bids_dir: /data/site-1             # or manifest: cohort.csv (relative paths: relative to this file)
        profile: cpu-demo
        cache_dir: /var/cache/synthbrain    # preprocessed volumes and code grids (never the data folder)
        min_subjects: 4
        privacy: {enabled: false, epsilon_budget: 8.0, ...}   # local DP-SGD (SitePrivacy)
        compute: {device: auto, gpus: [], num_threads: null, nproc: 1}   # SiteCompute
        training: {max_steps_per_round: null, batch_size: null}          # SiteTraining

    A client finds its YAML with :func:`find_site_config`.
    """

    name: str = "site"
    bids_dir: Path | None = None
    manifest: Path | None = None
    profile: str = "cpu-demo"
    columns: CohortColumns = CohortColumns()
    min_subjects: int = Field(4, ge=1, description="Fewest valid subjects a site needs to join.")
    max_invalid_fraction: float = Field(
        0.0, ge=0.0, le=1.0, description="Largest fraction of listed subjects that may fail `site check`."
    )
    cache_dir: Path | None = None
    label_derivative: str | None = Field(
        None, description="Name of the derivatives/<name> folder holding dseg maps; None = any."
    )
    derive_labels: bool = Field(
        True,
        description="Derive a brain mask and CSF/GM/WM labels on site (fl_app.data.anatomy, cached in cache_dir) "
        "for subjects without a label map; a provided label map always wins.",
    )
    privacy: SitePrivacy = SitePrivacy()
    compute: SiteCompute = SiteCompute()
    training: SiteTraining = SiteTraining()
    _path: Path | None = PrivateAttr(None)

    @field_validator("privacy", "compute", "training", mode="before")
    @classmethod
    def _empty_section(cls, v: Any) -> Any:
        return {} if v is None else v

    @property
    def path(self) -> Path | None:
        """The YAML this config was read from (None when built from a dict)."""
        return self._path


def _format_validation(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"{source}: {loc}: {msg}")
    return "\n".join(lines)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        with open(path) as fh:
            data = yaml.safe_load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def builtin_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def _profile_dict(name_or_path: str | Path, _seen: tuple[str, ...] = ()) -> dict[str, Any]:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        path = p
    else:
        path = PROFILE_DIR / f"{name_or_path}.yaml"
        if not path.exists():
            raise ConfigError(
                f"unknown profile {str(name_or_path)!r}; built-in profiles: {', '.join(builtin_profiles())}"
            )
    if str(path) in _seen:
        raise ConfigError(f"{path}: 'extends' forms a cycle")
    data = _read_yaml(path)
    name = data.get("name", path.stem)
    parent = data.pop("extends", None)
    if parent is not None:
        data = _deep_merge(_profile_dict(parent, (*_seen, str(path))), data)
    data["name"] = name
    return data


def load_profile(name_or_path: str | Path, overrides: dict[str, Any] | None = None) -> Profile:
    """Load a built-in profile by name, or a profile YAML by path, with optional overrides."""
    data = _profile_dict(name_or_path)
    if overrides:
        data = _deep_merge(data, overrides)
    return profile_from_dict(data, source=str(name_or_path))


def apply_overrides(
    data: dict[str, Any], overrides: dict[str, Any] | None, source: str = "profile"
) -> Profile:
    """A profile dict (e.g. a checkpoint's) with nested ``--set`` overrides merged in, validated."""
    return profile_from_dict(_deep_merge(data, overrides or {}), source=source)


def profile_from_dict(data: dict[str, Any], source: str = "profile") -> Profile:
    try:
        return Profile.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation(exc, source)) from None


def site_config_from_dict(data: dict[str, Any], base: Path | None = None, source: str = "site") -> SiteConfig:
    """Validate a site dict; relative paths (data, cache, ledger) are resolved against ``base``."""
    try:
        cfg = SiteConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation(exc, source)) from None
    if base is not None:
        for sec, key in ((cfg, "bids_dir"), (cfg, "manifest"), (cfg, "cache_dir"), (cfg.privacy, "ledger")):
            val = getattr(sec, key)
            if val is not None and not val.is_absolute():
                setattr(sec, key, (base / val).resolve())
    return cfg


def load_site_config(path: str | Path) -> SiteConfig:
    """Read a site YAML (see :class:`SiteConfig`); relative paths are resolved against the YAML's folder."""
    path = Path(path)
    cfg = site_config_from_dict(_read_yaml(path), base=path.parent, source=str(path))
    cfg._path = path
    return cfg


def write_site_yaml(path: str | Path, data: dict[str, Any]) -> Path:
    """Write a site YAML (validated first)."""
    path = Path(path)
    site_config_from_dict(data, base=path.parent, source=str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


ENV_SITE_CONFIG = "SYNTHBRAIN_SITE_CONFIG"


def find_site_config(
    site_name: str, site_config: str | None = None, site_config_dir: str | None = None
) -> Path:
    """Where a client's site YAML is: ``$SYNTHBRAIN_SITE_CONFIG`` (what hospital IT sets in the startup kit's
    environment), else ``site_config``, else ``<site_config_dir>/<site>.yaml`` (simulator and POC)."""
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


def parse_overrides(items: list[str] | None, sections: tuple[str, ...] | None = None) -> dict[str, Any]:
    """``--set`` values ``["vqvae.num_embeddings=512", ...]`` -> nested override dict (values parsed as YAML);
    ``sections``: the top-level keys that may be changed (None: any)."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        key, val = item.split("=", 1)
        node = out
        parts = key.split(".")
        if sections is not None and parts[0] not in sections:
            raise ValueError(f"--set may change {', '.join(s + '.*' for s in sections)} only: {key}")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        parsed = yaml.safe_load(val)
        if isinstance(parsed, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                parsed = float(parsed)
            except ValueError:
                pass
        node[parts[-1]] = parsed
    return out


def profile_leaf_keys() -> list[str]:
    """Every dotted profile key that ``--set`` can change (``vqvae.lr``, ``train.batch_size``, ...)."""
    keys = []
    for section, field in Profile.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys += [f"{section}.{k}" for k in ann.model_fields]
    return keys


def check_profile_key(key: str, source: str, sections: tuple[str, ...] | None = None) -> None:
    """Raise :class:`ConfigError` naming ``source`` and ``key`` unless ``key`` is a dotted profile key
    (``section.field``, see :func:`profile_leaf_keys`) in one of ``sections`` (None: any section)."""
    known = profile_leaf_keys()
    if key not in known:
        section = key.split(".", 1)[0]
        same = [k for k in known if k.startswith(section + ".")]
        hint = f"; keys of {section}: {', '.join(k.split('.', 1)[1] for k in same)}" if same else ""
        sections_all = sorted({k.split(".", 1)[0] for k in known})
        if not same:
            hint = f"; profile sections: {', '.join(sections_all)}"
        raise ConfigError(f"{source}: {key}: unknown profile key{hint}")
    if sections is not None and key.split(".", 1)[0] not in sections:
        raise ConfigError(
            f"{source}: {key}: only {', '.join(s + '.*' for s in sections)} keys may be changed here"
        )


def flatten_overrides(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested overlay ``{"vqvae": {"lr": 1e-3}}`` -> ``{"vqvae.lr": 1e-3}`` (dotted keys kept as they are)."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and "." not in str(k) and not prefix:
            out.update(flatten_overrides(v, key + "."))
        else:
            out[key] = v
    return out


def nest_overrides(flat: dict[str, Any]) -> dict[str, Any]:
    """``{"vqvae.lr": 1e-3}`` -> ``{"vqvae": {"lr": 1e-3}}`` (the form :func:`load_profile` merges)."""
    out: dict[str, Any] = {}
    for key, v in flat.items():
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = v
    return out


def read_set_file(path: str | Path, sections: tuple[str, ...] | None = None) -> dict[str, Any]:
    """A ``--set-file``: a YAML profile overlay (nested ``vqvae: {lr: 0.001}`` or dotted ``vqvae.lr: 0.001``
    keys, e.g. the ``best.yaml`` of ``synthbrain tune``) -> nested override dict. Every key is checked
    against the profile schema; an unknown one is an error naming the file and the key."""
    path = Path(path)
    flat = flatten_overrides(_read_yaml(path))
    for key in flat:
        check_profile_key(key, str(path), sections)
    return nest_overrides(flat)


def write_set_file(path: str | Path, values: dict[str, Any], comment: str = "") -> Path:
    """Write a ``--set-file`` overlay (nested YAML) for dotted ``values``; ``comment`` lines go on top."""
    path = Path(path)
    for key in values:
        check_profile_key(key, str(path))
    head = "".join(f"# {line}\n" for line in comment.splitlines())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(head + yaml.safe_dump(nest_overrides(values), sort_keys=False))
    return path


def add_set_args(p: Any, help: str = "profile override, e.g. train.lr=5e-4", dest: str = "set") -> None:
    """The profile-override options every command shares: ``--set KEY=VALUE`` (repeatable) and
    ``--set-file YAML`` (repeatable; a profile overlay such as a tune study's ``best.yaml``; ``--set``
    wins over it). Read them back with :func:`overrides_from_args`."""
    flag = "--" + dest.replace("_", "-")
    p.add_argument(flag, dest=dest, action="append", metavar="KEY=VALUE", help=help)
    p.add_argument(
        flag + "-file",
        dest=dest + "_file",
        action="append",
        metavar="YAML",
        help="profile overlay file (e.g. the best.yaml of `synthbrain tune`); applied before " + flag,
    )


def overrides_from_args(
    args: Any, sections: tuple[str, ...] | None = None, dest: str = "set", extra: list[str] | None = None
) -> dict[str, Any]:
    """The nested overrides of :func:`add_set_args`' options: each ``--set-file`` in order, then ``--set``
    (and ``extra`` KEY=VALUE items, e.g. a command's ``--lr`` sugar) on top."""
    out: dict[str, Any] = {}
    for f in getattr(args, dest + "_file", None) or []:
        out = _deep_merge(out, read_set_file(f, sections))
    return _deep_merge(out, parse_overrides([*(getattr(args, dest, None) or []), *(extra or [])], sections))


def profile_to_yaml(profile: Profile) -> str:
    return yaml.safe_dump(profile.model_dump(mode="json"), sort_keys=False)


ARCHITECTURE_KEYS: dict[str, tuple[str, ...]] = {
    "data": ("shape", "spacing", "lower_percentile", "upper_percentile", "brain_mask", "brain_mask_dilate_mm"),
    "vqvae": ("channels", "num_res_layers", "num_res_channels", "num_embeddings", "embedding_dim", "quantiser",
              "fsq_levels", "joint_labels", "codebook_normalize"),
    "prior": ("d_model", "n_layers", "n_heads", "attention", "ordering", "ordering_seed", "age_range",
              "age_frequencies", "mlp_ratio", "cond_every_position"),
}  # fmt: skip
"""The profile keys that fix a model's weights' meaning (grid, preprocessing, architecture): a checkpoint and
the job that starts from it must agree on all of them."""


def architecture_diff(
    a: Profile, b: Profile, sections: tuple[str, ...] = ("data", "vqvae", "prior")
) -> list[str]:
    """``["vqvae.channels: [24, 48] != [8, 16]", ...]``: the :data:`ARCHITECTURE_KEYS` where ``a`` and ``b``
    differ (empty: the same architecture)."""
    da, db = a.model_dump(mode="json"), b.model_dump(mode="json")
    out = []
    for sec in sections:
        for key in ARCHITECTURE_KEYS[sec]:
            if da[sec][key] != db[sec][key]:
                out.append(f"{sec}.{key}: {da[sec][key]} != {db[sec][key]}")
    return out

"""The global model directory of a federated run, its model card, and its MONAI bundle export.

``runs/<name>/global/``::

    vqvae.pt            global VQ-VAE (fl_app.models.vqvae.load_vqvae)
    prior.pt            global prior (fl_app.models.prior.load_prior), when the prior job has run
    profile.yaml        the resolved configuration (profile) both were trained with
    jobs.json           the job settings of each job (rounds, local steps, aggregation, ...)
    model_card.json     sites and subject counts, rounds, privacy parameters and ε, final metrics
    bundle/             MONAI bundle: configs/metadata.json, configs/inference.json, models/, docs/

Researchers load the bundle with MONAI's config machinery::

    from monai.bundle import ConfigParser
    parser = ConfigParser(); parser.read_config("bundle/configs/inference.json")
    parser["bundle_root"] = "bundle"
    vqvae, prior = parser.get_parsed_content("vqvae"), parser.get_parsed_content("prior")
    images = parser.get_parsed_content("generate")  # a small conditional cohort, (n, 1, X, Y, Z)
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fl_app import __version__
from fl_app.data.nifti import file_sha256
from fl_app.run_layout import JOBS, RunLayout

if TYPE_CHECKING:
    import torch

    from fl_app.config import Profile

__all__ = [
    "GlobalModel",
    "export_monai_bundle",
    "load_global_model",
    "model_card",
    "write_global_model",
]


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_clean(x) for x in v]
    return v


def _job_summary(ckpt: dict[str, Any], job: dict[str, Any] | None) -> dict[str, Any]:
    hist = ckpt.get("history", [])
    sites: dict[str, dict[str, Any]] = {}
    eps: dict[str, float] = {}
    for rec in hist:
        for site, m in rec.get("sites", {}).items():
            sites[site] = {
                "train_subjects": int(m.get("num_subjects", 0) or 0),
                "val_subjects": int(m.get("num_val_subjects", 0) or 0),
            }
            if m.get("epsilon") is not None and math.isfinite(float(m["epsilon"])):
                eps[site] = float(m["epsilon"])
    last = hist[-1] if hist else {}
    return {
        "rounds": int(ckpt["round"]) + 1,
        "sites": sites,
        "aggregation": last.get("aggregation", {}),
        "site_epsilon": eps or None,
        "final_metrics": last.get("metrics", {}),
        "metrics_by_round": [{"round": r["round"], **r.get("metrics", {})} for r in hist],
        "participation": [  # which sites were aggregated in which round, and which were missing
            {
                "round": r["round"],
                "sites": r.get("contributing_sites", sorted(r.get("sites", {}))),
                "missing_sites": r.get("missing_sites", []),
                "job_started_at_round": r.get("job_started_at_round", 0),
            }
            for r in hist
        ],
        "job": {k: v for k, v in (job or {}).items() if k not in ("profile",)},
        # where the job started (public checkpoint or scratch) and which parameters it trained
        "init": (job or {}).get("init") or "scratch",
        "trainable": (((job or {}).get("profile") or {}).get("finetune") or {}).get(
            (job or {}).get("kind", ""), ["all"]
        ),
    }


def model_card(run_dir: str | Path) -> dict[str, Any]:
    """The model card of a run (JSON-able) from its job checkpoints and settings."""
    from fl_app.fl.server import read_checkpoint

    run_dir = Path(run_dir)
    card: dict[str, Any] = {
        "name": f"synthbrain/{run_dir.name}",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "synthbrain_version": __version__,
        "framework": "NVIDIA FLARE (federated averaging); MONAI VQ-VAE + conditional transformer prior",
        "data_never_left_sites": True,
        "jobs": {},
    }
    for kind in ("vqvae", "prior"):
        ck = read_checkpoint(RunLayout(run_dir).job_dir(kind))
        if ck is None:
            continue
        jf = RunLayout(run_dir).job_settings(kind)
        job = json.loads(jf.read_text()) if jf.exists() else None
        card["jobs"][kind] = _job_summary(ck, job)
    sites: dict[str, Any] = {}
    for j in card["jobs"].values():
        for s, c in j["sites"].items():
            sites.setdefault(s, {}).update({"subjects": c["train_subjects"] + c["val_subjects"], **c})
    card["sites"] = sites
    card["num_subjects"] = sum(s["subjects"] for s in sites.values())
    dp_on = any(j.get("site_epsilon") for j in card["jobs"].values()) or any(
        j["aggregation"].get("name", "fedavg") != "fedavg" for j in card["jobs"].values()
    )
    card["privacy"] = {
        "differential_privacy": bool(dp_on),
        "site_epsilon": {k: j.get("site_epsilon") for k, j in card["jobs"].items()} if dp_on else None,
        "server_aggregation": {k: j["aggregation"] for k, j in card["jobs"].items()},
    }
    return _clean(card)


def write_global_model(run_dir: str | Path, bundle: bool = True) -> Path:
    """Assemble ``run_dir/global/`` from the jobs' checkpoints (and export the MONAI bundle)."""
    run = RunLayout(run_dir)
    gdir = run.global_dir
    gdir.mkdir(parents=True, exist_ok=True)
    found = False
    for kind in JOBS:
        src = run.global_file(kind)
        if src.exists():
            shutil.copy2(src, gdir / f"{kind}.pt")
            found = True
    if not found:
        raise FileNotFoundError(f"no global model under {run_dir / 'fl'}: run the vqvae job first")
    from fl_app.config import profile_to_yaml
    from fl_app.models.vqvae import load_vqvae

    _, prof = load_vqvae(gdir / "vqvae.pt")
    if (gdir / "prior.pt").exists():
        from fl_app.models.prior import load_prior

        _, prof = load_prior(gdir / "prior.pt")
    (gdir / "profile.yaml").write_text(profile_to_yaml(prof))
    jobs = {}
    for kind in ("vqvae", "prior"):
        jf = RunLayout(run_dir).job_settings(kind)
        if jf.exists():
            jobs[kind] = json.loads(jf.read_text())
    (gdir / "jobs.json").write_text(json.dumps(jobs, indent=2, default=str))
    (gdir / "model_card.json").write_text(json.dumps(model_card(run_dir), indent=2))
    if bundle and (gdir / "prior.pt").exists():
        export_monai_bundle(gdir, gdir / "bundle")
    return gdir


_INFERENCE = {
    "imports": [
        "$import torch",
        "$from fl_app.models.vqvae import load_vqvae",
        "$from fl_app.models.vqvae import decode",
        "$from fl_app.models.prior import load_prior",
        "$from fl_app.generate.sampler import sample",
    ],
    "bundle_root": ".",
    "device": "cpu",
    "vqvae": "$load_vqvae(@bundle_root + '/models/vqvae.pt', map_location=@device)[0]",
    "prior": "$load_prior(@bundle_root + '/models/prior.pt', map_location=@device)[0]",
    "network_def": "@vqvae",
    "num_samples": 2,
    "seed": 0,
    "condition": {
        "age": "$torch.tensor([70.0] * @num_samples)",
        "sex": "$torch.zeros(@num_samples, dtype=torch.long)",
        "diagnosis": "$torch.zeros(@num_samples, dtype=torch.long)",
    },
    "codes": "$sample(@prior, @num_samples, cond=@condition, seed=@seed, progress=False)",
    "decoded": "$decode(@vqvae, @codes)",
    "generate": "$@decoded[0].clamp(0, 1)",
    "labels": "$None if @decoded[1] is None else @decoded[1].argmax(1)",
}


def export_monai_bundle(global_dir: str | Path, out: str | Path) -> Path:
    """Write a MONAI bundle (``configs/metadata.json``, ``configs/inference.json``, ``models/``, ``docs/``)."""
    import monai
    import torch

    from fl_app.models.prior import load_prior

    global_dir, out = Path(global_dir), Path(out)
    (out / "configs").mkdir(parents=True, exist_ok=True)
    (out / "models").mkdir(parents=True, exist_ok=True)
    (out / "docs").mkdir(parents=True, exist_ok=True)
    for name in ("vqvae.pt", "prior.pt"):
        shutil.copy2(global_dir / name, out / "models" / name)
    prior, prof = load_prior(global_dir / "prior.pt")
    card = (
        json.loads((global_dir / "model_card.json").read_text())
        if (global_dir / "model_card.json").exists()
        else {}
    )
    shape = list(prof.data.shape)
    metadata = {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20220324.json",
        "version": __version__,
        "changelog": {__version__: "federated training with synthbrain"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": __import__("numpy").__version__,
        "required_packages_version": {
            "synthbrain": __version__,
            "nibabel": __import__("nibabel").__version__,
        },
        "name": "synthbrain federated brain MRI generator",
        "task": "Conditional generation of 3D T1-weighted brain MRI with tissue labels",
        "description": "3D VQ-VAE and conditional transformer prior over its codes, trained with federated "
        "averaging on NVIDIA FLARE across hospital sites; no image left any site.",
        "authors": "synthbrain consortium",
        "copyright": "synthbrain consortium",
        "data_source": f"{card.get('num_subjects', 'n/a')} subjects at {len(card.get('sites', {}))} sites (federated)",
        "data_type": "nifti",
        "intended_use": "Research: synthetic cohorts for method development; not for clinical use.",
        "network_data_format": {
            "inputs": {
                "condition": {
                    "type": "covariates",
                    "format": "age (years, float), sex (0=F, 1=M, 2=unknown), diagnosis (0=CN, 1=MCI, 2=AD, 3=unknown)",
                    "num_channels": 0,
                    "spatial_shape": [],
                    "dtype": "float32",
                    "value_range": [],
                    "is_patch_data": False,
                    "channel_def": {},
                }
            },
            "outputs": {
                "pred": {
                    "type": "image",
                    "format": "magnitude",
                    "num_channels": 1,
                    "spatial_shape": shape,
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_patch_data": False,
                    "channel_def": {"0": "T1w"},
                }
            },
        },
        "synthbrain": {
            "profile": prof.model_dump(mode="json"),
            "code_shape": list(prof.code_shape),
            "prior_parameters": sum(p.numel() for p in prior.parameters()),
            "model_card": card,
        },
    }
    (out / "configs" / "metadata.json").write_text(json.dumps(metadata, indent=2))
    (out / "configs" / "inference.json").write_text(json.dumps(_INFERENCE, indent=2))
    (out / "docs" / "README.md").write_text(
        "# synthbrain federated generator (MONAI bundle)\n\n"
        "```python\nfrom monai.bundle import ConfigParser\n"
        "p = ConfigParser(); p.read_config('configs/inference.json'); p['bundle_root'] = '.'\n"
        "images = p.get_parsed_content('generate')   # (n, 1, X, Y, Z) in [0, 1]\n```\n\n"
        "`vqvae` / `prior` give the two networks; `condition` sets age / sex / diagnosis.\n"
        "Needs the `synthbrain` package (fl_app) installed. See configs/metadata.json for the model card.\n"
    )
    return out


# ---------------------------------------------------------------------------------------------
# Reading it
# ---------------------------------------------------------------------------------------------


@dataclass
class GlobalModel:
    """The two networks of a (global or centralised) model and what the cohort records about them."""

    vqvae: torch.nn.Module
    prior: torch.nn.Module
    profile: Profile
    model_hash: str  # sha256 over vqvae.pt then prior.pt
    epsilon: dict[str, Any] | None  # per job and site, from model_card.json (None: no DP / unknown)
    paths: dict[str, str] = field(default_factory=dict)

    @property
    def max_epsilon(self) -> float | None:
        """The largest ε any site spent on any job (the guarantee a researcher can quote)."""
        vals: list[float] = []

        def walk(v: Any) -> None:
            if isinstance(v, dict):
                for x in v.values():
                    walk(x)
            elif isinstance(v, (int, float)) and math.isfinite(float(v)):
                vals.append(float(v))

        walk(self.epsilon)
        return max(vals) if vals else None


def load_global_model(
    model: str | Path | None = None,
    vqvae: str | Path | None = None,
    prior: str | Path | None = None,
    device: str | torch.device | None = None,
) -> GlobalModel:
    """Load the VQ-VAE and prior from a global model dir (``--model``) or explicit paths.

    ``model`` may be a federated run's ``global/`` directory or any directory holding ``vqvae.pt``
    and ``prior.pt``; ``vqvae``/``prior`` override either file (e.g. two centralised run dirs, given
    as directories or files). ε comes from ``model_card.json`` next to the prior, when present.
    """
    from fl_app.models.prior import load_prior
    from fl_app.models.vqvae import load_vqvae
    from fl_app.train.common import resolve_device

    def pick(explicit: str | Path | None, name: str) -> Path:
        if explicit is not None:
            p = Path(explicit)
            return p / name if p.is_dir() else p
        if model is None:
            raise ValueError(f"give --model DIR or --{name.split('.')[0]} PATH")
        return Path(model) / name

    vq_path, pr_path = pick(vqvae, "vqvae.pt"), pick(prior, "prior.pt")
    for p in (vq_path, pr_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no such model file")
    dev = resolve_device(str(device) if device is not None else None)
    vq, vq_prof = load_vqvae(vq_path, map_location=dev)
    pr, pr_prof = load_prior(pr_path, map_location=dev)
    if tuple(vq_prof.data.shape) != tuple(pr_prof.data.shape) or tuple(pr.code_shape) != tuple(
        vq_prof.code_shape
    ):
        raise ValueError(
            f"prior {pr_path} (code grid {tuple(pr.code_shape)}) does not match VQ-VAE {vq_path} "
            f"(code grid {tuple(vq_prof.code_shape)})"
        )
    if pr.num_codes != vq_prof.vqvae.num_embeddings:
        raise ValueError("prior vocabulary does not match the VQ-VAE codebook size")
    epsilon = None
    for d in {pr_path.parent, vq_path.parent}:
        card = d / "model_card.json"
        if card.is_file():
            priv = json.loads(card.read_text()).get("privacy") or {}
            epsilon = priv.get("site_epsilon") or epsilon
    for name, m in (("vqvae", vq), ("prior", pr)):
        extra = getattr(m, "checkpoint_extra", {}) or {}
        eps = extra.get("epsilon") or (extra.get("metrics") or {}).get("epsilon")
        if eps is not None and epsilon is None:
            epsilon = {name: {"local": float(eps)}}
    return GlobalModel(
        vqvae=vq,
        prior=pr,
        profile=vq_prof,
        model_hash=file_sha256(vq_path, pr_path),
        epsilon=epsilon,
        paths={"vqvae": str(vq_path.resolve()), "prior": str(pr_path.resolve())},
    )

"""``synthbrain`` command line.

synthbrain profiles                     list / show profiles
synthbrain simulate ...                 write simulated hospital sites (BIDS)
synthbrain site check --bids DIR ...    validate a site's data before it joins
synthbrain train-local vqvae|prior ...  centralised (non-federated) baselines
synthbrain pretrain ...                 the public pretrained checkpoint (central, simulated data)
synthbrain demo                         the end-to-end demo on simulated sites
synthbrain view PATH                    open a NIfTI file, BIDS subject or cohort in the offline viewer
synthbrain tune --job J --space S ...   hyper-parameter search over federated runs (Optuna)
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from fl_app import __version__
from fl_app.config import (
    ConfigError,
    SiteConfig,
    builtin_profiles,
    load_profile,
    load_site_config,
    profile_to_yaml,
)


def _cmd_profiles(args: argparse.Namespace) -> int:
    if args.name:
        print(profile_to_yaml(load_profile(args.name)), end="")
        return 0
    for name in builtin_profiles():
        p = load_profile(name)
        shape = "x".join(map(str, p.data.shape))
        codes = "x".join(map(str, p.code_shape))
        print(
            f"{name:10s} {shape} @ {p.data.spacing[0]:g} mm -> {codes} codes, K={p.vqvae.num_embeddings}  "
            f"{p.description}"
        )
    return 0


def _cmd_site_check(args: argparse.Namespace) -> int:
    from fl_app.data.cohort import CohortError, read_bids, read_manifest
    from fl_app.data.validate import check_site

    cfg = load_site_config(args.config) if args.config else SiteConfig()
    if args.bids:
        cfg.bids_dir = Path(args.bids)
    if args.manifest:
        cfg.manifest = Path(args.manifest)
    if args.min_subjects is not None:
        cfg.min_subjects = args.min_subjects
    profile = load_profile(args.profile or cfg.profile)
    try:
        if cfg.bids_dir is not None:
            cohort = read_bids(cfg.bids_dir, cfg)
        elif cfg.manifest is not None:
            cohort = read_manifest(cfg.manifest, cfg)
        else:
            print("error: give --bids DIR, --manifest CSV, or a --config naming one", file=sys.stderr)
            return 2
    except CohortError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    from fl_app.data.dataset import default_cache_dir

    derive = cfg.derive_labels and not args.no_derive
    report = check_site(
        cohort,
        profile,
        min_subjects=cfg.min_subjects,
        max_invalid_fraction=cfg.max_invalid_fraction,
        progress=not args.quiet and sys.stderr.isatty(),
        anatomy_cache_dir=(cfg.cache_dir or default_cache_dir()) if derive else None,
    )
    print(report.format_table())
    if args.json:
        report.write_json(args.json)
        print(f"JSON report written to {args.json}")
    if args.qc:
        from fl_app.data.anatomy_qc import write_site_qc

        page = write_site_qc(report, args.qc, progress=not args.quiet and sys.stderr.isatty())
        print(f"QC overlays and page written to {page}")
    return 0 if report.ok else 1


def _add_site_parser(sub: argparse._SubParsersAction) -> None:
    site = sub.add_parser("site", help="hospital-site tools (data check)")
    site_sub = site.add_subparsers(dest="site_command", required=True)
    chk = site_sub.add_parser(
        "check",
        help="validate every subject of a site's data; exit 0 if the site can join",
        description="Reads every image and label map (read-only), checks covariates, geometry and labels, prints "
        "a table of every problem and exits 0 when the site can join, 1 otherwise. Subjects without a tissue "
        "label map get one derived on site (bias correction, brain extraction, tissue segmentation; cached in "
        "the site's cache). Nothing is sent anywhere.",
    )
    chk.add_argument("--bids", help="BIDS folder of the site")
    chk.add_argument("--manifest", help="CSV manifest (path, age, sex, diagnosis[, label_path])")
    chk.add_argument("--config", help="site YAML (data location, column names, minimum subjects)")
    chk.add_argument("--profile", help="profile name or YAML (default: the site config's, else cpu-demo)")
    chk.add_argument("--min-subjects", type=int, help="override the minimum number of valid subjects")
    chk.add_argument("--json", help="also write the report as JSON here")
    chk.add_argument(
        "--qc", help="write QC overlay PNGs and an offline HTML page (site_check.html) into this folder"
    )
    chk.add_argument(
        "--no-derive",
        action="store_true",
        help="do not derive brain masks / tissue labels for subjects without a label map (site YAML: "
        "derive_labels: false)",
    )
    chk.add_argument("--quiet", action="store_true", help="no progress bar")
    chk.set_defaults(func=_cmd_site_check)


# Each top-level command: (module, function adding its sub-parser, its line in ``synthbrain --help``). Each module
# owns its command; only the module of the command being run is imported (heavy imports -- torch, MONAI,
# NVFlare -- stay out of ``synthbrain --help``), the others are listed by name and help line.
COMMAND_MODULES: dict[str, tuple[str, str, str]] = {
    "demo": (
        "fl_app.demo",
        "add_demo_parser",
        "end-to-end demo: 3 simulated sites → federated VQ-VAE → federated prior → synthetic cohort",
    ),
    "simulate": (
        "fl_app.data.simulate",
        "add_simulate_parser",
        "write simulated hospital sites (BIDS, T1w + tissue labels) from the MNI152 template",
    ),
    "fl": ("fl_app.fl.run", "add_fl_parser", "federated jobs on NVFlare (simulator, POC, production)"),
    "sample": (
        "fl_app.generate.sample_cohort",
        "add_sample_parser",
        "sample a synthetic cohort (BIDS derivative: T1w + tissue labels) from a global model",
    ),
    "evaluate": (
        "fl_app.evaluate.fidelity",
        "add_evaluate_parser",
        "conditioning fidelity, realism/diversity and memorisation audit of a synthetic cohort",
    ),
    "audit-site": (
        "fl_app.evaluate.audit",
        "add_audit_parser",
        "memorisation audit at a site: nearest-training distances of a synthetic cohort (aggregates only)",
    ),
    "privacy": ("fl_app.privacy.report", "add_privacy_parser", "differential-privacy accounting of a run"),
    "pretrain": (
        "fl_app.pretrain",
        "add_pretrain_parser",
        "train the public checkpoint (VQ-VAE, then prior) centrally on simulated or public data",
    ),
    "tune": (
        "fl_app.tune",
        "add_tune_parser",
        "hyper-parameter search over federated runs (Optuna): pruned trials, best.yaml, HTML report",
    ),
    "view": (
        "fl_app.view",
        "add_view_parser",
        "open a NIfTI file, BIDS subject or cohort in the offline 3D viewer",
    ),
}
TRAIN_LOCAL_MODULES: list[tuple[str, str]] = [
    ("fl_app.train.vqvae_local", "add_train_local_vqvae_parser"),
    ("fl_app.train.prior_local", "add_train_local_prior_parser"),
]
TRAIN_LOCAL_HELP = "centralised (non-federated) training on pooled BIDS folders: the baseline"


def _load(module: str, func: str) -> Callable[[argparse._SubParsersAction], object]:
    import importlib

    return getattr(importlib.import_module(module), func)


def _add_train_local_parser(sub: argparse._SubParsersAction) -> None:
    tl = sub.add_parser(
        "train-local",
        help=TRAIN_LOCAL_HELP,
        description="Train a model centrally with the same local training function the federated clients use.",
    )
    tl_sub = tl.add_subparsers(dest="model", required=True, metavar="MODEL")
    for module, func in TRAIN_LOCAL_MODULES:
        _load(module, func)(tl_sub)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``synthbrain`` parser; with ``command``, only that command's module is imported (the other
    commands are listed, not parsed)."""
    parser = argparse.ArgumentParser(
        prog="synthbrain",
        description="Federated generative modelling of 3D brain MRI (VQ-VAE + transformer prior on NVFlare).",
    )
    parser.add_argument("--version", action="version", version=f"synthbrain {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    prof = sub.add_parser("profiles", help="list built-in profiles, or print one as YAML")
    prof.add_argument("name", nargs="?")
    prof.set_defaults(func=_cmd_profiles)
    for name, (module, func, help_line) in COMMAND_MODULES.items():
        if command in (None, name):
            _load(module, func)(sub)
        else:
            sub.add_parser(name, help=help_line)
    _add_site_parser(sub)
    if command in (None, "train-local"):
        _add_train_local_parser(sub)
    else:
        sub.add_parser("train-local", help=TRAIN_LOCAL_HELP)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), "")  # "": list the commands only
    args = build_parser(command).parse_args(argv)
    args.command_line = argv  # recorded by commands that make models (pretrain's model card)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"configuration error:\n{exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

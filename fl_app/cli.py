"""``synthbrain`` command line.

synthbrain profiles                     list / show profiles
synthbrain simulate ...                 write simulated hospital sites (BIDS)
synthbrain site check --bids DIR ...    validate a site's data before it joins
synthbrain train-local vqvae|prior ...  centralised (non-federated) baselines
synthbrain pretrain ...                 the public pretrained checkpoint (central, simulated data)
synthbrain demo                         the end-to-end demo on simulated sites
synthbrain view PATH                    open a NIfTI file, BIDS subject or cohort in the offline viewer
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


# (module, function) adding each top-level command's sub-parser; each module owns its command, and heavy
# imports (torch, MONAI, NVFlare) stay inside the command functions.
COMMAND_MODULES: list[tuple[str, str]] = [
    ("fl_app.demo", "add_demo_parser"),
    ("fl_app.data.simulate", "add_simulate_parser"),
    ("fl_app.fl.run", "add_fl_parser"),
    ("fl_app.generate.cohort", "add_sample_parser"),
    ("fl_app.evaluate.fidelity", "add_evaluate_parser"),
    ("fl_app.evaluate.audit", "add_audit_parser"),
    ("fl_app.privacy.report", "add_privacy_parser"),
    ("fl_app.pretrain", "add_pretrain_parser"),
    ("fl_app.viewer.page", "add_view_parser"),
]
TRAIN_LOCAL_MODULES: list[tuple[str, str]] = [
    ("fl_app.train.vqvae_local", "add_train_local_vqvae_parser"),
    ("fl_app.train.prior_local", "add_train_local_prior_parser"),
]


def _load(entries: list[tuple[str, str]]) -> list[Callable[[argparse._SubParsersAction], object]]:
    import importlib

    return [getattr(importlib.import_module(module), func) for module, func in entries]


def _add_train_local_parser(sub: argparse._SubParsersAction) -> None:
    tl = sub.add_parser(
        "train-local",
        help="centralised (non-federated) training on pooled BIDS folders: the baseline",
        description="Train a model centrally with the same local training function the federated clients use.",
    )
    tl_sub = tl.add_subparsers(dest="model", required=True, metavar="MODEL")
    for add in _load(TRAIN_LOCAL_MODULES):
        add(tl_sub)


def build_parser() -> argparse.ArgumentParser:
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
    for add in _load(COMMAND_MODULES):
        add(sub)
    _add_site_parser(sub)
    _add_train_local_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.command_line = list(sys.argv[1:] if argv is None else argv)  # recorded by commands that make models
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

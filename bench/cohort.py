"""Benchmark: a synthetic cohort from a trained model — conditioning fidelity, diversity, audit, speed.

Given a demo run (``synthbrain demo --out RUN``: ``RUN/global`` + simulated sites ``RUN/data/site-*``)
or ``--model``/``--reference`` explicitly, it

1. samples ``--n`` subjects with covariates spread like the sites (ages uniform 50–85, sexes
   alternating, CN/MCI/AD in turn) through :func:`fl_app.generate.sample_cohort.sample_cohort` (timed:
   sampling throughput in volumes/s, includes decoding and writing NIfTI);
2. evaluates them against the sites (:func:`fl_app.evaluate.fidelity.evaluate`, generating law as
   the target since the sites are simulated);
3. runs the federated memorisation audit against each site that trained the model (``--audit-sites``,
   default the run's own sites; :func:`fl_app.evaluate.audit.site_audit`): held-out references cannot
   have been memorised; with its two controls: the held-out references audited the same way (none of them
   can be a copy: ``audit_flagged_reference``) and the VQ-VAE's reconstructions of the training subjects (the
   worst-case copy: ``audit_positive_control_flagged_fraction`` should be 1).

Each law-scored target has a ``*_reference`` twin: the real reference subjects' own error against the law
with the same estimator (the floor a perfect generator would reach on this many subjects).

Prints one JSON document (``--json OUT`` also writes it) with the issue's targets::

    btf_slope_error_pct_vs_law             ≤ 30 (goal 20)
    btf_intensity_slope_error_pct_vs_law   ≤ 30 (the slope from intensities alone)
    btf_ad_minus_cn_error_pct_vs_law       ≤ 30 (AD − CN brain-tissue fraction at 75)
    icv_ratio_error_vs_law                 ≤ 0.05 (male / female intracranial volume, law ≈ 1.11)
    ms_ssim_gap                            ≤ 0.1 (|synthetic − real-vs-real|)
    audit_flagged                          = 0
    volumes_per_s                (CPU)

Run ``python bench/cohort.py --run runs/demo --json bench_cohort.json`` after ``synthbrain demo``.
``--run`` without an existing run trains one first with ``synthbrain demo`` (``--tiny`` for a
smoke run). Do not read timings from a busy machine.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch


def _audit_controls(gm, audit_sites: list[Path], refs: list[Path], ref, cache: Path) -> dict[str, Any]:
    """The audit's two controls, run exactly as the cohort's audit:

    * negative: the real reference subjects, which never trained the model, against the audit sites
      (``audit_flagged_reference`` of ``audit_n_reference``; null when a reference site is an audit site);
    * positive: the VQ-VAE's reconstruction of every training subject of every audit site against its own site —
      what a prior that replays a training code sequence decodes to, the worst case of memorisation
      (``audit_positive_control_flagged_fraction``, should be 1).
    """
    import numpy as np

    from fl_app.data.cohort import read_bids
    from fl_app.data.dataset import SiteDataset
    from fl_app.evaluate.audit import combine_site_audits, site_audit_arrays
    from fl_app.models.vqvae import decode, encode

    disjoint = not {p.resolve() for p in refs} & {p.resolve() for p in audit_sites}
    neg, pos_flagged, pos_n = [], 0, 0
    for site in audit_sites:
        ds = SiteDataset(read_bids(site).valid(), gm.profile, cache / site.name)
        items = [ds[i] for i in range(len(ds))]
        training = [it["image"][0].numpy() for it in items]
        if disjoint:
            neg.append(site_audit_arrays(list(ref.images), list(ref.ids), training, site.name))
        with_labels = [it for it in items if bool(it["has_label"])]
        if with_labels:
            img = torch.stack([it["image"] for it in with_labels]).float()
            lab = torch.stack([it["label"] for it in with_labels]).long()
            with torch.no_grad():
                rec = decode(gm.vqvae, encode(gm.vqvae, img, lab))[0][:, 0]  # labels: ignored unless joint
            r = site_audit_arrays(list(rec.numpy().astype(np.float32)), [f"r{i}" for i in range(len(rec))],
                                  training, site.name)  # fmt: skip
            pos_flagged, pos_n = pos_flagged + len(r["flagged"]), pos_n + len(rec)
    return {
        "audit_flagged_reference": combine_site_audits(neg)["n_flagged"] if disjoint else None,
        "audit_n_reference": len(ref) if disjoint else None,
        "audit_positive_control_flagged_fraction": pos_flagged / pos_n if pos_n else None,
    }


def main(argv: list[str] | None = None) -> int:
    from fl_app.generate.sample_cohort import guidance_arg

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/demo", help="demo run dir (global/ + data/site-*)")
    ap.add_argument("--model", help="global model dir (default RUN/global)")
    ap.add_argument("--reference", nargs="+", help="reference BIDS sites (default RUN/data/site-*)")
    ap.add_argument("--tiny", action="store_true", help="if RUN must be trained: synthbrain demo --tiny")
    ap.add_argument("--n", type=int, default=24, help="synthetic subjects")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument(
        "--guidance",
        type=guidance_arg,
        default=1.0,
        help="classifier-free guidance weight (1 = none), or one per covariate: age=3,sex=5,diagnosis=5",
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--pairs", type=int, default=30)
    ap.add_argument("--work", default=None, help="scratch dir (default RUN/bench_cohort)")
    ap.add_argument(
        "--audit-sites",
        nargs="+",
        help="the sites whose subjects trained the model, for the memorisation audit (default RUN/data/site-* "
        "when they exist, else the reference sites)",
    )
    ap.add_argument(
        "--reuse-cohort",
        action="store_true",
        help="evaluate and audit the cohort an earlier run left in WORK/cohort instead of sampling again "
        "(sampling keys are then null)",
    )
    ap.add_argument("--json", help="also write the result here")
    args = ap.parse_args(argv)

    from fl_app.data.covariates import DIAGNOSES, SEXES
    from fl_app.evaluate.audit import combine_site_audits, site_audit
    from fl_app.evaluate.fidelity import evaluate, load_cohort_subjects, load_reference_subjects
    from fl_app.generate.cohort_folder import CohortRow
    from fl_app.generate.sample_cohort import sample_cohort
    from fl_app.global_model import load_global_model

    run = Path(args.run)
    model = Path(args.model) if args.model else run / "global"
    train_s = None
    if not (model / "prior.pt").is_file():
        from fl_app.demo import add_demo_parser

        p = argparse.ArgumentParser()
        add_demo_parser(p.add_subparsers())
        dargs = p.parse_args(["demo", "--out", str(run), *(["--tiny"] if args.tiny else [])])
        t = time.perf_counter()
        dargs.func(dargs)
        train_s = time.perf_counter() - t
        model = run / "global"
    refs = [Path(r) for r in args.reference] if args.reference else sorted((run / "data").glob("site-*"))
    if not refs:
        print("error: no reference sites (give --reference)", file=sys.stderr)
        return 2
    # memorisation is judged against the subjects the model was trained on, not against held-out references
    audit_sites = (
        [Path(r) for r in args.audit_sites] if args.audit_sites else sorted((run / "data").glob("site-*"))
    )
    audit_sites = audit_sites or refs
    work = Path(args.work) if args.work else run / "bench_cohort"
    cohort = work / "cohort"
    if args.reuse_cohort and not (cohort / "participants.tsv").is_file():
        print(f"error: --reuse-cohort: no cohort in {cohort}", file=sys.stderr)
        return 2
    if not args.reuse_cohort:
        shutil.rmtree(work, ignore_errors=True)

    gm = load_global_model(model, device=args.device)
    n = args.n
    ages = torch.linspace(50.0, 85.0, n).tolist() if n > 1 else [70.0]
    import numpy as np

    perm = np.random.default_rng(args.seed).permutation(n)
    rows = [
        CohortRow(f"sub-synth{i + 1:04d}", round(ages[int(perm[i])], 1), SEXES[i % 2], DIAGNOSES[i % 3])
        for i in range(n)
    ]
    if args.reuse_cohort:
        res = {"device": args.device, "volumes_per_s": None, "seconds": None}
    else:
        res = sample_cohort(gm, rows, cohort, seed=args.seed, chunk_size=args.batch_size, progress=False,
                            device=args.device, temperature=args.temperature, guidance=args.guidance)  # fmt: skip

    t = time.perf_counter()
    synth = load_cohort_subjects(cohort)
    ref = load_reference_subjects(refs, gm.profile, work / "cache")
    ev = evaluate(synth, ref, simulated=True, n_pairs=args.pairs, seed=args.seed)
    eval_s = time.perf_counter() - t
    t = time.perf_counter()
    audits = [site_audit(cohort, r, gm.profile, 0.05, work / "cache") for r in audit_sites]
    audit = combine_site_audits(audits)
    audit_s = time.perf_counter() - t
    controls = _audit_controls(gm, audit_sites, refs, ref, work / "cache")

    s = ev["summary"]
    slope_err = s.get("btf_slope_error_pct_vs_law", math.nan)
    out = {
        "profile": gm.profile.name,
        "grid": list(gm.profile.data.shape),
        "model": str(model),
        "model_sha256": gm.model_hash,
        "reference_sites": [str(r) for r in refs],
        "audit_sites": [str(r) for r in audit_sites],
        "n_synthetic": n,
        "n_reference": len(ref),
        "device": res["device"],
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "volumes_per_s": res["volumes_per_s"],
        "sample_seconds": res["seconds"],
        "evaluate_seconds": eval_s,
        "audit_seconds": audit_s,
        "train_seconds": train_s,
        "temperature": args.temperature,
        "guidance": args.guidance,
        **{k: v for k, v in s.items() if k not in ("n_synthetic", "n_reference")},
        "audit_flagged": audit["n_flagged"],
        "audit_min_distance_over_threshold": audit["min_distance_over_threshold"],
        "audit_within_threshold_per_site": [a["n_within_threshold"] for a in audits],
        **controls,
        "targets": {
            "btf_slope_error_pct_vs_law<=30": bool(slope_err <= 30.0),
            "btf_slope_error_pct_vs_law<=20 (goal)": bool(slope_err <= 20.0),
            "ms_ssim_gap<=0.1": bool(s.get("ms_ssim_gap", math.inf) <= 0.1),
            "audit_flagged==0": audit["n_flagged"] == 0,
            "btf_intensity_slope_error_pct_vs_law<=30": bool(
                s.get("btf_intensity_slope_error_pct_vs_law", math.inf) <= 30.0
            ),
            "btf_ad_minus_cn_error_pct_vs_law<=30": bool(
                s.get("btf_ad_minus_cn_error_pct_vs_law", math.inf) <= 30.0
            ),
            "icv_ratio_error_vs_law<=0.05": bool(s.get("icv_ratio_error_vs_law", math.inf) <= 0.05),
        },
    }
    out = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in out.items()}
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

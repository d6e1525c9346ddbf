"""Benchmark: the site-side anatomy stage (fl_app.data.anatomy) for sites without label maps.

For each profile (cpu-demo, full-1mm) it simulates full-head sites across every simulator preset
(orientations, data types, anisotropic voxels, bias, neck; ``fl_app.data.simulate``), hides their truth
label maps and, per subject, in a fresh process (torch on ``--threads`` threads):

1. derives the brain mask and CSF / GM / WM labels (deepbet + N4 + partial-volume-aware tissue labels) into an empty cache
   and preprocesses the subject to the profile grid with them, as ``site check`` + a client's dataset do;
   records the seconds of each step and the process's peak resident memory;
2. compares, at the profile resolution (both label maps resampled onto the profile grid exactly as
   training reads them), the derived labels with the simulator's truth: Dice of the brain mask
   (label > 0) and of CSF, GM and WM; brain tissue fraction (GM + WM) / (CSF + GM + WM), derived vs truth
   (Pearson r and mean absolute error over subjects).

Prints one JSON document (``--json OUT`` also writes it). Timings are of whatever machine runs it; on a
busy one read ``cpu_s`` (CPU seconds of the subject's process, all threads): on an idle machine with
``--threads`` cores the wall time lies between ``cpu_s / threads`` and ``cpu_s``
(``site_of_200_hours_idle_estimate``).

    python bench/preprocess.py --subjects 10 --full-subjects 1 --json bench_preprocess.json
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _subject(image: str, truth: str, profile: str, cache: str, threads: int) -> dict:
    """Run in a fresh process: derive + preprocess one subject; timings, peak memory and accuracy."""
    import resource
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(threads)
    from fl_app.config import load_profile
    from fl_app.data.anatomy import AnatomyCache, _brain_extractor
    from fl_app.data.preprocess import PreprocessCache, preprocess_subject

    cfg = load_profile(profile).data
    t0 = time.perf_counter()
    _brain_extractor()  # network load, once per process (once per site in practice)
    t_load = time.perf_counter() - t0

    def cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    c0 = cpu()
    t0 = time.perf_counter()
    d = AnatomyCache(cache).get(image)
    t_derive = time.perf_counter() - t0
    out: dict = {"image": Path(image).name, "model_load_s": round(t_load, 2), "derive_s": round(t_derive, 2)}
    out["steps_s"] = {k: round(v, 2) for k, v in d.seconds.items()}
    out["problems"] = [str(p) for p in d.problems]
    if d.label is None:
        out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return out
    t0 = time.perf_counter()
    pre = PreprocessCache(Path(cache) / "pre", cfg).get(image, d.label)
    out["prepare_s"] = round(time.perf_counter() - t0, 2)
    out["total_s"] = round(t_derive + out["prepare_s"], 2)
    out["cpu_s"] = round(
        cpu() - c0, 2
    )  # CPU seconds (all threads): wall time on an idle machine is >= cpu_s / threads
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    truth_lab = preprocess_subject(image, truth, cfg).label
    der = pre.label
    assert der is not None and truth_lab is not None

    def dice(a: np.ndarray, b: np.ndarray) -> float:
        return float(2 * (a & b).sum() / max(int(a.sum() + b.sum()), 1))

    out["dice"] = {
        "brain": dice(der > 0, truth_lab > 0),
        **{t: dice(der == k, truth_lab == k) for k, t in ((1, "CSF"), (2, "GM"), (3, "WM"))},
    }

    def btf(lab: np.ndarray) -> float:
        return float((lab >= 2).sum() / max(int((lab > 0).sum()), 1))

    out["btf"] = {"derived": btf(der), "truth": btf(truth_lab)}
    return out


def run_profile(
    profile: str, n_sites: int, per_site: int, seed: int, threads: int, work: Path, one_process: bool = False
) -> dict:
    from fl_app.config import load_profile
    from fl_app.data.simulate import simulate_sites

    t0 = time.perf_counter()
    sites = simulate_sites(work / profile / "data", n_sites, per_site, load_profile(profile), seed)
    sim_s = time.perf_counter() - t0
    jobs = []
    for site in sites:
        for img in sorted(site.glob("sub-*/anat/*_T1w.nii.gz")):
            sub = img.name.split("_")[0]
            truth = site / "derivatives" / "labels" / sub / "anat" / f"{sub}_dseg.nii.gz"
            jobs.append((site.name, str(img), str(truth)))
    rows = []
    ctx = mp.get_context("spawn")
    shared = cf.ProcessPoolExecutor(1, mp_context=ctx) if one_process else None
    try:
        for site_name, img, truth in jobs:
            cache = work / profile / "cache" / Path(img).name.split("_")[0]
            if shared is not None:
                r = shared.submit(_subject, img, truth, profile, str(cache), threads).result()
            else:
                with cf.ProcessPoolExecutor(1, mp_context=ctx) as ex:
                    r = ex.submit(_subject, img, truth, profile, str(cache), threads).result()
            r["site"] = site_name
            rows.append(r)
            print(json.dumps(r), file=sys.stderr, flush=True)
    finally:
        if shared is not None:
            shared.shutdown()
    ok = [r for r in rows if "dice" in r]
    summary: dict = {"n_subjects": len(rows), "n_failed": len(rows) - len(ok), "simulate_s": round(sim_s, 1)}
    if ok:
        tot = [r["total_s"] for r in ok]
        summary["seconds_per_subject"] = {
            "mean": round(statistics.mean(tot), 2),
            "median": round(statistics.median(tot), 2),
            "max": round(max(tot), 2),
        }
        cpu_s = [r["cpu_s"] for r in ok]
        summary["cpu_seconds_per_subject"] = {
            "mean": round(statistics.mean(cpu_s), 2),
            "max": round(max(cpu_s), 2),
        }
        summary["site_of_200_hours_idle_estimate"] = [
            round(200 * statistics.mean(cpu_s) / threads / 3600, 2),
            round(200 * statistics.mean(cpu_s) / 3600, 2),
        ]
        summary["model_load_s"] = round(statistics.mean(r["model_load_s"] for r in ok), 2)
        summary["peak_rss_mb_max"] = max(r["peak_rss_mb"] for r in ok)
        summary["site_of_200_hours"] = round(200 * statistics.mean(tot) / 3600, 2)
        d = {k: [r["dice"][k] for r in ok] for k in ("brain", "CSF", "GM", "WM")}
        summary["dice_mean"] = {k: round(statistics.mean(v), 4) for k, v in d.items()}
        summary["dice_min"] = {k: round(min(v), 4) for k, v in d.items()}
        summary["dice_tissue_mean"] = round(
            statistics.mean(statistics.mean(d[k]) for k in ("CSF", "GM", "WM")), 4
        )
        bd = np.array([r["btf"]["derived"] for r in ok])
        bt = np.array([r["btf"]["truth"] for r in ok])
        summary["btf_r"] = round(float(np.corrcoef(bd, bt)[0, 1]), 4) if len(ok) > 2 else None
        summary["btf_mae"] = round(float(np.abs(bd - bt).mean()), 4)
        summary["btf_bias"] = round(float((bd - bt).mean()), 4)
        # error vs truth: > 0 where atrophied brains (low BTF) are over-estimated and young ones under-
        summary["btf_error_slope_vs_truth"] = (
            round(float(-np.polyfit(bt, bd - bt, 1)[0]), 4) if len(ok) > 2 else None
        )
        summary["btf_abs_error_max"] = round(float(np.abs(bd - bt).max()), 4)
        per_site: dict = {}
        for r in ok:
            per_site.setdefault(r["site"], []).append(r)
        summary["per_site"] = {
            s: {
                "n": len(v),
                "seconds_mean": round(statistics.mean(x["total_s"] for x in v), 2),
                "dice_brain": round(statistics.mean(x["dice"]["brain"] for x in v), 4),
                "dice_tissue": round(
                    statistics.mean(statistics.mean(x["dice"][k] for k in ("CSF", "GM", "WM")) for x in v), 4
                ),
                "btf_mae": round(statistics.mean(abs(x["btf"]["derived"] - x["btf"]["truth"]) for x in v), 4),
            }
            for s, v in per_site.items()
        }
    return {"summary": summary, "subjects": rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sites", type=int, default=4, help="simulated sites (presets cycle every 4)")
    ap.add_argument("--subjects", type=int, default=5, help="subjects per site at cpu-demo (0: skip)")
    ap.add_argument("--full-subjects", type=int, default=1, help="subjects per site at full-1mm (0: skip)")
    ap.add_argument("--full-sites", type=int, default=4, help="simulated sites at full-1mm")
    ap.add_argument("--seed", type=int, default=20261201)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--one-process",
        action="store_true",
        help="all subjects of a profile in one worker process, as site check runs a site (network loaded once; "
        "peak memory is then the worker's over all its subjects)",
    )
    ap.add_argument("--json", help="also write the result here")
    args = ap.parse_args(argv)
    import deepbet
    import SimpleITK
    import sklearn

    from fl_app.data.anatomy import ANATOMY_VERSION

    result: dict = {
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "threads": args.threads,
            "one_process": args.one_process,
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        },
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "anatomy_version": ANATOMY_VERSION,
        "libraries": {
            "deepbet": getattr(deepbet, "__version__", "1.0.2"),
            "SimpleITK": SimpleITK.Version_VersionString(),
            "scikit-learn": sklearn.__version__,
        },
        "profiles": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        runs = [("cpu-demo", args.sites, args.subjects)] if args.subjects else []
        runs += [("full-1mm", args.full_sites, args.full_subjects)] if args.full_subjects else []
        for profile, n_sites, n in runs:
            result["profiles"][profile] = run_profile(
                profile, n_sites, n, args.seed, args.threads, Path(tmp), args.one_process
            )
    result["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

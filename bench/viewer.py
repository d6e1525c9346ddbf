"""Benchmark: is the cohort report (``qc/report.html`` with the NiiVue viewer) usable at 200 subjects?

Writes a cohort of ``--n`` head-like subjects on the cpu-demo grid (64³ at 3 mm; T1w from nilearn's
offline MNI152 template plus noise, tissue labels from its GM/WM maps, each subject a little
different), then

1. times ``write_qc`` (montages + viewer data) and the viewer page alone (montages already there);
2. measures the report on disk: the page, the shipped NiiVue, the per-subject data scripts, the montages;
3. opens the report from ``file://`` in headless Chromium (software WebGL) and times the first subject
   drawn (navigation to the viewer's ``ready``), and switching to other subjects (their data script
   loaded on demand), checking there are no console errors and no network request;
4. writes one full-1mm subject's data script (160×224×160) for its size.

Prints one JSON document (``--json OUT`` also writes it). Needs Chromium (``apt-get install
chromium``); ``--no-browser`` skips step 3. Timings are of whatever machine runs it: do not read them
from a busy one.

    python bench/viewer.py --n 200 --json bench_viewer.json
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _head(shape: tuple[int, int, int], spacing: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MNI152 T1 in [0, 1] and labels (1 CSF, 2 GM, 3 WM) resampled to ``shape`` at ``spacing`` mm."""
    from nilearn import datasets, image

    target = np.diag([spacing, spacing, spacing, 1.0])
    target[:3, 3] = -np.array(shape) * spacing / 2 + [0, -18, 18]
    kw = {"target_affine": target, "target_shape": shape}
    t1 = image.resample_img(datasets.load_mni152_template(resolution=2), interpolation="linear", **kw)
    gm = image.resample_img(datasets.load_mni152_gm_template(resolution=2), interpolation="linear", **kw)
    wm = image.resample_img(datasets.load_mni152_wm_template(resolution=2), interpolation="linear", **kw)
    mask = image.resample_img(datasets.load_mni152_brain_mask(resolution=2), interpolation="nearest", **kw)
    img = np.asarray(t1.get_fdata(), np.float32)
    img /= float(img.max()) or 1.0
    lab = np.zeros(shape, np.uint8)
    m = np.asarray(mask.get_fdata()) > 0
    lab[m] = 1
    lab[m & (np.asarray(gm.get_fdata()) > 0.5)] = 2
    lab[m & (np.asarray(wm.get_fdata()) > 0.5)] = 3
    img[~m] = 0.0  # brain-extracted, as the cpu-demo profile's synthetic subjects are
    return img, lab, target


def _write_cohort(out: Path, n: int) -> None:
    from fl_app.config import load_profile
    from fl_app.data.covariates import DIAGNOSES, SEXES
    from fl_app.generate.cohort_folder import (
        CohortRow,
        write_dataset_files,
        write_participants,
        write_subject,
    )

    prof = load_profile("cpu-demo")
    img, lab, aff = _head(tuple(prof.data.shape), float(prof.data.spacing[0]))  # type: ignore[arg-type]

    class _GM:
        model_hash, epsilon, profile, max_epsilon = "00" * 32, None, prof, None

    rng = np.random.default_rng(0)
    rows = [
        CohortRow(f"sub-{i + 1:04d}", round(float(rng.uniform(50, 85)), 1), SEXES[i % 2], DIAGNOSES[i % 3])
        for i in range(n)
    ]
    write_dataset_files(out, _GM(), rows)  # type: ignore[arg-type]
    for k, r in enumerate(rows):
        noisy = np.clip(img * rng.uniform(0.9, 1.1) + rng.normal(0, 0.02, img.shape), 0, 1).astype(np.float32)
        write_subject(out, r, noisy * (lab > 0), lab, aff, {"Seed": k, "Temperature": 1.0})
    write_participants(out, rows)


def _du(paths: list[Path]) -> int:
    return sum(p.stat().st_size for p in paths if p.is_file())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200, help="subjects in the cohort")
    ap.add_argument("--switches", type=int, default=10, help="subjects opened after the first (timed)")
    ap.add_argument("--work", help="scratch folder (default: a temporary one, removed)")
    ap.add_argument("--no-browser", action="store_true", help="sizes and write times only")
    ap.add_argument("--json", help="also write the result here")
    args = ap.parse_args(argv)

    from fl_app.generate.cohort_folder import read_cohort_dir
    from fl_app.generate.qc import write_qc, write_report
    from fl_app.viewer import ViewerEntry, write_viewer_page

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-viewer-"))
    cohort = work / "cohort"
    shutil.rmtree(cohort, ignore_errors=True)
    cohort.mkdir(parents=True)
    res: dict[str, object] = {"n_subjects": args.n, "grid": "64x64x64 @ 3 mm (cpu-demo)"}
    t = time.perf_counter()
    _write_cohort(cohort, args.n)
    res["cohort_write_s"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    report = write_qc(cohort)
    res["write_qc_s"] = round(time.perf_counter() - t, 2)  # montages + viewer data + page
    shutil.rmtree(cohort / "qc" / "report_viewer")
    subjects = read_cohort_dir(cohort)
    for s in subjects:
        s["montage"] = f"{s['participant_id']}_montage.png"
    t = time.perf_counter()
    write_report(cohort, subjects, None)
    res["viewer_page_write_s"] = round(time.perf_counter() - t, 2)  # viewer data + page, montages there
    t = time.perf_counter()
    write_report(cohort, subjects, None)
    res["viewer_page_rewrite_s"] = round(time.perf_counter() - t, 2)  # data scripts up to date: kept
    qc = cohort / "qc"
    data = sorted((qc / "report_viewer" / "data").glob("*.js"))
    res["size_bytes"] = {
        "report_html": report.stat().st_size,
        "niivue_js": (qc / "report_viewer" / "niivue.umd.js").stat().st_size,
        "viewer_data_total": _du(data),
        "viewer_data_per_subject_mean": round(_du(data) / max(len(data), 1)),
        "montages_total": _du(sorted(qc.glob("*_montage.png"))),
        "qc_folder_total": _du([p for p in qc.rglob("*") if p.is_file()]),
        "cohort_nifti_total": _du(sorted(cohort.glob("sub-*/anat/*.nii.gz"))),
    }
    # one full-1mm subject (160x224x160): the data script's size
    img, lab, aff = _head((160, 224, 160), 1.0)
    one = work / "full1mm"
    one.mkdir(exist_ok=True)
    nib.save(nib.Nifti1Image(img, aff), one / "sub-x_T1w.nii.gz")
    nib.save(nib.Nifti1Image(lab, aff), one / "sub-x_dseg.nii.gz")
    write_viewer_page(
        one / "p.html", [ViewerEntry("sub-x", one / "sub-x_T1w.nii.gz", one / "sub-x_dseg.nii.gz")]
    )
    res["size_bytes"]["viewer_data_per_subject_full_1mm"] = (
        (one / "p_viewer" / "data" / "sub-x.js").stat().st_size
    )  # type: ignore[index]

    if not args.no_browser:
        from tests.browser import Chromium

        with Chromium(width=1280, height=1000) as b:
            t = time.perf_counter()
            b.open(report)
            load = time.perf_counter() - t
            b.eval("window.synthbrainViewer.ready")
            first = time.perf_counter() - t
            shown = b.eval("document.documentElement.dataset.viewer")
            switch = []
            step = max(1, args.n // max(args.switches, 1))
            for i in range(args.switches):
                k = (1 + i * step) % args.n
                t = time.perf_counter()
                b.eval(f"window.synthbrainViewer.show({k})")
                switch.append(time.perf_counter() - t)
            heap = b.eval("performance.memory ? performance.memory.usedJSHeapSize : null")
            remote = [u[:80] for u in b.requests if not u.startswith(("file:", "data:", "blob:"))]
            res["browser"] = {
                "load_event_s": round(load, 3),
                "first_subject_drawn_s": round(first, 3),
                "first_shown": shown,
                "switch_subject_s_median": round(statistics.median(switch), 3),
                "switch_subject_s_max": round(max(switch), 3),
                "switches": len(switch),
                "js_heap_mb": round(heap / 2**20, 1) if heap else None,
                "console_errors": b.errors,
                "network_requests": remote,
                "webgl": "SwiftShader (software)",
            }
    res["machine"] = {"platform": platform.platform(), "python": platform.python_version()}
    text = json.dumps(res, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

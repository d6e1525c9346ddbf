"""QC of a synthetic cohort: one montage PNG per subject and an offline HTML cohort report.

``write_qc(cohort_dir)`` writes ``qc/<sub>_montage.png`` (axial, coronal and sagittal slices through
the volume centre; T1w in grey with the tissue labels overlaid: CSF blue, GM green, WM yellow) and
``qc/report.html``: an interactive 3D viewer of every subject (NiiVue, shipped with the package; the
volumes in ``qc/report_viewer/``, see :mod:`fl_app.viewer`) next to its covariates and sampling
settings, a montage grid, the covariate table and, when ``synthbrain evaluate`` has written
``qc/evaluation.json``, its summary. The report references its files by relative path and loads
nothing from the network, so it opens offline from ``file://`` (copy the whole ``qc/`` folder).
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

__all__ = ["montage", "write_qc", "write_report"]

_LABEL_RGBA = np.array(
    [[0, 0, 0, 0], [0.2, 0.4, 1.0, 0.45], [0.1, 0.8, 0.2, 0.35], [1.0, 0.9, 0.1, 0.30]], dtype=np.float32
)


def _views(vol: np.ndarray) -> list[np.ndarray]:
    """Three orthogonal central slices of an RAS (X, Y, Z) volume, oriented for display (origin lower)."""
    c = [n // 2 for n in vol.shape]
    return [vol[:, :, c[2]].T, vol[:, c[1], :].T, vol[c[0], :, :].T]


def montage(t1w: str | Path, dseg: str | Path | None, png: str | Path, title: str = "") -> Path:
    """Save a 1×3 montage (axial, coronal, sagittal) of ``t1w`` with ``dseg`` overlaid to ``png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    im = nib.as_closest_canonical(nib.load(str(t1w)))
    a = np.asarray(im.dataobj, dtype=np.float32)
    zooms = im.header.get_zooms()[:3]
    lab = None
    if dseg is not None:
        lab = np.asarray(nib.as_closest_canonical(nib.load(str(dseg))).dataobj).astype(np.int64).clip(0, 3)
    aspects = [zooms[1] / zooms[0], zooms[2] / zooms[0], zooms[2] / zooms[1]]
    vmax = float(np.percentile(a, 99.5)) or 1.0
    fig, axes = plt.subplots(1, 3, figsize=(6.6, 2.4))
    for k, (sl, ax) in enumerate(zip(_views(a), axes, strict=True)):
        ax.imshow(
            sl, cmap="gray", origin="lower", vmin=0, vmax=vmax, aspect=aspects[k], interpolation="nearest"
        )
        if lab is not None:
            ax.imshow(_LABEL_RGBA[_views(lab)[k]], origin="lower", aspect=aspects[k], interpolation="nearest")
        ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=8, x=0.01, ha="left")
    fig.tight_layout()
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=72)
    plt.close(fig)
    return png


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if v is None:
        return "n/a"
    return str(v)


def _summary_html(ev: dict[str, Any]) -> str:
    """Evaluation summary (the ``summary`` block of ``synthbrain evaluate --json``) as a table."""
    summ = ev.get("summary", ev)
    rows = "".join(
        f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(_fmt(v))}</td></tr>"
        for k, v in summ.items()
        if not isinstance(v, (dict, list))
    )
    return f"<table><tr><th>metric</th><th>value</th></tr>{rows}</table>"


def _viewer_entries(subjects: list[dict[str, Any]]) -> list[Any]:
    """One viewer entry per subject with a T1w: covariates and the T1w sidecar's settings as facts."""
    from fl_app.viewer import ViewerEntry, flatten_sidecar

    out = []
    for s in subjects:
        if not s.get("t1w"):
            continue
        t1w = Path(s["t1w"])
        facts: dict[str, Any] = {k: s.get(k) for k in ("participant_id", "age", "sex", "diagnosis")}
        side = t1w.parent / t1w.name.replace(".nii.gz", ".json")
        if side.is_file():
            facts |= {
                k: v for k, v in flatten_sidecar(json.loads(side.read_text())).items() if k != "Description"
            }
        title = f"{s['participant_id']}: {_fmt(s['age'])} y, {_fmt(s['sex'])}, {_fmt(s['diagnosis'])}"
        out.append(ViewerEntry(s["participant_id"], t1w, s.get("dseg"), title, facts))
    return out


def write_report(
    cohort: str | Path,
    subjects: list[dict[str, Any]],
    evaluation: dict[str, Any] | None,
    progress: bool = False,
) -> Path:
    """Write ``qc/report.html`` for ``subjects`` (dicts with participant_id, age, sex, diagnosis, the
    ``t1w``/``dseg`` paths and an optional ``montage`` path relative to ``qc/``): the interactive
    viewer (:mod:`fl_app.viewer`; its files in ``qc/report_viewer/``), the evaluation summary, the
    montages and the covariate table (clicking a montage or a row opens that subject in the viewer)."""
    from fl_app.viewer import write_viewer_page

    cohort = Path(cohort)
    desc = {}
    if (cohort / "dataset_description.json").is_file():
        desc = json.loads((cohort / "dataset_description.json").read_text())
    model = desc.get("SynthbrainModel", {})
    grid = "".join(
        f'<figure data-view="{html.escape(s["participant_id"])}"><img src="{html.escape(s["montage"])}" '
        f'alt="{html.escape(s["participant_id"])}">'
        f"<figcaption>{html.escape(s['participant_id'])}: {_fmt(s['age'])} y, {_fmt(s['sex'])}, "
        f"{_fmt(s['diagnosis'])}</figcaption></figure>"
        for s in subjects
        if s.get("montage")
    )
    table = "".join(
        f'<tr data-view="{html.escape(s["participant_id"])}"><td>{html.escape(s["participant_id"])}</td>'
        f"<td>{_fmt(s['age'])}</td><td>{_fmt(s['sex'])}</td><td>{_fmt(s['diagnosis'])}</td></tr>"
        for s in subjects
    )
    counts: dict[str, int] = {}
    for s in subjects:
        key = f"{_fmt(s['sex'])}/{_fmt(s['diagnosis'])}"
        counts[key] = counts.get(key, 0) + 1
    ev_html = (
        _summary_html(evaluation)
        if evaluation
        else "<p>No evaluation yet: run <code>synthbrain evaluate --cohort DIR --reference BIDS</code>.</p>"
    )
    plots = cohort / "qc" / "evaluation.html"
    plots_html = (
        '<p>Plots of the evaluation: <a href="evaluation.html">evaluation.html</a>.</p>'
        if plots.is_file()
        else ""
    )
    intro = f"""<style>
.grid {{ display: flex; flex-wrap: wrap; gap: 6px; }}
figure {{ margin: 0; }} figcaption {{ font-size: 11px; }} figure img {{ width: 330px; }}
</style>
<h1>synthbrain synthetic cohort</h1>
<p>{len(subjects)} subjects. Model sha256 <code>{html.escape(str(model.get("Sha256", "n/a")))}</code>,
privacy ε {html.escape(_fmt(model.get("PrivacyEpsilon")))}, profile {html.escape(str(model.get("Profile", "n/a")))}.
These are not images of real people.</p>
<p>Counts (sex/diagnosis): {html.escape(", ".join(f"{k}: {v}" for k, v in sorted(counts.items())))}</p>
<h2>Viewer</h2>
<p>Pick a subject below, or click its montage or its row further down. Labels overlaid:
<span style="color:#36f">CSF</span>, <span style="color:#1c3">GM</span>, <span style="color:#cb0">WM</span>.</p>
"""
    extra = f"""<h2>Evaluation</h2>
{ev_html}
{plots_html}
<h2>Montages</h2>
<div class="grid">{grid}</div>
<h2>Covariates</h2>
<table><tr><th>participant_id</th><th>age</th><th>sex</th><th>diagnosis</th></tr>{table}</table>
"""
    return write_viewer_page(
        cohort / "qc" / "report.html",
        _viewer_entries(subjects),
        title="synthbrain cohort report",
        intro_html=intro,
        extra_html=extra,
        progress=progress,
    )


def write_qc(cohort: str | Path, progress: bool = False, overwrite: bool = False) -> Path:
    """Montages for every subject of ``cohort`` (existing ones kept unless ``overwrite``) and
    ``qc/report.html``; includes ``qc/evaluation.json`` when present. Returns the report path."""
    from tqdm.auto import tqdm

    from fl_app.generate.cohort_folder import read_cohort_dir

    cohort = Path(cohort)
    subjects = read_cohort_dir(cohort)
    for s in tqdm(subjects, desc="QC montages", unit="vol", disable=not progress):
        png = cohort / "qc" / f"{s['participant_id']}_montage.png"
        if overwrite or not png.is_file():
            montage(
                s["t1w"],
                s["dseg"],
                png,
                f"{s['participant_id']} {_fmt(s['age'])} {_fmt(s['sex'])} {_fmt(s['diagnosis'])}",
            )
        s["montage"] = png.name
    ev_file = cohort / "qc" / "evaluation.json"
    evaluation = json.loads(ev_file.read_text()) if ev_file.is_file() else None
    return write_report(cohort, subjects, evaluation, progress=progress)

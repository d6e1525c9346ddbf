"""QC pages of ``synthbrain site check``: per-subject overlay PNGs and an offline HTML page.

:func:`write_site_qc` writes, into a folder the site chooses (never the data folder):

* ``png/<participant>.png``: the scan on three planes through the brain centre (axial, coronal,
  sagittal, world RAS), the brain mask outline (yellow) and the CSF / GM / WM boundaries (blue, green,
  red) of the label map used (provided or derived);
* ``site_check.html``: an offline page (no server, no network) with the table of every subject
  (labels provided/derived, tissue fractions, problems, its PNG) and the NiiVue viewer
  (:func:`fl_app.viewer.write_viewer_page`) with the label map overlaid, to scroll through a site.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import numpy as np

from fl_app.data.nifti import read_volume, to_canonical

_COLOURS = {1: "#3b82f6", 2: "#22c55e", 3: "#ef4444"}


def overlay_png(image_path: Path, label_path: Path | None, png: Path, title: str = "") -> Path:
    """Three-plane overlay of a scan and its label map (mask and tissue contours) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img = to_canonical(read_volume(image_path))
    data = img.data
    lab = None
    if label_path is not None:
        lab = np.rint(to_canonical(read_volume(label_path, check_values=False)).data).astype(np.int16)
    centre = (
        np.argwhere(lab > 0).mean(axis=0).round().astype(int)
        if lab is not None and (lab > 0).any()
        else np.array(data.shape) // 2
    )
    lo, hi = np.percentile(data, [1.0, 99.5])
    zooms = img.zooms
    planes = [
        ("axial", data[:, :, centre[2]], None if lab is None else lab[:, :, centre[2]], zooms[1] / zooms[0]),
        (
            "coronal",
            data[:, centre[1], :],
            None if lab is None else lab[:, centre[1], :],
            zooms[2] / zooms[0],
        ),
        (
            "sagittal",
            data[centre[0], :, :],
            None if lab is None else lab[centre[0], :, :],
            zooms[2] / zooms[1],
        ),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.4), dpi=80)
    for ax, (name, sl, ls, aspect) in zip(axes, planes, strict=True):
        ax.imshow(sl.T, cmap="gray", origin="lower", vmin=lo, vmax=hi, aspect=aspect, interpolation="nearest")
        if ls is not None:
            ax.contour((ls > 0).T.astype(float), levels=[0.5], colors="#facc15", linewidths=1.2)
            for k, c in _COLOURS.items():
                m = (ls == k).T.astype(float)
                if m.any():
                    ax.contour(m, levels=[0.5], colors=c, linewidths=0.6)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png)
    plt.close(fig)
    return png


def _fmt_fr(fr: dict[str, float] | None) -> str:
    if not fr:
        return "-"
    return " / ".join(f"{fr[k]:.2f}" for k in ("CSF", "GM", "WM"))


def write_site_qc(report: Any, out_dir: str | Path, *, progress: bool = False) -> Path:
    """PNG overlays of every readable subject and ``out_dir/site_check.html``; returns the HTML path."""
    from tqdm import tqdm

    from fl_app.viewer import ViewerEntry, write_viewer_page

    out = Path(out_dir)
    d = report.to_dict()
    rows, entries = [], []
    for s, sd in tqdm(
        list(zip(report.subjects, d["subjects"], strict=True)), desc="QC pages", disable=not progress
    ):
        pid = s.participant_id
        png_rel = None
        if s.image is not None and Path(s.image).is_file():
            try:
                overlay_png(Path(s.image), s.label if s.ok else None, out / "png" / f"{pid}.png", title=pid)
                png_rel = f"png/{pid}.png"
            except Exception:  # an unreadable file is already a named problem in the report
                png_rel = None
            if s.ok:
                facts = {
                    "labels": sd["labels"],
                    "label map": sd["label"],
                    "CSF / GM / WM": _fmt_fr(sd["fractions"]),
                }
                entries.append(
                    ViewerEntry(pid, Path(s.image), s.label, f"{pid} ({sd['labels']} labels)", facts)
                )
        problems = "<br>".join(html.escape(str(p)) for p in s.problems) or "ok"
        img = f'<img src="{png_rel}" width="540">' if png_rel else ""
        view = f' data-view="{html.escape(pid)}" style="cursor:pointer"' if s.ok else ""
        rows.append(
            f"<tr{view}><td>{html.escape(pid)}</td><td>{'ok' if s.ok else 'FAIL'}</td>"
            f"<td>{html.escape(str(sd['labels'] or '-'))}</td><td>{_fmt_fr(sd['fractions'])}</td>"
            f"<td>{problems}</td><td>{img}</td></tr>"
        )
    table = (
        f"<p><b>{html.escape(d['verdict'])}</b> ({d['n_derived_labels']} subjects with labels derived on site; "
        "yellow: brain mask, blue / green / red: CSF / GM / WM). Click a valid subject to open it in the viewer.</p>"
        "<table border=1 cellspacing=0 cellpadding=3><tr><th>subject</th><th>status</th><th>labels</th>"
        "<th>CSF / GM / WM</th><th>problems</th><th>overlay</th></tr>" + "".join(rows) + "</table>"
    )
    path = out / "site_check.html"
    if entries:
        write_viewer_page(path, entries, title=f"site check: {d['site']}", extra_html=table)
    else:
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(f"<!doctype html><meta charset=utf-8><title>site check</title>{table}")
    return path

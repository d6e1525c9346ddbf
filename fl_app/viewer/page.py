"""The viewer page writer and ``synthbrain view``.

Layout on disk (everything relative, so the page and its folder can be copied or zipped)::

    NAME.html                     the page: viewer, volume list, per-volume facts, caller's sections
    NAME_viewer/niivue.umd.js     NiiVue (pinned, unmodified UMD build shipped in fl_app/viewer/static)
    NAME_viewer/NIIVUE-LICENSE.txt
    NAME_viewer/data/KEY.js       one script per volume: its image (and label map) as base64 NIfTI
                                  (``vNNNN.js`` when the key is not a plain file name)

A ``file://`` page may not ``fetch`` files, but it may load scripts: the page loads a volume's data
script when that volume is opened (``<script src>``), so a 200-subject page opens as fast as a
one-subject page and only the viewed volumes are read. Images are stored for display only: 8-bit
(robust 0.5–99.5 % window; the NIfTI slope/intercept keep the crosshair's intensity readout in the
original units), gzip-compressed, label maps as 8-bit integers.
"""

from __future__ import annotations

import gzip
import hashlib
import html
import json
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "NIIVUE_SHA256",
    "NIIVUE_VERSION",
    "TISSUE_LABELS",
    "ViewerEntry",
    "flatten_sidecar",
    "write_viewer_page",
]

NIIVUE_VERSION = "0.69.0"
NIIVUE_SHA256 = "47b896b77ec4a5be3ef1949c33ad393b6f45629921f326c279000bcf51bdb4af"
STATIC = Path(__file__).parent / "static"

TISSUE_LABELS: tuple[tuple[int, str, tuple[int, int, int]], ...] = (
    (1, "CSF", (51, 102, 255)),
    (2, "GM", (26, 204, 51)),
    (3, "WM", (255, 230, 26)),
)
"""(value, name, RGB) of the tissue label maps (0 background), the QC montages' colours."""


@dataclass
class ViewerEntry:
    """One volume of a viewer page.

    key: unique id (e.g. participant_id; also the page's ``#key`` anchor); title: one line shown
    above the viewer; image: NIfTI path; labels: optional label map NIfTI on the same grid;
    facts: ``{name: value}`` shown in a table next to the viewer (values are escaped).
    """

    key: str
    image: Path
    labels: Path | None = None
    title: str = ""
    facts: dict[str, Any] = field(default_factory=dict)


def flatten_sidecar(obj: Any, prefix: str = "") -> dict[str, Any]:
    """A JSON sidecar as flat ``{"A.B": value}`` rows (lists joined), for an entry's facts table."""
    if not isinstance(obj, dict):
        return {prefix: ", ".join(map(str, obj)) if isinstance(obj, list) else obj}
    out: dict[str, Any] = {}
    for k, v in obj.items():
        out |= flatten_sidecar(v, f"{prefix}.{k}" if prefix else str(k))
    return out


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "n/a" if v is None else str(v)


def display_nifti(path: str | Path, labels: bool = False) -> bytes:
    """gzip NIfTI bytes of ``path`` for display: label maps as uint8 (uint16 above 255); images as uint8 over a robust
    window with slope/intercept restoring the original units (4D: the first volume)."""
    import nibabel as nib

    im = nib.load(str(path))
    data = np.asarray(im.dataobj)
    if data.ndim > 3:
        data = data.reshape(*data.shape[:3], -1)[..., 0]
    if labels:
        lab = np.rint(np.nan_to_num(np.asarray(data, dtype=np.float64)))
        out = np.clip(lab, 0, 65535).astype(np.uint8 if lab.max(initial=0) <= 255 else np.uint16)
        slope, inter = 1.0, 0.0
    else:
        a = np.nan_to_num(data.astype(np.float32))
        nz = a[a != 0]
        sample = nz if nz.size else a.ravel()
        lo = float(min(0.0, np.percentile(sample, 0.5)))
        hi = float(np.percentile(sample, 99.5))
        hi = hi if hi > lo else lo + 1.0
        slope, inter = (hi - lo) / 255.0, lo
        out = np.clip(np.rint((a - lo) / slope), 0, 255).astype(np.uint8)
    new = nib.Nifti1Image(out, im.affine)
    new.header.set_xyzt_units("mm")
    new.header.set_slope_inter(slope, inter)
    return gzip.compress(new.to_bytes(), compresslevel=6, mtime=0)


def data_file_name(key: str, index: int) -> str:
    """The data script of entry ``index``: ``KEY.js`` for a plain key (a BIDS participant id), so
    a subject's data can be found and deleted by its id; else ``vNNNN.js``."""
    if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,100}", key) and not re.fullmatch(r"v\d{4}", key):
        return f"{key}.js"
    return f"v{index:04d}.js"


def _copy_static(assets: Path) -> None:
    assets.mkdir(parents=True, exist_ok=True)
    for name in ("niivue.umd.js", "NIIVUE-LICENSE.txt"):
        src, dst = STATIC / name, assets / name
        if not dst.is_file() or dst.stat().st_size != src.stat().st_size:
            shutil.copyfile(src, dst)


def _write_data(entry: ViewerEntry, dst: Path) -> None:
    """The volume's data script; kept when newer than its sources (a re-written report is quick)."""
    srcs = [entry.image] + ([entry.labels] if entry.labels else [])
    if dst.is_file() and all(dst.stat().st_mtime >= Path(s).stat().st_mtime for s in srcs):
        with open(dst, encoding="ascii", errors="replace") as fh:
            head = fh.read(400)
        if head.startswith(f"synthbrainViewerData({json.dumps(entry.key)}, "):
            return
    import base64

    payload = {"key": entry.key, "image": base64.b64encode(display_nifti(entry.image)).decode("ascii")}
    if entry.labels:
        payload["labels"] = base64.b64encode(display_nifti(entry.labels, labels=True)).decode("ascii")
    tmp = dst.with_suffix(".tmp")
    tmp.write_text(
        f"synthbrainViewerData({json.dumps(entry.key)}, {json.dumps(payload)});\n", encoding="ascii"
    )
    os.replace(tmp, dst)


def _facts_html(facts: dict[str, Any]) -> str:
    rows = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_fmt(v))}</td></tr>" for k, v in facts.items()
    )
    return f"<table class='facts'>{rows}</table>"


def write_viewer_page(
    path: str | Path,
    entries: Sequence[ViewerEntry],
    *,
    title: str = "synthbrain viewer",
    intro_html: str = "",
    extra_html: str = "",
    label_names: Sequence[tuple[int, str, tuple[int, int, int]]] = TISSUE_LABELS,
    progress: bool = False,
) -> Path:
    """Write the viewer page ``path`` (and its ``<stem>_viewer/`` folder) for ``entries``.

    ``intro_html`` goes above the viewer, ``extra_html`` below it (trusted HTML from the caller);
    any element with ``data-view="KEY"`` there opens that entry when clicked. ``label_names`` gives
    the label map's colours and legend. Returns ``path``.
    """
    from tqdm.auto import tqdm

    path = Path(path)
    keys = [e.key for e in entries]
    if len(set(keys)) != len(keys):
        raise ValueError("viewer entries need unique keys")
    assets_name = f"{path.stem}_viewer"
    assets = path.parent / assets_name
    _copy_static(assets)
    (assets / "data").mkdir(exist_ok=True)
    meta = []
    names = []
    for i, e in enumerate(tqdm(entries, desc="viewer data", unit="vol", disable=not progress)):
        name = data_file_name(e.key, i)
        names.append(name)
        _write_data(e, assets / "data" / name)
        meta.append(
            {
                "key": e.key,
                "title": e.title or e.key,
                "src": f"{assets_name}/data/{name}",
                "labels": e.labels is not None,
                "facts": _facts_html(e.facts),
            }
        )
    keep = set(names)
    for stale in (assets / "data").glob("*.js"):
        if stale.name not in keep:
            stale.unlink()
    lut = {
        "R": [0] + [c[2][0] for c in label_names],
        "G": [0] + [c[2][1] for c in label_names],
        "B": [0] + [c[2][2] for c in label_names],
        "A": [0] + [255] * len(label_names),  # overall opacity set per volume (the overlay switch)
        "I": [0] + [c[0] for c in label_names],
        "labels": ["background"] + [c[1] for c in label_names],
    }
    legend = "".join(
        f"<span class='sw' style='background:rgb{c[2]}'></span>{html.escape(c[1])} " for c in label_names
    )
    options = "".join(f"<option value='{i}'>{html.escape(m['title'])}</option>" for i, m in enumerate(meta))
    page = (
        _PAGE.replace("__TITLE__", html.escape(title))
        .replace("__INTRO__", intro_html)
        .replace("__EXTRA__", extra_html)
        .replace("__LEGEND__", legend)
        .replace("__OPTIONS__", options)
        .replace("__ASSETS__", assets_name)
        .replace("__NIIVUE_VERSION__", NIIVUE_VERSION)
        .replace("__ENTRIES__", json.dumps(meta).replace("</", "<\\/"))
        .replace("__LUT__", json.dumps(lut))
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body { font-family: sans-serif; margin: 1.5em; }
table { border-collapse: collapse; margin-bottom: 1em; }
td, th { border: 1px solid #bbb; padding: 2px 8px; font-size: 13px; text-align: left; }
#viewer { display: flex; flex-wrap: wrap; gap: 14px; align-items: flex-start; }
#gl-box { width: 720px; height: 560px; background: #000; }
#gl { width: 100%; height: 100%; display: block; }
#side { max-width: 440px; font-size: 13px; }
#side .facts th { font-weight: normal; color: #444; }
#loc { font-family: monospace; white-space: pre; min-height: 3.6em; }
.sw { display: inline-block; width: 12px; height: 12px; margin: 0 3px 0 8px; vertical-align: middle; }
[data-view] { cursor: pointer; }
#status.err { color: #b00; }
</style>
<script src="__ASSETS__/niivue.umd.js"></script>
</head><body>
__INTRO__
<section id="viewer">
<div id="gl-box"><canvas id="gl"></canvas></div>
<div id="side">
<p><label>Volume <select id="pick">__OPTIONS__</select></label>
<button id="prev" type="button">&#9664;</button> <button id="next" type="button">&#9654;</button></p>
<p id="title"></p>
<p>Labels: __LEGEND__ <label><input id="ovl" type="checkbox" checked> overlay</label></p>
<p>Crosshair (click or drag in a plane; arrow keys move it):</p>
<div id="loc"></div>
<p id="status">Loading the viewer…</p>
<div id="facts"></div>
<p style="font-size:11px;color:#666">Viewer: NiiVue __NIIVUE_VERSION__ (BSD-2-Clause,
<a href="__ASSETS__/NIIVUE-LICENSE.txt">licence</a>), shipped with synthbrain; nothing is loaded from the network.</p>
</div>
</section>
__EXTRA__
<script>
"use strict";
const ENTRIES = __ENTRIES__;
const LUT = __LUT__;
const statusEl = document.getElementById("status");
const pending = new Map();   // key -> {promise, resolve, reject}
const cache = new Map();     // key -> payload (a few kept)
let nv = null, current = -1, showing = null;
function status(text, err) { statusEl.textContent = text; statusEl.className = err ? "err" : ""; }
window.synthbrainViewerData = function (key, payload) {
  const p = pending.get(key);
  if (p) { p.resolve(payload); }
};
function loadData(i) {
  const key = ENTRIES[i].key;
  if (cache.has(key)) { return Promise.resolve(cache.get(key)); }
  if (pending.has(key)) { return pending.get(key).promise; }
  let resolve, reject;
  const promise = new Promise((res, rej) => { resolve = res; reject = rej; });
  pending.set(key, { promise, resolve, reject });
  const s = document.createElement("script");
  s.src = ENTRIES[i].src;
  s.onerror = () => reject(new Error("cannot read " + ENTRIES[i].src + " (copy the page's _viewer folder with it)"));
  document.head.appendChild(s);
  return promise.then((payload) => {
    pending.delete(key); s.remove();
    cache.set(key, payload);
    while (cache.size > 4) { cache.delete(cache.keys().next().value); }
    return payload;
  }, (e) => { pending.delete(key); s.remove(); throw e; });
}
function fmt(v) { return (Math.round(v * 10) / 10).toFixed(1).padStart(7); }
function onLocation(d) {
  const mm = d.mm, vox = d.vox || [0, 0, 0];
  let text = "x " + fmt(mm[0]) + " mm  y " + fmt(mm[1]) + " mm  z " + fmt(mm[2]) + " mm\\n" +
    "voxel [" + Array.from(vox).map((v) => Math.round(v)).join(", ") + "]";
  const vals = d.values || [];
  if (vals.length > 0) { text += "  intensity " + Number(vals[0].value).toPrecision(4); }
  if (vals.length > 1) {
    const lab = Math.round(Number(vals[1].value));
    text += "\\nlabel " + lab + " " + (LUT.labels[LUT.I.indexOf(lab)] || "");
  }
  document.getElementById("loc").textContent = text;
}
async function show(i) {
  i = ((i % ENTRIES.length) + ENTRIES.length) % ENTRIES.length;
  const e = ENTRIES[i];
  current = i;
  document.getElementById("pick").value = String(i);
  document.getElementById("title").textContent = e.title;
  document.getElementById("facts").innerHTML = e.facts;
  status("Loading " + e.key + "…");
  const payload = await loadData(i);
  if (current !== i) { return; }
  const imgs = [await niivue.NVImage.loadFromBase64({ base64: payload.image, name: e.key + ".nii.gz", colormap: "gray" })];
  if (payload.labels) {
    const lab = await niivue.NVImage.loadFromBase64({ base64: payload.labels, name: e.key + "_dseg.nii.gz",
      colormap: "gray", opacity: document.getElementById("ovl").checked ? 0.5 : 0.0 });
    lab.setColormapLabel(LUT);
    imgs.push(lab);
  }
  if (current !== i) { return; }
  // Swap both volumes and update the GL state once (NiiVue's removeVolume/addVolume would each
  // re-upload and re-render: seconds per subject with software WebGL).
  nv.volumes = imgs; nv.back = imgs[0]; nv.overlays = imgs.slice(1);
  nv.updateGLVolume();
  if (history.replaceState) { history.replaceState(null, "", "#" + encodeURIComponent(e.key)); }
  status("Showing " + e.key + " (" + (i + 1) + " of " + ENTRIES.length + ").");
  document.documentElement.dataset.viewer = "shown:" + e.key;
  showing = e.key;
  nv.createOnLocationChange();
}
async function start() {
  if (typeof niivue === "undefined") { status("The viewer script did not load (copy the page's _viewer folder with it).", true); return; }
  nv = new niivue.Niivue({ backColor: [0, 0, 0, 1], show3Dcrosshair: true, isColorbar: false, crosshairWidth: 1, crosshairWidthUnit: "mm",
    multiplanarShowRender: niivue.SHOW_RENDER.ALWAYS, multiplanarLayout: niivue.MULTIPLANAR_TYPE.GRID,
    dragAndDropEnabled: false, loadingText: "" });
  nv.onLocationChange = onLocation;
  await nv.attachToCanvas(document.getElementById("gl"));
  nv.setSliceType(nv.sliceTypeMultiplanar);
  document.getElementById("pick").addEventListener("change", (ev) => show(Number(ev.target.value)).catch(fail));
  document.getElementById("prev").addEventListener("click", () => show(current - 1).catch(fail));
  document.getElementById("next").addEventListener("click", () => show(current + 1).catch(fail));
  document.getElementById("ovl").addEventListener("change", (ev) => {
    if (nv.volumes.length > 1) { nv.setOpacity(1, ev.target.checked ? 0.5 : 0.0); }
  });
  document.addEventListener("click", (ev) => {
    const t = ev.target.closest("[data-view]");
    if (!t) { return; }
    const i = ENTRIES.findIndex((e) => e.key === t.dataset.view);
    if (i >= 0) { ev.preventDefault(); show(i).catch(fail); document.getElementById("viewer").scrollIntoView(); }
  });
  if (ENTRIES.length === 0) { status("No volume to show."); return; }
  const want = decodeURIComponent(location.hash.slice(1));
  const first = Math.max(0, ENTRIES.findIndex((e) => e.key === want));
  await show(first);
}
function fail(e) { status(String(e && e.message || e), true); console.error(e); }
window.synthbrainViewer = { show, get nv() { return nv; }, get current() { return showing; }, entries: ENTRIES };
window.synthbrainViewer.ready = start().catch(fail);
</script>
</body></html>
"""


# ---------------------------------------------------------------------------------------------
# synthbrain view PATH
# ---------------------------------------------------------------------------------------------


def _is_nifti(p: Path) -> bool:
    return p.is_file() and (p.name.endswith(".nii") or p.name.endswith(".nii.gz"))


def _stem(p: Path) -> str:
    return p.name[: -len(".nii.gz")] if p.name.endswith(".nii.gz") else p.name[: -len(".nii")]


def _sibling_dseg(image: Path) -> Path | None:
    """``sub-x_T1w.nii.gz`` -> ``sub-x_dseg.nii.gz`` next to it (a synthbrain cohort's layout), else
    the same subject's dseg in ``derivatives/*/`` of the BIDS root above it."""
    stem = _stem(image)
    if not stem.endswith("_T1w"):
        return None
    base = stem[: -len("_T1w")]
    for ext in (".nii.gz", ".nii"):
        c = image.parent / f"{base}_dseg{ext}"
        if c.is_file():
            return c
    sub = base.split("_")[0]
    for root in image.parents:
        if (root / "derivatives").is_dir():
            hits = sorted((root / "derivatives").glob(f"*/{sub}/**/{base}*_dseg.nii*"))
            return hits[0] if hits else None
    return None


def _sidecar(image: Path) -> dict[str, Any]:
    js = image.parent / f"{_stem(image)}.json"
    if js.is_file():
        try:
            return flatten_sidecar(json.loads(js.read_text()))
        except (ValueError, OSError):
            return {}
    return {}


def _header_facts(image: Path) -> dict[str, Any]:
    import nibabel as nib

    im = nib.load(str(image))
    return {
        "file": image.name,
        "shape": "×".join(map(str, im.shape)),
        "voxel (mm)": "×".join(f"{z:g}" for z in im.header.get_zooms()[:3]),
        "orientation": "".join(nib.aff2axcodes(im.affine)),
    }


def _is_synthbrain_cohort(p: Path) -> bool:
    f = p / "dataset_description.json"
    if not (f.is_file() and (p / "participants.tsv").is_file()):
        return False
    try:
        return "SynthbrainModel" in json.loads(f.read_text())
    except ValueError:
        return False


def sha256_of_shipped_niivue() -> str:
    """sha256 of the shipped NiiVue build (tests compare it with :data:`NIIVUE_SHA256`)."""
    return hashlib.sha256((STATIC / "niivue.umd.js").read_bytes()).hexdigest()

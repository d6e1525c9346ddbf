"""The offline viewer and the evaluation plots, tested in a real headless Chromium.

Browser tests need Chromium (Debian: ``apt-get install chromium``; ``.ci/run`` installs it). Without
it they skip locally and fail under CI (``CI`` set). ``SYNTHBRAIN_UPDATE_SCREENSHOTS=1`` copies the
cohort viewer's screenshot to ``docs/img/cohort-viewer.png`` (shown in README).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
from pathlib import Path

import matplotlib.image as mpimg
import nibabel as nib
import numpy as np
import pytest

from fl_app.cli import main
from fl_app.generate.cohort_folder import (
    CohortRow,
    gate_release,
    write_dataset_files,
    write_participants,
    write_subject,
)
from fl_app.generate.qc import write_qc
from fl_app.viewer import NIIVUE_SHA256, ViewerEntry, write_viewer_page
from fl_app.viewer.page import STATIC, display_nifti, sha256_of_shipped_niivue
from tests.browser import BrowserError, Chromium, find_chromium

ROOT = Path(__file__).resolve().parents[1]
ROWS = [
    CohortRow("sub-a1", 71.5, "F", "AD"),
    CohortRow("sub-b2", 58.0, "M", "CN"),
    CohortRow("sub-c3", 80.0, "F", "MCI"),
    CohortRow("sub-d4", 66.0, "M", "AD"),
]


@pytest.fixture
def cohort(tmp_path, head, profile):
    """A synthbrain cohort folder of 4 head-like subjects (4 mm) with label maps, as `sample` writes it."""
    data, label, aff = head

    class _GM:  # the fields write_dataset_files reads
        model_hash, epsilon, profile, max_epsilon = "ab" * 32, None, None, 3.2

    _GM.profile = profile
    out = tmp_path / "cohort"
    out.mkdir()
    write_dataset_files(out, _GM(), ROWS)  # type: ignore[arg-type]
    (out / "code" / "synthbrain").mkdir(parents=True, exist_ok=True)
    from fl_app.config import profile_to_yaml

    (out / "code" / "synthbrain" / "profile.yaml").write_text(profile_to_yaml(profile))
    rng = np.random.default_rng(0)
    img = data / data.max()
    for k, r in enumerate(ROWS):
        lab = label.copy()
        if k % 2:  # some atrophy: the outer GM layer becomes CSF
            from scipy import ndimage

            lab[(lab == 2) & ~ndimage.binary_erosion(label > 0, iterations=2)] = 1
        noisy = (img + rng.normal(0, 0.01, img.shape)).astype(np.float32)
        write_subject(out, r, noisy, lab, aff, {"Seed": 100 + k, "Temperature": 1.0, "TopK": None})
    write_participants(out, ROWS)
    return out


# ---------------------------------------------------------------------------------------------
# Without a browser
# ---------------------------------------------------------------------------------------------


def test_shipped_niivue_is_pinned_with_its_licence():
    js = STATIC / "niivue.umd.js"
    assert sha256_of_shipped_niivue() == NIIVUE_SHA256  # the unmodified npm build of the pinned version
    assert js.stat().st_size < 3_000_000  # one minified UMD bundle
    lic = (STATIC / "NIIVUE-LICENSE.txt").read_text()
    assert "BSD 2-Clause License" in lic and "Copyright (c) 2021, Niivue" in lic
    pkg = (ROOT / "pyproject.toml").read_text().split("[tool.setuptools.package-data]")[1].split("\n[")[0]
    assert '"viewer/static/*"' in pkg  # an installed package ships both files


def test_display_nifti_is_small_and_keeps_units(tmp_path, head):
    data, label, aff = head
    nib.save(nib.Nifti1Image(data, aff), tmp_path / "t1.nii.gz")
    nib.save(nib.Nifti1Image(label, aff), tmp_path / "lab.nii.gz")
    im = nib.Nifti1Image.from_bytes(__import__("gzip").decompress(display_nifti(tmp_path / "t1.nii.gz")))
    assert im.get_data_dtype() == np.uint8 and np.allclose(im.affine, aff)
    back = np.asarray(im.get_fdata())
    hi = np.percentile(data[data != 0], 99.5)
    inside = data <= hi
    assert np.abs(back - data)[inside].max() <= hi / 255 + 1e-3  # 8 bits over the robust window
    lab = nib.Nifti1Image.from_bytes(
        __import__("gzip").decompress(display_nifti(tmp_path / "lab.nii.gz", True))
    )
    assert np.array_equal(np.asarray(lab.dataobj), label)


def test_report_has_viewer_and_withheld_data_goes(cohort):
    report = write_qc(cohort)
    page = report.read_text()
    assert "http://" not in page.replace("http://www.w3.org", "") and "https://" not in page
    assert '<script src="report_viewer/niivue.umd.js">' in page
    for r in ROWS:
        assert (cohort / "qc" / "report_viewer" / "data" / f"{r.participant_id}.js").is_file()
        assert f'data-view="{r.participant_id}"' in page  # montage and row open the subject
    assert "Synthbrain.Seed" in page and "Synthbrain.Temperature" in page  # sidecar settings shown
    assert (cohort / "qc" / "report_viewer" / "NIIVUE-LICENSE.txt").is_file()
    gate_release(cohort, {"sub-b2": "audit"})
    assert not (cohort / "qc" / "report_viewer" / "data" / "sub-b2.js").exists()
    page = write_qc(cohort).read_text()
    assert "sub-b2" not in page


def test_view_command_on_a_nifti_and_a_subject(cohort, tmp_path, capsys):
    t1w = cohort / "sub-a1" / "anat" / "sub-a1_T1w.nii.gz"
    out = tmp_path / "v" / "one.html"
    assert main(["view", str(t1w), "--out", str(out), "--quiet"]) == 0
    assert capsys.readouterr().out.strip() == str(out.resolve())
    page = out.read_text()
    assert '"labels": true' in page  # the sibling dseg is overlaid
    assert (tmp_path / "v" / "one_viewer" / "data" / "sub-a1_T1w.js").is_file()
    assert main(["view", str(cohort / "sub-c3"), "--out", str(tmp_path / "sub.html"), "--quiet"]) == 0
    page = (tmp_path / "sub.html").read_text()
    assert "sub-c3" in page and "sub-a1" not in page and "MCI" in page
    assert main(["view", str(cohort), "--quiet"]) == 0  # a cohort: its QC report
    assert capsys.readouterr().out.split()[-1] == str((cohort / "qc" / "report.html").resolve())
    assert main(["view", str(tmp_path / "nothing.nii.gz")]) == 2


def test_evaluate_html_from_the_command_line(cohort, tmp_path, capsys):
    out = tmp_path / "eval" / "evaluation.html"
    assert main(["evaluate", "--cohort", str(cohort), "--law", "--pairs", "3", "--html", str(out)]) == 0
    page = out.read_text()
    assert page.count("<img src='data:image/png;base64,") >= 4  # BTF, CSF, ICV, diversity
    assert "generating law" in page and "http" not in page
    assert (cohort / "qc" / "evaluation.html").is_file()
    assert 'href="evaluation.html"' in (cohort / "qc" / "report.html").read_text()
    ev = json.loads((cohort / "qc" / "evaluation.json").read_text())
    assert ev["per_subject"]["synthetic"]["ids"] == [r.participant_id for r in ROWS]


# ---------------------------------------------------------------------------------------------
# In Chromium
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    if find_chromium() is None:
        msg = "Chromium not installed (apt-get install chromium)"
        if os.environ.get("CI"):
            pytest.fail(f"{msg}: .ci/run must install it")
        pytest.skip(msg)
    try:
        b = Chromium(width=1280, height=1000)
    except (BrowserError, OSError) as exc:
        if os.environ.get("CI"):
            pytest.fail(f"Chromium does not start: {exc}")
        pytest.skip(f"Chromium does not start: {exc}")
    yield b
    b.close()


def _open_clean(b: Chromium, page: Path) -> None:
    b.errors.clear()
    b.requests.clear()
    b.open(page)


def _assert_offline(b: Chromium) -> None:
    assert not b.errors, b.errors
    remote = [u[:120] for u in b.requests if not u.startswith(("file:", "data:", "blob:"))]
    assert not remote, remote  # nothing from the network
    assert any(u.startswith("file:") for u in b.requests)


def _png(data: bytes) -> np.ndarray:
    return mpimg.imread(io.BytesIO(data), format="png")[..., :3]


_FRAMES = "new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(() => setTimeout(r, 100))))"


def test_cohort_report_viewer_in_chromium(browser, cohort, tmp_path):
    report = write_qc(cohort)
    _open_clean(browser, report)
    browser.eval("window.synthbrainViewer.ready")
    assert browser.eval("document.documentElement.dataset.viewer") == "shown:sub-a1"
    browser.eval(_FRAMES)
    shot = browser.screenshot("#gl")
    a = _png(shot)
    lit = (a.max(-1) > 0.08).mean()
    assert lit > 0.10, lit  # the volume is drawn: three planes and the 3D render on a black background
    # the label overlay is coloured (CSF blue / GM green / WM yellow): strongly non-grey pixels exist
    assert (np.ptp(a, axis=-1) > 0.25).mean() > 0.02
    loc = browser.eval("document.getElementById('loc').textContent")
    assert re.search(r"x +-?\d+\.\d mm +y +-?\d+\.\d mm +z +-?\d+\.\d mm", loc), loc
    assert "CSF" in browser.eval("document.getElementById('side').textContent")
    # the slice moves: crosshair 5 voxels up and 4 right -> different pixels and coordinates
    browser.eval("window.synthbrainViewer.nv.moveCrosshairInVox(4, 0, 5)")
    browser.eval(_FRAMES)
    b2 = _png(browser.screenshot("#gl"))
    assert np.abs(b2 - a).mean() > 0.002
    loc2 = browser.eval("document.getElementById('loc').textContent")
    assert loc2 != loc
    # another subject opens on demand from its own data script, with its covariates and settings
    browser.eval("window.synthbrainViewer.show(2)")
    assert browser.eval("document.documentElement.dataset.viewer") == "shown:sub-c3"
    facts = browser.eval("document.getElementById('facts').textContent")
    assert "MCI" in facts and "Synthbrain.Seed" in facts and "102" in facts
    browser.eval("window.synthbrainViewer.show(0)")
    browser.eval(_FRAMES)
    _assert_offline(browser)
    browser.eval("document.getElementById('viewer').scrollIntoView()")
    shot = browser.screenshot("#viewer")
    (tmp_path / "cohort-viewer.png").write_bytes(shot)
    if os.environ.get("SYNTHBRAIN_UPDATE_SCREENSHOTS"):
        (ROOT / "docs" / "img").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tmp_path / "cohort-viewer.png", ROOT / "docs" / "img" / "cohort-viewer.png")


def test_view_page_of_one_nifti_in_chromium(browser, tmp_path, head):
    data, _, aff = head
    nib.save(nib.Nifti1Image(data.astype(np.int16), aff), tmp_path / "brain.nii.gz")  # no label map
    page = write_viewer_page(tmp_path / "one.html", [ViewerEntry("brain", tmp_path / "brain.nii.gz")])
    _open_clean(browser, page)
    browser.eval("window.synthbrainViewer.ready")
    assert browser.eval("document.documentElement.dataset.viewer") == "shown:brain"
    browser.eval(_FRAMES)
    assert (_png(browser.screenshot("#gl")).max(-1) > 0.08).mean() > 0.10
    _assert_offline(browser)


def test_evaluate_report_in_chromium(browser, tmp_path):
    from fl_app.evaluate.audit import HIST_EDGES
    from fl_app.evaluate.fidelity import _clean, evaluate
    from fl_app.evaluate.plots import write_evaluation_html
    from tests.test_evaluate_fidelity import simulated_cohort

    res = evaluate(simulated_cohort(12, seed=4), simulated_cohort(12, seed=3), simulated=True, n_pairs=6)
    res["audit"] = {
        "n_flagged": 1,
        "min_distance_over_threshold": 0.9,
        "histogram_edges_over_threshold": [e if np.isfinite(e) else None for e in HIST_EDGES],
        "histogram_counts": [0, 0, 0, 1, 2, 4, 3, 1, 1, 0],
    }
    page = write_evaluation_html(_clean(res), tmp_path / "evaluation.html")
    _open_clean(browser, page)
    imgs = browser.eval(
        "Array.from(document.images).map((i) => [i.alt, i.complete && i.naturalWidth, i.naturalHeight])"
    )
    assert [i[0] for i in imgs] == [
        "Brain-tissue fraction against age",
        "CSF fraction against age",
        "Intracranial volume by sex",
        "Diversity, synthetic vs real",
        "Memorisation audit",
    ]
    assert all(w > 200 and h > 150 for _, w, h in imgs), imgs  # decoded images, not broken icons
    _assert_offline(browser)

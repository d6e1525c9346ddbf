"""QC: per-subject montages and the offline HTML cohort report."""

from __future__ import annotations

import json
import re

import matplotlib.image as mpimg
import numpy as np

from fl_app.generate.cohort_folder import (
    CohortRow,
    grid_affine,
    write_dataset_files,
    write_participants,
    write_subject,
)
from fl_app.generate.qc import write_qc


def test_montages_and_report(tmp_path):
    from fl_app.config import load_profile

    prof = load_profile("cpu-demo", {"data": {"shape": [16, 16, 16], "spacing": [12.0, 12.0, 12.0]},
                                     "vqvae": {"channels": [8, 8], "num_res_channels": [8, 8]}})  # fmt: skip
    rows = [CohortRow("sub-a1", 71.5, "F", "AD"), CohortRow("sub-b2", None, "M", None)]

    class _GM:  # the fields write_dataset_files reads
        model_hash, epsilon, profile, max_epsilon = "ab" * 32, None, prof, None

    write_dataset_files(tmp_path, _GM(), rows)  # type: ignore[arg-type]
    rng = np.random.default_rng(0)
    for r in rows:
        lab = rng.integers(0, 4, (16, 16, 16)).astype(np.uint8)
        write_subject(tmp_path, r, lab / 3.0, lab, grid_affine(prof), {"Seed": 0})
    write_participants(tmp_path, rows)
    (tmp_path / "qc").mkdir()
    (tmp_path / "qc" / "evaluation.json").write_text(json.dumps({"summary": {"ms_ssim_gap": 0.0123}}))
    report = write_qc(tmp_path)
    for r in rows:
        png = tmp_path / "qc" / f"{r.participant_id}_montage.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        im = mpimg.imread(png)
        assert im.shape[1] > 2 * im.shape[0]  # three views side by side
        assert im[..., :3].std() > 0.01  # not blank
    page = report.read_text()
    assert "sub-a1" in page and "71.5" in page and "sub-b2" in page
    assert len(re.findall(r"<img ", page)) == 2 and 'src="sub-a1_montage.png"' in page
    assert "ms_ssim_gap" in page and "0.0123" in page
    assert "http://" not in page and "https://" not in page  # opens offline

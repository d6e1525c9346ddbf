"""`synthbrain demo --tiny` end to end (3 simulated sites, both jobs in the simulator, cohort, report)."""

from __future__ import annotations

import argparse
import json
import math

import nibabel as nib
import pytest

from fl_app.demo import add_demo_parser

pytestmark = pytest.mark.slow


def test_tiny_demo_leaves_global_model_bundle_and_cohort(tmp_path):
    parser = argparse.ArgumentParser()
    add_demo_parser(parser.add_subparsers())
    args = parser.parse_args(["demo", "--tiny", "--out", str(tmp_path / "demo"), "--subjects", "4",
                              "--vqvae-rounds", "1", "--prior-rounds", "1", "--samples", "2"])  # fmt: skip
    assert args.func(args) == 0
    out = tmp_path / "demo"
    summary = json.loads((out / "demo.json").read_text())
    g = out / "global"
    for f in ("vqvae.pt", "prior.pt", "profile.yaml", "model_card.json", "bundle/configs/metadata.json",
              "bundle/configs/inference.json", "bundle/models/prior.pt"):  # fmt: skip
        assert (g / f).exists(), f
    card = json.loads((g / "model_card.json").read_text())
    assert len(card["sites"]) == 3 and card["num_subjects"] == 12
    img = nib.load(out / "cohort" / "sub-synth0001" / "anat" / "sub-synth0001_T1w.nii.gz")
    assert (out / "cohort" / "sub-synth0001" / "anat" / "sub-synth0001_dseg.nii.gz").exists()
    assert (out / "cohort" / "qc" / "report.html").exists()
    assert img.shape == (32, 32, 32)
    rows = (out / "cohort" / "participants.tsv").read_text().strip().splitlines()
    assert len(rows) == 3
    assert "synthetic cohort" in (out / "report.md").read_text().lower()
    assert summary["total_s"] > 0
    # the final global VQ-VAE (which no round table shows) evaluated on each site's held-out split
    final = summary["final_vqvae"]
    assert sorted(final) == sorted(card["sites"])
    for site, m in final.items():
        assert math.isfinite(m["psnr_db"]) and m["n_volumes"] == card["sites"][site]["val_subjects"]
    assert "Final global VQ-VAE" in (out / "report.md").read_text()

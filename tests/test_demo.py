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


def test_tiny_demo_with_dp_through_the_cli(tmp_path, capsys):
    """``synthbrain demo --dp --dp-epsilon 3`` (2 sites, 1 round of 2 steps per job): every site runs
    DP-SGD spending the asked ε per job, the server runs DP-FedAvg, and the per-site totals reach the
    privacy report, the model card and the cohort's dataset_description."""
    from fl_app.cli import main

    out = tmp_path / "demo"
    argv = ["demo", "--tiny", "--dp", "--dp-epsilon", "3", "--out", str(out), "--sites", "2", "--subjects", "4",
            "--vqvae-rounds", "1", "--prior-rounds", "1", "--vqvae-steps", "2", "--prior-steps", "2",
            "--samples", "1"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    rep = json.loads((out / "privacy_report.json").read_text())
    assert sorted(rep["sites"]) == ["site-1", "site-2"]
    for site, s in rep["sites"].items():
        assert f"{site}: ε = {s['total_epsilon']:.3f}" in printed
        assert s["refusals"] == 0 and s["epsilon_budget"] == 10.0
        assert set(s["jobs"]) == {"vqvae", "prior"}
        for job in s["jobs"].values():  # σ planned for the asked ε (to the planner's 1e-3 tolerance)
            assert 2.97 <= job["epsilon"] <= 3.0 and job["rounds"] == 1 and job["steps"] == 2
        assert 3.0 < s["total_epsilon"] <= 6.0  # both jobs composed (less than the sum under RDP)
    for job in ("vqvae", "prior"):
        server = rep["server"][job]
        assert server["mechanism"] == "dp-fedavg" and server["noise_multiplier"] == 1.0
        assert server["adaptive_clipping"] is True and server["rounds"] == 1
    card = json.loads((out / "global" / "model_card.json").read_text())["privacy"]
    assert card["differential_privacy"] is True
    assert card["report"]["site_total_epsilon"] == {k: v["total_epsilon"] for k, v in rep["sites"].items()}
    desc = json.loads((out / "cohort" / "dataset_description.json").read_text())
    assert (
        2.97
        <= desc["SynthbrainModel"]["PrivacyEpsilon"]
        <= max(s["total_epsilon"] for s in rep["sites"].values())
    )


def test_demo_dp_fine_tunes_the_checkpoint_and_reports_epsilon_beside_the_non_dp_figure(tmp_path):
    """``demo --dp --init CHECKPOINT``: the sites fine-tune only the DP subset (decoder_out; the prior's
    last block and condition embeddings) with DP-SGD from the checkpoint, clipping at the public-data bound
    DP_CLIP, no server noise by default, and the report puts each site's ε beside the DP model's PSNR and the checkpoint's (no DP) on the same split."""
    from fl_app.config import load_profile, load_site_config
    from fl_app.demo import DP_CLIP, DP_FINETUNE, final_vqvae_on_sites, run_demo
    from tests.test_bench_dp_utility import TINY_BENCH
    from tests.test_finetune import _checkpoint_dir

    ck = tmp_path / "ck"
    ck.mkdir()
    _checkpoint_dir(ck, load_profile("cpu-demo", TINY_BENCH))
    out = tmp_path / "demo"
    summary = run_demo(out, n_sites=2, subjects_per_site=4, vqvae_rounds=1, prior_rounds=1, vqvae_steps=2,
                       prior_steps=2, n_samples=1, dp=True, dp_epsilon=3.0, init=str(ck))  # fmt: skip
    card = json.loads((out / "global" / "model_card.json").read_text())
    assert card["jobs"]["vqvae"]["init"] == str(ck / "vqvae.pt") and card["jobs"]["prior"]["init"] == str(ck)
    for job in ("vqvae", "prior"):
        assert card["jobs"][job]["trainable"] == DP_FINETUNE[job]
        assert card["jobs"][job]["aggregation"]["name"] == "fedavg"  # no server noise from a checkpoint
    rep = json.loads((out / "privacy_report.json").read_text())
    text = (out / "report.md").read_text()
    assert f"Started from: {ck}" in text and "## Differential privacy" in text
    assert "No server-side noise" in text and "Server-side DP-FedAvg" not in text
    assert "learning rate 0.0001" in text  # the DP fine-tune's smaller step travels in the profile
    from fl_app.models.pretrained import checkpoint_profile_dict

    assert checkpoint_profile_dict(out / "global")["finetune"]["lr"] == DP_FINETUNE["lr"] == 1e-4
    reference = final_vqvae_on_sites(ck / "vqvae.pt", out / "site_configs", sorted(rep["sites"]))
    for site, s in rep["sites"].items():
        assert 2.9 <= s["jobs"]["vqvae"]["epsilon"] <= 3.0
        assert load_site_config(out / "site_configs" / f"{site}.yaml").privacy.max_grad_norm == DP_CLIP == 0.3
        assert s["jobs"]["vqvae"]["clip"] == DP_CLIP
        psnr = summary["final_vqvae"][site]["psnr_db"]
        row = next(
            line for line in text.splitlines() if line.startswith(f"| {site} | {s['total_epsilon']:.3f}")
        )
        assert f"{psnr:.3f}" in row and f"{reference[site]['psnr_db']:.3f}" in row

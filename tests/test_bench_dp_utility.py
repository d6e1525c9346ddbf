"""The DP utility bench (``bench/dp_utility.py``) end to end at the smallest size: with ``--tiny`` (32³ at 5 mm,
brain extraction with the label maps as in cpu-demo) every simulated site is usable, the steps are matched across
settings, DP-SGD's σ meets the target ε, both jobs compose on one site ledger, and the report's derived fields
are consistent. No timing is asserted."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import dp_utility as dpu

from fl_app.privacy.accountant import epsilon_from_history


def _args(*extra: str):
    return dpu.parse_args(
        ["--tiny", "--sites", "3", "--subjects", "3", "--held-subjects", "2", "--batch-size", "2",
         "--rounds", "2", "--steps", "1", "--prior-rounds", "1", "--prior-steps", "2", *extra]
    )  # fmt: skip


@pytest.fixture(scope="module")
def report():
    return dpu.run(_args("--settings", "dp_sgd_eps8"))


def test_every_tiny_site_is_usable_with_brain_extraction(report) -> None:
    # 5 mm keeps the anisotropic site (1.05 × spacing) under the 6 mm limit; label maps give the brain mask
    assert report["spacing"] == [5.0, 5.0, 5.0]
    assert report["brain_mask"] == "labels"
    assert report["usable_subjects_per_site"] == [3, 3, 3]
    assert report["held_out_subjects"] == 2
    assert report["threads"] == 1


def test_settings_are_step_matched_and_accounted(report) -> None:
    res = report["results"]
    assert set(res) == {"no_dp", "dp_sgd_eps8"}  # no_dp always runs as the baseline
    for r in res.values():
        assert r["vqvae_privacy"]["steps_per_site"] == [2, 2, 2]  # 2 rounds × 1 step
        assert r["prior_privacy"]["steps_per_site"] == [2, 2, 2]  # 1 round × 2 steps
        assert math.isfinite(r["vqvae_psnr_db"]) and math.isfinite(r["prior_bits_per_code"])
    dp = res["dp_sgd_eps8"]
    for job in ("vqvae_privacy", "prior_privacy"):
        acct = dp[job]
        sigma, q, steps = acct["history"]
        assert q == pytest.approx(0.5)  # Opacus: q = 1 / batches per epoch = 1 / ceil(3 / 2)
        assert steps == 2
        assert 7.9 <= acct["site_epsilon"] <= 8.0 + 1e-6  # the smallest σ meeting ε = 8
        assert epsilon_from_history([(sigma * 0.99, q, steps)], dpu.DELTA) > 8.0
    total = dp["prior_privacy"]["site_epsilon_total"]
    assert 8.0 < total < 16.0  # two ε = 8 jobs on one ledger: more than one, less than the plain sum
    assert res["no_dp"]["psnr_drop_db"] == 0.0 and res["no_dp"]["bits_increase"] == 0.0
    assert dp["psnr_drop_db"] == pytest.approx(res["no_dp"]["vqvae_psnr_db"] - dp["vqvae_psnr_db"])
    assert {"vqvae_psnr_db", "prior_bits_per_code"} <= set(report["initial"])


def test_unknown_setting_is_refused() -> None:
    with pytest.raises(SystemExit, match="unknown settings"):
        dpu.run(_args("--settings", "dp_sgd_eps3"))


TINY_BENCH = {  # what --tiny sets (bench/dp_utility.py), for a tiny stand-in checkpoint
    "data": {"shape": [32, 32, 32], "spacing": [5.0, 5.0, 5.0]},
    "vqvae": {"channels": [8, 16], "num_res_channels": [8, 16], "num_embeddings": 32, "embedding_dim": 8},
    "prior": {"d_model": 32, "n_layers": 1, "n_heads": 2},
    "train": {"batch_size": 2, "lr": 0.003},
}


def test_fine_tuning_arms_from_a_checkpoint_and_many_site_dp_fedavg(tmp_path) -> None:
    """``--init`` a checkpoint: ``initial`` is the checkpoint's own held-out PSNR, a subset arm trains and
    accounts only its trainable parameters at the target ε, and the many-site DP-FedAvg rows meet the
    site-level ε with q = m / N."""
    import torch

    from fl_app.config import load_profile
    from fl_app.models.finetune import trainable_names
    from fl_app.models.vqvae import build_vqvae, save_vqvae

    prof = load_profile("cpu-demo", TINY_BENCH)
    torch.manual_seed(5)
    save_vqvae(build_vqvae(prof, dp=True), prof, tmp_path / "vqvae.pt")  # a VQ-VAE-only checkpoint directory
    rep = dpu.run(dpu.parse_args(
        ["--init", str(tmp_path), "--sites", "2", "--subjects", "3", "--held-subjects", "2", "--rounds", "1",
         "--steps", "2", "--no-prior", "--arms", "last", "--epsilons", "8", "--settings", "dp_sgd_eps8_last",
         "--fedavg-sites", "3", "--fedavg-per-round", "2", "--fedavg-pool", "4", "--fedavg-subjects", "2",
         "--fedavg-rounds", "1", "--fedavg-steps", "1"]
    ))  # fmt: skip
    assert rep["init"] == str((tmp_path / "vqvae.pt").resolve()) and rep["prior_init"] == "scratch"
    res = rep["results"]
    assert set(res) == {"no_dp", "dp_sgd_eps8_last"}
    n_last = sum(p.numel() for n, p in build_vqvae(prof).named_parameters()
                 if n in trainable_names(build_vqvae(prof), ["decoder_last"]))  # fmt: skip
    acct = res["dp_sgd_eps8_last"]["vqvae_privacy"]
    assert acct["trainable"] == ["decoder_last"] and acct["trainable_parameters"] == n_last
    assert res["no_dp"]["vqvae_privacy"]["trainable_parameters"] > n_last
    assert 7.9 <= acct["site_epsilon"] <= 8.0 + 1e-6
    assert res["no_dp"]["psnr_gain_over_initial_db"] == pytest.approx(
        res["no_dp"]["vqvae_psnr_db"] - rep["initial"]["vqvae_psnr_db"]
    )
    (row,) = rep["dp_fedavg_sites"]
    assert (row["sites"], row["per_round"], row["sample_rate"]) == (3, 2, pytest.approx(2 / 3))
    assert 7.9 <= row["site_level_epsilon"] <= 8.0 + 1e-6
    assert row["epsilon_without_sampling"] >= row["site_level_epsilon"]
    assert row["cost_db"] == pytest.approx(row["no_noise_psnr_db"] - row["psnr_db"])


def test_site_splits_and_frozen_checkpoint_codes(tmp_path) -> None:
    """``--site-val K`` holds out each training site's last K subjects (not an unseen site); from a full checkpoint
    the priors train on the frozen checkpoint VQ-VAE's codes unless ``--prior-codes no_dp`` asks otherwise."""
    import torch

    from fl_app.config import load_profile
    from fl_app.models.prior import build_prior, save_prior
    from fl_app.models.vqvae import build_vqvae, save_vqvae

    prof = load_profile("cpu-demo", TINY_BENCH)
    torch.manual_seed(6)
    save_vqvae(build_vqvae(prof, dp=True), prof, tmp_path / "vqvae.pt")
    save_prior(build_prior(prof), prof, tmp_path / "prior.pt")
    common = ["--init", str(tmp_path), "--sites", "2", "--subjects", "2", "--site-val", "1", "--rounds", "1",
              "--steps", "1", "--prior-rounds", "1", "--prior-steps", "1", "--settings", "no_dp", "--lr", "0.05"]  # fmt: skip
    frozen = dpu.run(dpu.parse_args(common))
    assert frozen["held_out"].startswith("site_splits") and frozen["held_out_subjects"] == 2
    assert frozen["usable_subjects_per_site"] == [2, 2]
    assert frozen["prior_codes"] == "init"
    per_site = frozen["results"]["no_dp"]["psnr_gain_per_site"]  # one held-out volume per site, in site order
    assert list(per_site) == ["site-1", "site-2"]
    gain = frozen["results"]["no_dp"]["psnr_gain_over_initial_db"]
    assert sum(per_site.values()) / 2 == pytest.approx(gain, abs=1e-5)  # float32 means vs a float64 mean
    moved = dpu.run(dpu.parse_args([*common, "--prior-codes", "no_dp"]))
    assert moved["prior_codes"] == "no_dp"
    # same checkpoint prior, different codes: the frozen codes are the checkpoint's, the others the fine-tune's
    assert frozen["initial"]["prior_bits_per_code"] != moved["initial"]["prior_bits_per_code"]


def test_paired_gain_interval_needs_a_consistent_gain() -> None:
    """ "Above the checkpoint" is read off a paired interval: a small gain on every volume excludes 0, a larger
    mean gain that half the volumes lose does not."""
    base = [27.0 + 0.1 * i for i in range(20)]
    steady = dpu._paired_gain([b + 0.01 + 0.001 * i for i, b in enumerate(base)], base, seed=0)
    lo, hi = steady["psnr_gain_over_initial_ci95"]
    assert 0.01 < lo < 0.0195 < hi < 0.029 and steady["psnr_gain_volumes_improved"] == 1.0
    mixed = dpu._paired_gain([b + (0.6 if i % 2 else -0.5) for i, b in enumerate(base)], base, seed=0)
    lo, hi = mixed["psnr_gain_over_initial_ci95"]
    assert lo < 0 < hi and mixed["psnr_gain_volumes_improved"] == 0.5


def test_workdir_reuses_the_simulated_sites_and_no_baseline_skips_no_dp(tmp_path) -> None:
    """``--workdir`` keeps the simulated sites for the next run with the same data options (not re-simulated),
    and ``--no-baseline`` runs only the settings asked for, with the paired gain over the checkpoint."""
    args = ["--workdir", str(tmp_path), "--settings", "dp_sgd_eps8", "--no-baseline", "--no-prior"]
    first = dpu.run(_args(*args))
    stamp = tmp_path / "data.json"
    written = stamp.stat().st_mtime_ns
    site = next((tmp_path / "data").iterdir())
    before = sorted(p.stat().st_mtime_ns for p in site.rglob("*.nii*"))
    second = dpu.run(_args(*args))
    assert stamp.stat().st_mtime_ns == written
    assert sorted(p.stat().st_mtime_ns for p in site.rglob("*.nii*")) == before
    assert first["initial"] == second["initial"]
    assert set(second["results"]) == {"dp_sgd_eps8"}
    r = second["results"]["dp_sgd_eps8"]
    assert r["psnr_drop_db"] is None and r["psnr_gain_per_site"] is None  # an unseen site: no site splits
    lo, hi = r["psnr_gain_over_initial_ci95"]
    assert lo <= r["psnr_gain_over_initial_db"] <= hi

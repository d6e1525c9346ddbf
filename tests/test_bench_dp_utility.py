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

"""The scale bench's arithmetic (``bench/scale.py``): round times and bytes from transfer records, the
no-worse-than-linear summary, and the transfer meter's byte count. No NVFlare run, no timing."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import scale
import transfer_meter


def _rec(t: float, site: str, direction: str, rnd: int, nbytes: int = 0) -> dict:
    return {"t": t, "site": site, "direction": direction, "round": rnd, "bytes": nbytes}


RECORDS = [
    # round 0: sites receive at 10 / 11, upload at 20 / 25
    _rec(10.0, "site-1", "down", 0, 100), _rec(11.0, "site-2", "down", 0, 100),
    _rec(20.0, "site-1", "up", 0, 40), _rec(25.0, "site-2", "up", 0, 40),
    # server-side records must not count as site traffic or round boundaries
    _rec(5.0, "server", "send", 0, 100), _rec(26.0, "server", "recv", 0, 40),
    # round 1 starts at 30, round 2 at 34.5 and ends with the last upload at 37
    _rec(30.0, "site-2", "down", 1, 100), _rec(30.5, "site-1", "down", 1, 100),
    _rec(32.0, "site-1", "up", 1, 40), _rec(33.0, "site-2", "up", 1, 40),
    _rec(34.5, "site-1", "down", 2, 100), _rec(35.0, "site-2", "down", 2, 100),
    _rec(36.0, "site-1", "up", 2, 40), _rec(37.0, "site-2", "up", 2, 40),
]  # fmt: skip


def test_round_times_from_first_receipts():
    assert scale.round_times(RECORDS) == pytest.approx([20.0, 4.5, 2.5])


def test_steady_seconds_skips_round_zero_and_the_partial_last_round():
    assert scale.steady_seconds([20.0, 4.5, 2.5]) == pytest.approx(4.5)
    assert scale.steady_seconds([20.0, 4.0, 5.0, 1.0]) == pytest.approx(4.5)
    assert scale.steady_seconds([20.0, 3.0]) == pytest.approx(3.0)  # 2 rounds: the last one
    assert scale.steady_seconds([20.0]) == pytest.approx(20.0)  # 1 round: round 0
    with pytest.raises(ValueError):
        scale.steady_seconds([])


def test_bytes_per_round_sums_sites_and_ignores_server_records():
    b = scale.bytes_per_round(RECORDS)
    assert b == {"down": 200.0, "up": 80.0, "total": 280.0}


def test_summary_linear_and_superlinear():
    rows = [
        {"sites": 8, "seconds_per_round": 8.0, "peak_pss_mb": 3000.0, "bytes_per_round": 800},
        {"sites": 3, "seconds_per_round": 3.0, "peak_pss_mb": 1500.0, "bytes_per_round": 300},
        {"sites": 16, "seconds_per_round": 24.0, "peak_pss_mb": 5000.0, "bytes_per_round": 1600},
    ]
    s = scale.summarise(rows, metrics=("seconds_per_round", "peak_pss_mb", "bytes_per_round"))
    assert s["baseline_sites"] == 3
    g = s["growth_per_site"]
    assert g[3]["seconds_per_round"] == pytest.approx(1.0)
    assert g[8]["seconds_per_round"] == pytest.approx(1.0)  # 8/3 the time for 8/3 the sites
    assert g[16]["seconds_per_round"] == pytest.approx((24.0 / 3.0) / (16 / 3))  # 1.5: super-linear
    assert g[16]["peak_pss_mb"] == pytest.approx((5000 / 1500) / (16 / 3))  # sub-linear (0.625)
    assert s["no_worse_than_linear"] == {
        "seconds_per_round": False,
        "peak_pss_mb": True,
        "bytes_per_round": True,
    }


def test_summary_tolerates_small_noise_and_missing_metrics():
    rows = [
        {"sites": 3, "seconds_per_round": 3.0, "bytes_per_round": None},
        {"sites": 6, "seconds_per_round": 6.2, "bytes_per_round": None},
    ]
    s = scale.summarise(rows, metrics=("seconds_per_round", "bytes_per_round"))
    assert s["growth_per_site"][6] == {"seconds_per_round": pytest.approx(6.2 / 6.0)}
    assert s["no_worse_than_linear"]["seconds_per_round"] is True  # within the 5 % tolerance
    with pytest.raises(ValueError):
        scale.summarise([])


def test_payload_bytes_counts_numpy_and_torch():
    data = {
        "a": np.zeros((10, 10), np.float32),
        "b": torch.zeros(5, dtype=torch.float64),
        "c": "not an array",
    }
    assert transfer_meter.payload_bytes(data) == (2, 400 + 40)
    assert transfer_meter.payload_bytes(None) == (0, 0)

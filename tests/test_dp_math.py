"""DP math without NVFlare: accountant vs Opacus references, clip bound, noise scale, ledger, DP-FedAvg."""

from __future__ import annotations

import math

import numpy as np
import pytest
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from opacus.accountants.utils import get_noise_multiplier

from fl_app.privacy.accountant import (
    LedgerEntry,
    PrivacyBudgetExceeded,
    PrivacyLedger,
    clip_by_global_norm,
    epsilon_from_history,
    gaussian_noise,
    global_norm,
    noise_multiplier_for,
)
from fl_app.privacy.aggregation import ClientUpdate
from fl_app.privacy.dp_fedavg import DPFedAvgStrategy, dp_fedavg_aggregate, effective_update_noise


def _stepped(history, delta):
    """Reference: Opacus' RDPAccountant fed one optimiser step at a time (as a DPOptimizer does)."""
    acc = RDPAccountant()
    for sigma, q, n in history:
        for _ in range(n):
            acc.step(noise_multiplier=sigma, sample_rate=q)
    return acc.get_epsilon(delta)


@pytest.mark.parametrize(
    "history",
    [
        [(1.1, 0.01, 1000)],
        [(1.0, 0.25, 40)],
        [(0.8, 0.5, 10), (1.5, 0.25, 30), (0.8, 0.5, 10)],  # two jobs + a third: composition
    ],
)
def test_epsilon_matches_opacus_rdp_accountant(history):
    got = epsilon_from_history(history, 1e-5)
    assert got == pytest.approx(_stepped(history, 1e-5), rel=1e-9)


def test_epsilon_reference_values():
    # Abadi et al. setting (q = 0.01, σ = 1.1, 100 epochs = 10 000 steps) with Opacus' RDP conversion
    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = compute_rdp(q=0.01, noise_multiplier=1.1, steps=10_000, orders=orders)
    want, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=1e-5)
    got = epsilon_from_history([(1.1, 0.01, 10_000)], 1e-5)
    assert got == pytest.approx(want, rel=1e-9)
    assert 5.0 < got < 6.5  # sanity: the value Opacus' RDP accountant gives here is about 5.6
    # q = 1 (every site every round): RDP(α) = α·T / (2σ²), closed form with Opacus' improved conversion
    sigma, t, delta = 2.0, 10, 1e-5
    a = np.asarray(orders, dtype=float)
    closed = a * t / (2 * sigma**2) - (np.log(delta) + np.log(a)) / (a - 1) + np.log((a - 1) / a)
    assert epsilon_from_history([(sigma, 1.0, t)], delta) == pytest.approx(float(np.nanmin(closed)), rel=1e-9)
    assert epsilon_from_history([], 1e-5) == 0.0
    assert math.isinf(epsilon_from_history([(0.0, 0.1, 5)], 1e-5))
    # PRV accountant gives a tighter (smaller) but close ε
    prv = epsilon_from_history([(1.1, 0.01, 1000)], 1e-5, accountant="prv")
    rdp1 = epsilon_from_history([(1.1, 0.01, 1000)], 1e-5)
    assert 0.5 * rdp1 < prv <= rdp1 * 1.01


@pytest.mark.parametrize("target", [1.0, 4.0, 8.0])
def test_noise_multiplier_for_target_epsilon(target):
    q, steps, delta = 0.25, 60, 1e-5
    sigma = noise_multiplier_for(target, delta, q, steps)
    assert epsilon_from_history([(sigma, q, steps)], delta) <= target
    assert epsilon_from_history([(sigma * 0.98, q, steps)], delta) > target  # tight
    ref = get_noise_multiplier(target_epsilon=target, target_delta=delta, sample_rate=q, steps=steps)
    assert sigma == pytest.approx(ref, rel=0.03)
    # with a prior history (job 1 spent something), more noise is needed for the same total
    prior = [(sigma, q, steps // 2)]
    assert noise_multiplier_for(target, delta, q, steps, prior_history=prior) > sigma
    with pytest.raises(ValueError):
        noise_multiplier_for(target, delta, q, steps, prior_history=[(0.3, 1.0, 100)])


def test_clip_bound_holds_and_is_noop_below():
    rng = np.random.default_rng(0)
    for scale in (1e-3, 0.3, 10.0, 1e3):
        t = {"a": rng.normal(size=(5, 7)) * scale, "b": rng.normal(size=(11,)) * scale}
        clipped, norm = clip_by_global_norm(t, 1.0)
        assert norm == pytest.approx(math.sqrt(sum(float(np.sum(v**2)) for v in t.values())))
        assert global_norm(clipped) <= 1.0 + 1e-12
        if norm <= 1.0:
            assert all(np.array_equal(clipped[k], t[k]) for k in t)
        else:
            assert global_norm(clipped) == pytest.approx(1.0)
            # direction kept
            assert np.allclose(clipped["a"] / np.linalg.norm(clipped["a"]), t["a"] / np.linalg.norm(t["a"]))


def test_gaussian_noise_std_statistically():
    rng = np.random.default_rng(1)
    n = 200_000
    x = gaussian_noise({"w": (n,)}, 0.7, rng)["w"]
    # sample std of n normals: sd(s) ≈ σ/√(2n); allow 6 sd
    assert abs(x.std() - 0.7) < 6 * 0.7 / math.sqrt(2 * n)
    assert abs(x.mean()) < 6 * 0.7 / math.sqrt(n)


def test_dp_fedavg_noise_scale_and_clipping_statistically():
    """Mean update = mean of clipped updates + N(0, (σC/n)²): checked on many coordinates."""
    rng = np.random.default_rng(2)
    d = 50_000
    big = {"w": np.full(d, 10.0)}  # norm √d·10 ≫ C: clipped to C
    small = {"w": np.full(d, 1e-4)}  # norm 0.022 < C: unchanged
    clip, sigma, n = 2.0, 1.5, 2
    out, norms = dp_fedavg_aggregate([big, small], clip, sigma, rng)
    assert norms[0] == pytest.approx(10 * math.sqrt(d)) and norms[1] == pytest.approx(1e-4 * math.sqrt(d))
    expected_mean = (np.full(d, clip / math.sqrt(d)) + small["w"]) / n
    resid = out["w"] - expected_mean
    std = sigma * clip / n
    assert abs(resid.std() - std) < 6 * std / math.sqrt(2 * d)
    assert abs(resid.mean()) < 6 * std / math.sqrt(d)
    # without noise it is exactly the mean of the clipped updates
    out0, _ = dp_fedavg_aggregate([big, small], clip, 0.0, rng)
    assert np.allclose(out0["w"], expected_mean)


def test_dp_fedavg_strategy_accounting_integer_buffers_and_adaptive_clip():
    upd = [
        ClientUpdate("a", {"w": np.ones(4, np.float32), "order": np.zeros(3, np.int64)}, 5),
        ClientUpdate("b", {"w": -np.ones(4, np.float32), "order": np.zeros(3, np.int64)}, 9),
    ]
    s = DPFedAvgStrategy(noise_multiplier=1.2, clip=0.5, delta=1e-5, seed=0)
    out = s.aggregate(upd, 0)
    assert out["w"].dtype == np.float32 and out["order"].dtype == np.int64 and not out["order"].any()
    s.aggregate(upd, 1)
    desc = s.describe()
    assert desc["rounds"] == 2 and desc["sample_rate"] == 1.0
    assert desc["epsilon"] == pytest.approx(_stepped([(1.2, 1.0, 2)], 1e-5), rel=1e-9)
    # resume: the history's records restore the round count (no double counting) and the clip bound
    s2 = DPFedAvgStrategy(noise_multiplier=1.2, clip=0.5, delta=1e-5, seed=0)
    s2.restore([{"aggregation": desc}, {"aggregation": {**desc, "next_clip": 0.7}}])
    assert s2.rounds_noised == 2 and s2.clip == 0.7
    bad = [ClientUpdate("a", {"w": np.ones(4, np.float32), "order": np.ones(3, np.int64)}, 1)]
    with pytest.raises(ValueError, match="integer"):
        s.aggregate(bad, 2)
    # adaptive clipping: all norms (2.0) above C -> clip grows towards the median
    ad = DPFedAvgStrategy(
        noise_multiplier=0.0, clip=0.1, target_quantile=0.5, clip_lr=0.5, quantile_noise=1e-9
    )
    for r in range(10):
        ad.aggregate(upd, r)
    assert ad.clip > 0.1 * math.exp(0.5 * 0.5 * 9)
    assert effective_update_noise(1.0, 1.0) == pytest.approx(1 / math.sqrt(1 - 0.25))
    with pytest.raises(ValueError):
        effective_update_noise(2.0, 0.5)


def test_ledger_persists_composes_and_is_idempotent(tmp_path):
    path = tmp_path / "state" / "ledger.json"
    led = PrivacyLedger(path, "site-1")
    e1 = LedgerEntry(job_id="simulate_job", job="vqvae", round=0, noise_multiplier=1.0, sample_rate=0.25, steps=8,
                     max_grad_norm=1.0, session="s1")  # fmt: skip
    assert led.record(e1)
    assert not led.record(LedgerEntry(**{**e1.__dict__, "time": ""}))  # same (job, round): not twice
    led.record(LedgerEntry(**{**e1.__dict__, "round": 1, "time": ""}))
    # a new process (new ledger object) sees the same history; a second job composes with the first
    led2 = PrivacyLedger(path, "site-1")
    # same NVFlare job id (the simulator's) and round, another job: counted
    led2.record(LedgerEntry(job_id="simulate_job", job="prior", round=0, noise_multiplier=0.9, sample_rate=0.5,
                            steps=6, max_grad_norm=0.5, session="s2"))  # fmt: skip
    hist = [(1.0, 0.25, 8), (1.0, 0.25, 8), (0.9, 0.5, 6)]
    assert led2.history() == hist
    assert led2.epsilon(1e-5) == pytest.approx(_stepped(hist, 1e-5), rel=1e-9)
    assert led2.epsilon(1e-5, session="s1") == pytest.approx(_stepped(hist[:2], 1e-5), rel=1e-9)
    assert led2.epsilon(1e-5) > led2.epsilon(1e-5, session="s1")
    # a round really run again (restarted client: new session) is a new release and is counted
    assert led2.record(LedgerEntry(**{**e1.__dict__, "session": "s3", "time": ""}))
    assert len(led2.history()) == 4
    # budget: a planned round that fits passes, one that does not raises with a clear message
    hist = led2.history()
    spent = led2.epsilon(1e-5)
    assert spent == pytest.approx(_stepped(hist, 1e-5), rel=1e-9)
    after = led2.check([(1.0, 0.25, 8)], 1e-5, budget=spent + 5)
    assert spent < after <= spent + 5
    with pytest.raises(PrivacyBudgetExceeded, match="privacy budget exceeded"):
        led2.check([(1.0, 0.25, 8)], 1e-5, budget=spent + 1e-3)
    led2.record_refusal("j3", "vqvae", 0, "test")
    assert PrivacyLedger(path, "site-1").refusals()[0]["job_id"] == "j3"
    with pytest.raises(ValueError, match="site"):
        PrivacyLedger(path, "site-2").entries()

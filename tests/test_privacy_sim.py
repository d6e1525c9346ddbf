"""DP end to end in NVFlare's simulator (tiny): leak audit of every task result, site-enforced budget refusal,
one ledger per site composing both jobs, DP-FedAvg on the server, privacy report.

2 sites × 4 subjects at 32³: ``site-1`` runs DP-SGD within its budget; ``site-2``'s YAML budget (ε = 0.3)
is below what one round of the job would spend, so it refuses every round and the rounds go on with
site-1 alone. Both jobs run with server-side DP-FedAvg. A client-side NVFlare result filter records every
result each client sends; the DP optimiser's released gradients are recorded too (audit mode), so the
test replays each round from the received weights and the released gradients alone.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from tests.test_fl_sim import make_sites
from tests.test_privacy_references import epsilon_analytic_gaussian, epsilon_integer_orders

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]

VQ_ROUNDS, VQ_STEPS, PRIOR_ROUNDS, PRIOR_STEPS = 2, 3, 1, 3
TARGET_EPS = 4.0

# What a DP site with the default ``privacy.release: [accounting]`` may send besides its DP update,
# written out literally (an independent reference, not the client's own constants): the accounting of its
# DP releases and data-health counts (all revealing its subject count, as q = B / n does) and the checksum
# of the global VQ-VAE it received (data-independent). No loss, no PSNR, no per-subject value.
RELEASED_METRICS = frozenset({
    "epsilon", "job_epsilon", "dp_noise_multiplier", "dp_sample_rate", "dp_steps", "dp_max_grad_norm",
    "dp_delta", "num_subjects", "num_val_subjects", "skipped_subjects", "unreadable_subjects",
    "vqvae_checksum",
})  # fmt: skip
NUM_SAMPLES_KEY = "NUM_STEPS_CURRENT_ROUND"  # NVFlare's meta key for the aggregation weight
FROZEN_PREFIX = "vqvae."  # the prior job ships the frozen VQ-VAE under this prefix


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory):
    import os

    from fl_app.fl.leak_audit import AUDIT_ENV, ResultAuditFilter
    from fl_app.fl.run import run_job
    from fl_app.privacy.dp_fedavg import dp_fedavg_strategy

    root = tmp_path_factory.mktemp("dpfl")
    prof, cfg_dir, clients = make_sites(root, 2, 4)
    budgets = {"site-1": 20.0, "site-2": 0.3}
    for c in clients:
        p = cfg_dir / f"{c}.yaml"
        d = yaml.safe_load(p.read_text())
        d["privacy"] = {"enabled": True, "epsilon_budget": budgets[c], "max_grad_norm": 1.0, "delta": 1e-5}
        p.write_text(yaml.safe_dump(d))
    audit = root / "audit"
    os.environ[AUDIT_ENV] = str(audit / "optimizer")
    run = root / "run"
    strategy, sargs = dp_fedavg_strategy(noise_multiplier=0.5, clip=5.0, seed=0)
    common = dict(profile=prof, clients=clients, site_config_dir=cfg_dir, dp_epsilon=TARGET_EPS,
                  strategy_path=strategy, strategy_args=sargs)  # fmt: skip
    try:
        run_job("vqvae", "sim", run, num_rounds=VQ_ROUNDS, max_steps=VQ_STEPS, **common,
                result_filters=[ResultAuditFilter(str(audit / "vqvae"))],
                data_filters=[ResultAuditFilter(str(audit / "vqvae"), direction="data")])  # fmt: skip
        run_job("prior", "sim", run, num_rounds=PRIOR_ROUNDS, max_steps=PRIOR_STEPS, **common,
                result_filters=[ResultAuditFilter(str(audit / "prior"))],
                data_filters=[ResultAuditFilter(str(audit / "prior"), direction="data")])  # fmt: skip
    finally:
        os.environ.pop(AUDIT_ENV, None)
    return {
        "root": root,
        "run": run,
        "cfg_dir": cfg_dir,
        "audit": audit,
        "clients": clients,
        "budgets": budgets,
    }


def _records(d, prefix):
    return [torch.load(p, weights_only=False) for p in sorted(d.glob(f"{prefix}_*.pt"))]


def _ledger(root, site):
    from fl_app.privacy.accountant import PrivacyLedger

    return PrivacyLedger(root / "cache" / site / "privacy_ledger.json", site)


def test_budget_refusal_round_goes_on_without_the_site(dp_run):
    from fl_app.fl.server import read_checkpoint

    run, root = dp_run["run"], dp_run["root"]
    for kind, rounds in (("vqvae", VQ_ROUNDS), ("prior", PRIOR_ROUNDS)):
        ck = read_checkpoint(run / "fl" / kind)
        assert ck["round"] == rounds - 1, kind  # the job completed all its rounds
        for h in ck["history"]:
            assert set(h["sites"]) == {"site-1"}, (kind, h["sites"])  # site-2 refused, round went on
    led2 = _ledger(root, "site-2")
    assert led2.entries() == []  # nothing spent
    refused = [(r["job"], r["round"]) for r in led2.refusals()]
    assert refused == [("vqvae", r) for r in range(VQ_ROUNDS)] + [("prior", r) for r in range(PRIOR_ROUNDS)]
    assert "privacy budget exceeded" in led2.refusals()[0]["reason"]
    # the refusal is in the site's own job log, with the reason
    logs = [p.read_text(errors="replace") for p in (run / "nvflare" / "sim").rglob("log*.txt")]
    assert any("REFUSED round 0" in t and "budget is ε = 0.3" in t for t in logs)
    # site-2's reply was an empty result (no tensors, no metrics), which the server skipped
    for kind in ("vqvae", "prior"):
        for rec in _records(dp_run["audit"] / kind / "site-2", "result"):
            assert rec["dxo"]["data"] == {} and not rec["dxo"]["meta"].get("initial_metrics")


def test_one_ledger_per_site_composes_both_jobs_within_budget(dp_run):
    from fl_app.privacy.accountant import epsilon_from_history, noise_multiplier_for

    led = _ledger(dp_run["root"], "site-1")
    entries = led.entries()
    assert [(e.job, e.round) for e in entries] == [("vqvae", r) for r in range(VQ_ROUNDS)] + [
        ("prior", r) for r in range(PRIOR_ROUNDS)
    ]
    for e in entries:
        assert e.steps == (VQ_STEPS if e.job == "vqvae" else PRIOR_STEPS)
        # σ derived from the job's target ε for its planned rounds × steps at this q
        rounds = VQ_ROUNDS if e.job == "vqvae" else PRIOR_ROUNDS
        assert e.noise_multiplier == pytest.approx(
            noise_multiplier_for(TARGET_EPS, 1e-5, e.sample_rate, rounds * e.steps), rel=1e-6
        )
        # independently: that σ over the job's planned steps spends about the target ε (tests/test_privacy_references)
        eps = epsilon_integer_orders([(e.noise_multiplier, e.sample_rate, rounds * e.steps)], 1e-5)
        assert 0.95 * TARGET_EPS <= eps <= 1.05 * TARGET_EPS, (e.job, e.noise_multiplier, eps)
    vq = entries[0].session
    assert entries[1].session == vq and entries[2].session != vq  # one session per client run of a job
    assert led.epsilon(1e-5, session=vq) <= TARGET_EPS + 1e-6
    total = led.epsilon(1e-5)
    assert total == pytest.approx(epsilon_from_history(led.history(), 1e-5))
    ref = epsilon_integer_orders(led.history(), 1e-5)
    assert 0.9 * ref <= total <= 1.01 * ref, (total, ref)  # both jobs composed, by the independent reference
    assert led.epsilon(1e-5, session=vq) < total <= dp_run["budgets"]["site-1"]


def test_leak_audit_every_result_is_the_dp_mechanisms_output(dp_run):
    """Only expected keys leave site-1, and each update is exactly the replay of the DP optimiser's
    released (clipped + noised) gradients from the received weights; the released gradients carry at
    least the Gaussian noise σC/B they should."""
    from fl_app.fl.leak_audit import replay_round

    # written out here, not imported from the client: what docs/PRIVACY.md says a DP site releases
    allowed_metrics = RELEASED_METRICS
    allowed_meta = {"initial_metrics", NUM_SAMPLES_KEY}
    for kind, rounds in (("vqvae", VQ_ROUNDS), ("prior", PRIOR_ROUNDS)):
        sent = _records(dp_run["audit"] / kind / "site-1", "result")
        got = _records(dp_run["audit"] / kind / "site-1", "data")
        assert len(sent) == rounds and len(got) == rounds
        for rnd, (out, inp) in enumerate(zip(sent, got, strict=True)):
            received = {k: torch.as_tensor(v) for k, v in inp["dxo"]["data"].items()
                        if not k.startswith(FROZEN_PREFIX)}  # fmt: skip
            delta = out["dxo"]["data"]
            assert set(delta) == set(received), kind  # the model's own tensors, nothing else
            meta = out["dxo"]["meta"]
            assert set(meta) <= allowed_meta, set(meta) - allowed_meta
            assert meta[NUM_SAMPLES_KEY] == 1  # no data-dependent sample count
            assert set(meta["initial_metrics"]) <= allowed_metrics, (
                set(meta["initial_metrics"]) - allowed_metrics
            )
            assert "train_loss" not in meta["initial_metrics"]
            rec = torch.load(dp_run["audit"] / "optimizer" / "site-1" / kind / f"steps_{rnd:03d}.pt",
                             weights_only=False)  # fmt: skip
            assert len(rec["steps"]) == (VQ_STEPS if kind == "vqvae" else PRIOR_STEPS)
            replayed = replay_round(received, rec)
            for k, d in delta.items():
                want = replayed[k] - received[k].to(replayed[k].dtype)
                if k not in rec["param_order"]:  # buffers: data-independent, unchanged
                    assert not torch.as_tensor(d).any(), k
                else:
                    assert torch.allclose(torch.as_tensor(d).float(), want.float(), atol=1e-6, rtol=1e-5), k
            # released gradients: noise std per coordinate σC/B; ‖g‖² ≥ its expectation minus 6 sd
            s = rec["noise_multiplier"] * rec["max_grad_norm"] / rec["expected_batch_size"]
            for grads in rec["steps"]:
                d_all = sum(g.numel() for g in grads.values())
                sq = sum(float((g.double() ** 2).sum()) for g in grads.values())
                assert sq >= d_all * s**2 * (1 - 6 * math.sqrt(2 / d_all)), (sq, d_all * s**2)
            assert rec["noise_multiplier"] > 0.3


def test_server_dp_fedavg_and_privacy_report(dp_run, tmp_path):
    from fl_app.fl.server import read_checkpoint
    from fl_app.privacy.accountant import epsilon_from_history
    from fl_app.privacy.report import privacy_report

    ck = read_checkpoint(dp_run["run"] / "fl" / "vqvae")
    aggs = [h["aggregation"] for h in ck["history"]]
    assert all(a["name"] == "dp-fedavg" and a["sites"] == 1 for a in aggs)
    assert aggs[-1]["rounds"] == VQ_ROUNDS
    assert aggs[-1]["epsilon"] == pytest.approx(epsilon_from_history([(0.5, 1.0, VQ_ROUNDS)], 1e-5))
    exact = epsilon_analytic_gaussian(0.5, VQ_ROUNDS, 1e-5)  # the exact ε of σ = 0.5 over 2 full rounds
    assert exact <= aggs[-1]["epsilon"] <= 1.15 * exact
    rep = privacy_report(dp_run["run"], site_config_dir=dp_run["cfg_dir"])
    s1 = rep["sites"]["site-1"]
    assert s1["total_epsilon"] == pytest.approx(_ledger(dp_run["root"], "site-1").epsilon(1e-5))
    assert set(s1["jobs"]) == {"vqvae", "prior"}
    assert s1["jobs"]["vqvae"]["steps"] == VQ_ROUNDS * VQ_STEPS and s1["jobs"]["vqvae"]["rounds"] == VQ_ROUNDS
    assert rep["sites"]["site-2"]["total_epsilon"] == 0.0 and rep["sites"]["site-2"]["refusals"] == 3
    assert rep["server"]["vqvae"]["epsilon"] == pytest.approx(aggs[-1]["epsilon"])
    out = tmp_path / "rep.json"
    from fl_app.privacy.report import main as report_main

    assert report_main(["--run", str(dp_run["run"]), "--site-config-dir", str(dp_run["cfg_dir"]),
                        "--json", str(out)]) == 0  # fmt: skip
    assert json.loads(out.read_text())["sites"]["site-1"]["total_epsilon"] == pytest.approx(
        s1["total_epsilon"]
    )


def test_tensorboard_events_of_a_dp_site_hold_only_released_metrics(dp_run):
    """What the server's TensorBoard recorded for the DP site, read back: only the released names."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for kind, rounds in (("vqvae", VQ_ROUNDS), ("prior", PRIOR_ROUNDS)):
        tb = (
            dp_run["run"] / "nvflare" / "sim" / f"synthbrain-{kind}" / "server" / "simulate_job" / "tb_events"
        )
        acc = EventAccumulator(str(tb / "site-1"))
        acc.Reload()
        tags = set(acc.Tags()["scalars"])
        assert {"epsilon", "job_epsilon", "dp_noise_multiplier"} <= tags <= RELEASED_METRICS, tags
        assert [e.step for e in acc.Scalars("job_epsilon")] == list(range(rounds))
        assert acc.Scalars("job_epsilon")[-1].value <= TARGET_EPS + 1e-6


def test_privacy_report_update_card_through_the_cli(dp_run, capsys):
    from fl_app.cli import main
    from fl_app.global_model import write_global_model

    run = dp_run["run"]
    report = ["privacy", "report", "--run", str(run), "--site-config-dir", str(dp_run["cfg_dir"])]
    assert main([*report, "--update-card"]) == 1  # no global model yet: nothing to update, and it says so
    assert "no model card" in capsys.readouterr().err
    card_path = write_global_model(run) / "model_card.json"
    assert "report" not in json.loads(card_path.read_text())["privacy"]
    assert main([*report, "--update-card"]) == 0
    out = capsys.readouterr().out
    assert "site-1" in out and "TOTAL" in out
    card = json.loads(card_path.read_text())["privacy"]
    assert card["differential_privacy"] is True
    total = _ledger(dp_run["root"], "site-1").epsilon(1e-5)
    assert card["report"]["site_total_epsilon"] == {"site-1": pytest.approx(total), "site-2": 0.0}
    assert (
        card["report"]["server_epsilon"]["vqvae"] > 0 and card["report"]["sites"]["site-2"]["refusals"] == 3
    )

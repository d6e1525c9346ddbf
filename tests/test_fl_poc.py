"""POC on loopback: server + 2 clients from their startup kits, a job submitted through the admin API, waited
for, and every process the test started stopped by PID (also on failure)."""

from __future__ import annotations

import os

import pytest

from tests.test_fl_sim import make_sites

pytestmark = pytest.mark.slow


def _alive(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_poc_runs_a_job_and_stops_everything(tmp_path):
    from fl_app.fl import poc
    from fl_app.fl.run import run_job
    from fl_app.fl.server import read_checkpoint

    prof, cfg_dir, clients = make_sites(tmp_path, n_sites=2, n_subjects=4)
    ws = tmp_path / "poc"
    poc.prepare(ws, clients)
    site_env = {c: {"SYNTHBRAIN_SITE_CONFIG": str(cfg_dir / f"{c}.yaml")} for c in clients}
    pids = {}
    try:
        pids = poc.start(ws, clients, site_env)
        assert set(pids) == {"server", *clients}
        poc.wait_ready(ws, clients, timeout=180)
        res = run_job("vqvae", "poc", tmp_path / "run", profile=prof, clients=clients, num_rounds=1, max_steps=2,
                      site_config_dir=cfg_dir, poc_workspace=ws, timeout=400)  # fmt: skip
        assert res["job_id"]
        ck = read_checkpoint(tmp_path / "run" / "fl" / "vqvae")
        assert ck["round"] == 0 and set(ck["history"][0]["sites"]) == set(clients)
    finally:
        stopped = poc.stop(ws)
    assert sorted(stopped) == sorted(pids.values())
    assert not any(_alive(p) for p in pids.values())
    assert not poc.is_running(ws)

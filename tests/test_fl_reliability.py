"""Reliability on a real POC (loopback) and in the simulator: a site dropping out mid-round and rejoining,
the server crashing mid-job and the job resuming without counting a round twice in any privacy ledger,
and a scan that becomes unreadable between rounds.

One POC deployment (server + 3 sites from their startup kits, TINY profile, 1 DP-SGD step per round, local
DP at every site and DP-FedAvg on the server) is reused across the steps of one story:

A. job of 2 rounds with ``min_sites=2``; site-3's client (its process group and its job process) is killed
   as soon as round 0 is checkpointed, i.e. while round 1 is in flight: both rounds complete, the job
   finishes, round 1 records site-3 as missing;
B. site-3 is restarted from its startup kit and the job is resubmitted with 4 rounds: it resumes at round 2,
   where site-3 takes part again; the server is killed (SIGKILL) as soon as round 2 is checkpointed;
C. the server is restarted from its startup kit and the job resubmitted: it resumes at round 3 and finishes.

Every process the test starts is stopped by PID in ``finally``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.test_fl_sim import make_sites

pytestmark = pytest.mark.slow

ROUND_TIMEOUT = 20  # s a round waits for the third site once two have replied (covers start-up skew)
DROPPED = "site-3"


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait_for_round(ckpt_dir: Path, rnd: int, timeout: float, alive: Any = None) -> dict:
    """Poll the server checkpoint until round ``rnd`` is in it; returns the checkpoint."""
    from fl_app.fl.server import read_checkpoint

    deadline = time.time() + timeout
    while time.time() < deadline:
        if (ckpt_dir / "checkpoint.pt").exists():
            ck = read_checkpoint(ckpt_dir)
            if ck["round"] >= rnd:
                return ck
        if alive is not None and not alive():
            break
        time.sleep(0.2)
    raise TimeoutError(f"round {rnd} not checkpointed in {ckpt_dir} within {timeout:.0f} s")


def _ledger(cfg_dir: Path, site: str) -> list[Any]:
    from fl_app.config import load_site_config
    from fl_app.fl.local_dp import ledger_path
    from fl_app.privacy.accountant import PrivacyLedger

    cfg = load_site_config(cfg_dir / f"{site}.yaml")
    return PrivacyLedger(ledger_path(cfg), site).entries()


@pytest.fixture(scope="module")
def story(tmp_path_factory):
    from fl_app.config import load_site_config, write_site_yaml
    from fl_app.fl import poc
    from fl_app.fl.run import run_job
    from fl_app.privacy.dp_fedavg import dp_fedavg_strategy

    root = tmp_path_factory.mktemp("reliability")
    prof, cfg_dir, sim_sites = make_sites(root, n_sites=2, n_subjects=4)
    clients = [*sim_sites, DROPPED]  # the third site reads the first one's (read-only) data
    for c in clients:  # local DP-SGD at every site, with its ledger in its own cache folder
        data = load_site_config(cfg_dir / f"{sim_sites[0] if c == DROPPED else c}.yaml")
        write_site_yaml(
            cfg_dir / f"{c}.yaml",
            {"name": c, "bids_dir": str(data.bids_dir), "cache_dir": str(root / "cache" / c),
             "min_subjects": 2, "compute": {"device": "cpu", "num_threads": 1},
             "privacy": {"enabled": True, "noise_multiplier": 1.0, "epsilon_budget": 1000.0,
                         "release": ["accounting", "metrics"]}},
        )  # fmt: skip
    strategy, strategy_args = dp_fedavg_strategy(noise_multiplier=0.3, clip=0.5, seed=0)
    run = root / "run"
    ckpt = run / "fl" / "vqvae"
    ws = root / "poc"
    site_env = {c: {"SYNTHBRAIN_SITE_CONFIG": str(cfg_dir / f"{c}.yaml")} for c in clients}
    job = dict(profile=prof, clients=clients, max_steps=1, site_config_dir=cfg_dir, min_sites=2,
               round_timeout=ROUND_TIMEOUT, dp=True, strategy_path=strategy, strategy_args=strategy_args,
               poc_workspace=ws, timeout=300)  # fmt: skip
    out: dict[str, Any] = {
        "clients": clients,
        "cfg_dir": cfg_dir,
        "ckpt": ckpt,
        "run": run,
        "ws": ws,
        "seconds": {},
    }
    started: list[int] = []
    admin = None
    poc.prepare(ws, clients)
    try:
        started += poc.start(ws, clients, site_env).values()
        poc.wait_ready(ws, clients, timeout=180)

        # A: site-3 killed while round 1 is in flight
        t0 = time.time()
        res: dict[str, Any] = {}

        def _run_a() -> None:
            try:
                res["a"] = run_job("vqvae", "poc", run, num_rounds=2, **job)
            except BaseException as exc:  # reported by the main thread
                res["error"] = exc

        th = threading.Thread(target=_run_a, daemon=True)
        th.start()
        _wait_for_round(ckpt, 0, 240, th.is_alive)
        out["killed_pid"] = poc.pids(ws)[DROPPED]
        assert poc.stop_site(ws, DROPPED, kill=True) == out["killed_pid"]
        th.join(300)
        assert not th.is_alive(), "job A did not finish"
        if "error" in res:
            raise res["error"]
        out["a"] = res["a"]
        out["ckpt_a"] = _wait_for_round(ckpt, 1, 5)
        out["seconds"]["A"] = time.time() - t0

        # B: site-3 rejoins (restarted from its startup kit); the server crashes after round 2
        t0 = time.time()
        started.append(poc.start_site(ws, DROPPED, site_env[DROPPED]))
        poc.wait_ready(ws, clients, timeout=120)
        spec = root / "job_b.json"
        spec.write_text(json.dumps({**job, "cfg": str(cfg_dir), "ws": str(ws), "run": str(run)}, default=str))
        code = (
            "import json, sys; from fl_app.fl.run import run_job; a = json.load(open(sys.argv[1])); "
            "run_job('vqvae', 'poc', a.pop('run'), num_rounds=4, **{k: v for k, v in a.items() "
            "if k not in ('cfg', 'ws')})"
        )
        admin = subprocess.Popen(
            [sys.executable, "-c", code, str(spec)],
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait_for_round(ckpt, 2, 240, lambda: admin.poll() is None)
        out["server_pid_killed"] = poc.pids(ws)["server"]
        assert poc.stop_server(ws, kill=True) == out["server_pid_killed"]
        out["ckpt_b"] = _wait_for_round(ckpt, 2, 5)
        out["seconds"]["B"] = time.time() - t0

        # C: server restarted from its startup kit; the job resubmitted resumes at round 3
        t0 = time.time()
        started.append(poc.start_server(ws))
        poc.wait_ready(ws, clients, timeout=180)
        out["c"] = run_job("vqvae", "poc", run, num_rounds=4, **job)
        out["seconds"]["C"] = time.time() - t0
    finally:
        if admin is not None and admin.poll() is None:
            os.killpg(admin.pid, signal.SIGKILL)
        if admin is not None:
            admin.wait(timeout=30)
        out["stopped"] = poc.stop(ws)
    out["started"] = started
    out["ledgers"] = {c: _ledger(cfg_dir, c) for c in clients}
    print("reliability story seconds:", {k: round(v) for k, v in out["seconds"].items()})
    return out


def test_dropout_round_completes_and_records_missing_site(story):
    h = story["ckpt_a"]["history"]
    assert [r["round"] for r in h] == [0, 1]
    assert h[0]["contributing_sites"] == story["clients"] and h[0]["missing_sites"] == []
    # round 1 went on without the killed site, and says so
    assert h[1]["contributing_sites"] == [c for c in story["clients"] if c != DROPPED]
    assert h[1]["missing_sites"] == [DROPPED]
    assert DROPPED in h[1]["targeted_sites"]
    assert story["a"]["job_id"]
    assert not _group_alive(story["killed_pid"])


def test_killed_site_rejoins_a_later_round(story):
    from fl_app.fl.server import read_checkpoint
    from fl_app.global_model import model_card

    h = read_checkpoint(story["ckpt"])["history"]
    r2 = h[2]
    assert r2["job_started_at_round"] == 2  # a resubmitted job resumed after the finished one
    assert r2["contributing_sites"] == story["clients"] and r2["missing_sites"] == []
    card = model_card(story["run"])
    by_round = {r["round"]: r for r in card["jobs"]["vqvae"]["participation"]}
    assert by_round[1]["missing_sites"] == [DROPPED] and by_round[2]["missing_sites"] == []


def test_server_restart_resumes_and_counts_no_round_twice(story):
    from fl_app.fl.server import read_checkpoint

    ck = read_checkpoint(story["ckpt"])
    h = ck["history"]
    assert ck["round"] == 3 and [r["round"] for r in h] == [0, 1, 2, 3]  # each round once
    # round 3 ran in the job resumed after the crash
    assert [r["job_started_at_round"] for r in h] == [0, 0, 2, 3]
    # what was checkpointed before the crash is kept as it was
    assert json.dumps(h[:3], default=str) == json.dumps(story["ckpt_b"]["history"], default=str)
    assert h[3]["missing_sites"] == []
    # server-side DP-FedAvg accounting: one noised aggregate per completed round, none for the lost attempt
    assert h[-1]["aggregation"]["name"] == h[0]["aggregation"]["name"]
    assert [r["aggregation"]["rounds"] for r in h] == [1, 2, 3, 4]
    # site ledgers: a completed round is never run (nor spent) again; the round in flight at the crash is
    # spent once by the resumed job and at most once more by the attempt whose update may have been released
    job_c = story["c"]["job_id"]
    for site, entries in story["ledgers"].items():
        rounds_c = sorted(e.round for e in entries if e.job_id == job_c)
        assert rounds_c == [3], (site, rounds_c)
        keys = [(e.session, e.round) for e in entries]
        assert len(keys) == len(set(keys)), site
        for r in h[:3]:
            n = sum(1 for e in entries if e.round == r["round"])
            # a site that missed a round spent nothing on it, or once if it was killed after sending
            assert n == 1 if site in r["contributing_sites"] else n <= 1, (site, r["round"], n)
        at_crash = [e for e in entries if e.round == 3]
        assert 1 <= len(at_crash) <= 2 and len({e.session for e in at_crash}) == len(at_crash), site
        assert all(e.steps >= 1 for e in entries)


def test_every_process_stopped(story):
    from fl_app.fl import poc

    for pid in story["started"]:
        assert not _group_alive(pid), pid
    assert not poc.is_running(story["ws"])


def test_file_unreadable_mid_job_is_skipped_and_counted(tmp_path):
    """Simulator: after round 0, one training scan of site-1 is truncated (its preprocessed copy is still
    in the cache); the client excludes it, reports the count only, and keeps training on the others."""
    from fl_app.config import load_site_config
    from fl_app.data.cohort import read_cohort
    from fl_app.data.dataset import split_indices
    from fl_app.fl.server import read_checkpoint

    prof, cfg_dir, clients = make_sites(tmp_path, n_sites=2, n_subjects=4)
    cfg = load_site_config(cfg_dir / "site-1.yaml")
    subjects = read_cohort(cfg).valid()
    train_idx, _ = split_indices(len(subjects), prof["train"]["val_fraction"], 0)
    victim = subjects[train_idx[0]]
    run = tmp_path / "run"
    ckpt = run / "fl" / "vqvae"
    args = tmp_path / "job.json"
    args.write_text(json.dumps({"profile": prof, "clients": clients, "cfg": str(cfg_dir), "run": str(run)}))
    code = (
        "import json, sys; from fl_app.fl.run import run_job; a = json.load(open(sys.argv[1])); "
        "run_job('vqvae', 'sim', a['run'], profile=a['profile'], clients=a['clients'], num_rounds=3, "
        "site_config_dir=a['cfg'])"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(args)], start_new_session=True)
    try:
        _wait_for_round(ckpt, 0, 240, lambda: proc.poll() is None)
        with open(victim.image, "r+b") as fh:  # readable when the job started, broken from now on
            fh.truncate(200)
        assert proc.wait(timeout=240) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    ck = read_checkpoint(ckpt)
    h = ck["history"]
    assert [r["round"] for r in h] == [0, 1, 2] and all(r["missing_sites"] == [] for r in h)
    s1 = [r["sites"]["site-1"] for r in h]
    s2 = [r["sites"]["site-2"] for r in h]
    assert s1[0]["unreadable_subjects"] == 0 and s1[0]["num_samples"] == 3
    assert s1[-1]["unreadable_subjects"] == 1  # reported by the end of the job at the latest
    assert s1[-1]["num_samples"] == 2  # trained on the two readable training scans
    assert all(m["unreadable_subjects"] == 0 and m["num_samples"] == 3 for m in s2)
    assert all(m["skipped_subjects"] == 0 for m in s1 + s2)
    assert victim.participant_id not in json.dumps(h, default=str)  # a count, never which subject

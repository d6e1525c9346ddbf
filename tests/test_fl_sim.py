"""Both federated jobs in NVFlare's simulator at a tiny size, and resume after the server is stopped mid-job.

Tiny: 2 simulated sites × 4 subjects, 32³ volumes at 6 mm, a 2-level VQ-VAE with 8/16 channels, a 1-layer
prior. Each NVFlare simulator run costs ~30 s on 2 cores (process start-up dominates).
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fl_app.config import load_profile
from fl_app.fl.poc import descendants

pytestmark = pytest.mark.slow

TINY = {
    "data": {"shape": [32, 32, 32], "spacing": [6.0, 6.0, 6.0]},
    "vqvae": {
        "channels": [8, 16],
        "num_res_channels": [8, 16],
        "num_embeddings": 32,
        "embedding_dim": 8,
        "warmup_steps": 4,
    },  # jobs of a few dozen steps per site: a short warm-up
    "prior": {"d_model": 32, "n_layers": 1, "n_heads": 2},
    "train": {"batch_size": 2, "lr": 0.003},
}


def make_sites(root: Path, n_sites: int = 2, n_subjects: int = 4) -> tuple[dict, Path, list[str]]:
    """Simulated BIDS sites + their site YAMLs; returns (profile dict, site-config folder, site names)."""
    from fl_app.config import write_site_yaml
    from fl_app.data.simulate import simulate_sites

    prof = load_profile("cpu-demo", TINY)
    sites = simulate_sites(root / "data", n_sites, n_subjects, prof, seed=0)
    cfg_dir = root / "site_configs"
    for p in sites:
        write_site_yaml(
            cfg_dir / f"{p.name}.yaml",
            {"name": p.name, "bids_dir": str(p), "cache_dir": str(root / "cache" / p.name), "min_subjects": 2,
             "compute": {"device": "cpu", "num_threads": 1}},
        )  # fmt: skip
    return prof.model_dump(mode="json"), cfg_dir, [p.name for p in sites]


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    from fl_app.fl.run import run_job

    root = tmp_path_factory.mktemp("fl")
    prof, cfg_dir, clients = make_sites(root)
    run = root / "run"
    common = dict(profile=prof, clients=clients, site_config_dir=cfg_dir)
    run_job("vqvae", "sim", run, num_rounds=3, max_steps=16, **common)
    run_job("prior", "sim", run, num_rounds=2, max_steps=6, **common)
    return {"root": root, "run": run, "profile": prof, "cfg_dir": cfg_dir, "clients": clients}


def _site_val_psnr(vqvae_path: Path, cfg_dir: Path, clients: list[str]) -> float:
    """Mean PSNR of a VQ-VAE on the sites' own validation splits (the split the clients use)."""
    from fl_app.demo import final_vqvae_on_sites

    per_site = final_vqvae_on_sites(vqvae_path, cfg_dir, clients)
    return sum(m["psnr_db"] for m in per_site.values()) / len(per_site)


def test_vqvae_job_improves_global_reconstruction(fed):
    from fl_app.fl.server import read_checkpoint

    ck = read_checkpoint(fed["run"] / "fl" / "vqvae")
    assert ck["round"] == 2
    hist = ck["history"]
    assert [h["round"] for h in hist] == [0, 1, 2]
    assert set(hist[0]["sites"]) == set(fed["clients"])
    for h in hist:  # every site reported its samples and metrics every round
        for m in h["sites"].values():
            # (the total loss can go negative: the anti-collapse entropy term enters it with a minus sign)
            assert m["num_samples"] > 0 and m["train_image_loss"] > 0 and math.isfinite(m["train_loss"])
    initial = hist[0]["metrics"]["global_val_psnr_db"]  # the untrained global model, on held-out volumes
    final = _site_val_psnr(fed["run"] / "fl" / "vqvae" / "global_vqvae.pt", fed["cfg_dir"], fed["clients"])
    assert final > initial + 0.5, (initial, final)
    assert hist[-1]["metrics"]["global_val_psnr_db"] > initial


def test_tensorboard_events_hold_each_sites_metrics_every_round(fed):
    """The server's TensorBoard events (NVFlare tracking), read back: one folder per site, every metric the
    site sent in every round, at the round as step, with the value the server's history recorded."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from fl_app.fl.server import read_checkpoint

    hist = read_checkpoint(fed["run"] / "fl" / "vqvae")["history"]
    tb = fed["run"] / "nvflare" / "sim" / "synthbrain-vqvae" / "server" / "simulate_job" / "tb_events"
    assert sorted(p.name for p in tb.iterdir()) == sorted(fed["clients"])
    for site in fed["clients"]:
        acc = EventAccumulator(str(tb / site))
        acc.Reload()
        tags = set(acc.Tags()["scalars"])
        assert {"train_loss", "train_image_loss", "num_subjects"} <= tags, tags
        for tag in tags:
            events = acc.Scalars(tag)
            assert [e.step for e in events] == [0, 1, 2], (site, tag)
            for e in events:
                assert e.value == pytest.approx(hist[e.step]["sites"][site][tag], rel=1e-6, abs=1e-6), (
                    site,
                    tag,
                )


def test_prior_job_used_the_vqvae_of_the_first_job(fed):
    from fl_app.fl.client import state_checksum
    from fl_app.fl.server import FROZEN_PREFIX, read_checkpoint
    from fl_app.models.prior import load_prior
    from fl_app.models.vqvae import load_vqvae

    vq, _ = load_vqvae(fed["run"] / "fl" / "vqvae" / "global_vqvae.pt")
    want = state_checksum(vq.state_dict())
    ck = read_checkpoint(fed["run"] / "fl" / "prior")
    assert ck["round"] == 1
    for h in ck["history"]:
        for site, m in h["sites"].items():
            assert m["vqvae_checksum"] == pytest.approx(want, rel=1e-9), site
    frozen = {k[len(FROZEN_PREFIX) :]: v for k, v in ck["params"].items() if k.startswith(FROZEN_PREFIX)}
    for k, v in vq.state_dict().items():  # shipped unchanged through both rounds
        assert torch.equal(frozen[k], v), k
    prior, prof = load_prior(fed["run"] / "fl" / "prior" / "global_prior.pt")
    assert prof.code_shape == (8, 8, 8) and prior.num_codes == 32


def test_global_model_dir_and_bundle(fed):
    import json

    from monai.bundle import ConfigParser

    from fl_app.global_model import write_global_model

    g = write_global_model(fed["run"])
    card = json.loads((g / "model_card.json").read_text())
    assert set(card["sites"]) == set(fed["clients"])
    assert card["num_subjects"] == 8
    assert card["jobs"]["vqvae"]["rounds"] == 3 and card["jobs"]["prior"]["rounds"] == 2
    assert card["privacy"]["differential_privacy"] is False
    parser = ConfigParser()
    parser.read_config(str(g / "bundle" / "configs" / "inference.json"))
    parser["bundle_root"] = str(g / "bundle")
    parser["num_samples"] = 1
    img = parser.get_parsed_content("generate")
    assert img.shape == (1, 1, 32, 32, 32)
    meta = json.loads((g / "bundle" / "configs" / "metadata.json").read_text())
    assert meta["network_data_format"]["outputs"]["pred"]["spatial_shape"] == [32, 32, 32]


def test_resume_after_server_stop(fed, tmp_path):
    """Kill the whole simulator after round 0's checkpoint; the job run again continues at round 1."""
    from fl_app.fl.run import run_job
    from fl_app.fl.server import read_checkpoint

    run = tmp_path / "run"
    ckpt = run / "fl" / "vqvae"
    code = (
        "import sys, json; from fl_app.fl.run import run_job; "
        f"run_job('vqvae', 'sim', {str(run)!r}, profile=json.loads(sys.argv[1]), clients={fed['clients']!r}, "
        f"num_rounds=3, max_steps=4, site_config_dir={str(fed['cfg_dir'])!r})"
    )
    import json

    proc = subprocess.Popen(
        [sys.executable, "-c", code, json.dumps(fed["profile"])],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    killed_at = None
    try:
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None:
            ck = read_checkpoint(ckpt) if (ckpt / "checkpoint.pt").exists() else None
            if ck is not None and ck["round"] >= 0:
                killed_at = ck["round"]
                break
            time.sleep(0.5)
    finally:
        _kill_tree(proc)
    assert killed_at is not None and killed_at < 2, "the job should have been stopped mid-way"
    first = read_checkpoint(ckpt)
    run_job("vqvae", "sim", run, profile=fed["profile"], clients=fed["clients"], num_rounds=3, max_steps=4,
            site_config_dir=fed["cfg_dir"])  # fmt: skip
    ck = read_checkpoint(ckpt)
    rounds = [h["round"] for h in ck["history"]]
    assert rounds == [0, 1, 2]
    done_before = first["round"]
    assert all(h["job_started_at_round"] == 0 for h in ck["history"][: done_before + 1])
    assert all(h["job_started_at_round"] == done_before + 1 for h in ck["history"][done_before + 1 :])
    assert ck["history"][0]["metrics"] == first["history"][0]["metrics"]


def _kill_tree(proc: subprocess.Popen) -> None:
    """End the process group we started and any simulator workers it spawned (by their PIDs)."""
    children = descendants(proc.pid)
    for pid in [proc.pid, *children]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)
    time.sleep(1)

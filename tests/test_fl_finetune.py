"""Jobs that start from a checkpoint (``--init``) and DP fine-tuning of a declared subset, in NVFlare's
simulator at the tiny size of tests/test_fl_sim.py (2 sites × 4 subjects, 32³).

* ``--init PATH``: round 0 of each job starts from the checkpoint -- the round-0 global metric each site
  reports (the received model on its own validation split) equals the checkpoint's own on the same data.
* DP fine-tuning of ``finetune.vqvae: [decoder_last]``: the DP site sends only the declared trainable tensors,
  each round's release passes the leak audit (every sent tensor updated by the DP optimiser, replayed from
  the released gradients, every frozen tensor byte-identical to the checkpoint), and the final global model's
  frozen tensors are the checkpoint's.
"""

from __future__ import annotations

import pytest
import torch
import yaml

from tests.test_finetune import _checkpoint_dir
from tests.test_fl_sim import make_sites

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]

TRAINABLE = ["decoder_last"]
DP_ROUNDS, DP_STEPS = 2, 3


@pytest.fixture(scope="module")
def ft(tmp_path_factory):
    import os

    from fl_app.fl.leak_audit import AUDIT_ENV, ResultAuditFilter
    from fl_app.fl.run import run_job

    root = tmp_path_factory.mktemp("ft")
    prof, cfg_dir, clients = make_sites(root, 2, 4)
    ck = root / "checkpoint"
    ck.mkdir()
    from fl_app.config import profile_from_dict

    _checkpoint_dir(ck, profile_from_dict(prof))
    common = dict(profile=prof, clients=clients, site_config_dir=cfg_dir, init=str(ck))
    run_job("vqvae", "sim", root / "init", num_rounds=1, max_steps=2, **common)
    run_job(
        "prior", "sim", root / "init", num_rounds=1, max_steps=2, frozen_vqvae=str(ck / "vqvae.pt"), **common
    )
    # DP fine-tuning: both sites run DP-SGD on the decoder's last blocks only
    dp_cfg = root / "site_configs_dp"
    dp_cfg.mkdir()
    for c in clients:
        d = yaml.safe_load((cfg_dir / f"{c}.yaml").read_text())
        d["privacy"] = {"enabled": True, "epsilon_budget": 20.0, "max_grad_norm": 1.0, "delta": 1e-5}
        d["cache_dir"] = str(root / "cache_dp" / c)
        (dp_cfg / f"{c}.yaml").write_text(yaml.safe_dump(d))
    audit = root / "audit"
    os.environ[AUDIT_ENV] = str(audit / "optimizer")
    try:
        run_job("vqvae", "sim", root / "dpft", num_rounds=DP_ROUNDS, max_steps=DP_STEPS, dp_epsilon=8.0,
                profile={**prof, "finetune": {"vqvae": TRAINABLE, "prior": ["all"]}}, clients=clients,
                site_config_dir=dp_cfg, init=str(ck),
                result_filters=[ResultAuditFilter(str(audit / "vqvae"))],
                data_filters=[ResultAuditFilter(str(audit / "vqvae"), direction="data")])  # fmt: skip
    finally:
        os.environ.pop(AUDIT_ENV, None)
    return {"root": root, "ck": ck, "cfg_dir": cfg_dir, "clients": clients, "profile": prof, "audit": audit}


def test_vqvae_job_round0_starts_from_the_checkpoint(ft):
    from fl_app.demo import final_vqvae_on_sites
    from fl_app.fl.server import read_checkpoint

    hist = read_checkpoint(ft["root"] / "init" / "fl" / "vqvae")["history"]
    own = final_vqvae_on_sites(ft["ck"] / "vqvae.pt", ft["cfg_dir"], ft["clients"])
    for site in ft["clients"]:
        got = hist[0]["sites"][site]["global_val_psnr_db"]
        assert got == pytest.approx(own[site]["psnr_db"], rel=1e-5, abs=1e-4), site


def test_prior_job_round0_starts_from_the_checkpoint(ft):
    from fl_app.config import load_site_config
    from fl_app.data.dataset import split_indices
    from fl_app.fl.client import open_site_dataset
    from fl_app.fl.server import read_checkpoint
    from fl_app.models.prior import load_prior
    from fl_app.models.vqvae import load_vqvae
    from fl_app.train.prior_local import encode_codes, evaluate_prior, make_prior_loader

    hist = read_checkpoint(ft["root"] / "init" / "fl" / "prior")["history"]
    vq, prof = load_vqvae(ft["ck"] / "vqvae.pt")
    prior, _ = load_prior(ft["ck"] / "prior.pt")
    for site in ft["clients"]:  # what the site's client evaluates in round 0, with the checkpoint's prior
        codes = encode_codes(vq, open_site_dataset(load_site_config(ft["cfg_dir"] / f"{site}.yaml"), prof))
        _, val_idx = split_indices(len(codes), prof.train.val_fraction, 0)
        loader = make_prior_loader(codes.subset(val_idx), prof.train.batch_size, shuffle=False)
        want = evaluate_prior(prior, loader)["bits_per_code"]
        assert hist[0]["sites"][site]["global_val_bits_per_code"] == pytest.approx(want, rel=1e-5), site


def test_model_card_records_init_and_trainable_subset(ft):
    import json

    from fl_app.global_model import write_global_model

    card = json.loads((write_global_model(ft["root"] / "dpft") / "model_card.json").read_text())
    job = card["jobs"]["vqvae"]
    assert job["init"] == str(ft["ck"]) and job["trainable"] == TRAINABLE


def test_dp_fine_tune_sends_only_trainable_tensors_and_passes_the_leak_audit(ft):
    from fl_app.config import profile_from_dict
    from fl_app.fl.leak_audit import finetune_release_problems, replay_round
    from fl_app.fl.server import read_checkpoint
    from fl_app.models.finetune import trainable_names
    from fl_app.models.vqvae import build_vqvae

    prof = profile_from_dict(ft["profile"])
    trainable = trainable_names(build_vqvae(prof, dp=True), TRAINABLE)
    ck_state = torch.load(ft["ck"] / "vqvae.pt", weights_only=True)["state_dict"]
    assert 0 < len(trainable) < len(ck_state)
    for site in ft["clients"]:
        d = ft["audit"] / "vqvae" / site
        sent = [torch.load(p, weights_only=False) for p in sorted(d.glob("result_*.pt"))]
        got = [torch.load(p, weights_only=False) for p in sorted(d.glob("data_*.pt"))]
        assert len(sent) == len(got) == DP_ROUNDS
        for rnd, (out, inp) in enumerate(zip(sent, got, strict=True)):
            delta = {k: torch.as_tensor(v) for k, v in out["dxo"]["data"].items()}
            received = {k: torch.as_tensor(v) for k, v in inp["dxo"]["data"].items()}
            assert sorted(delta) == sorted(trainable), site  # only the declared subset left the site
            rec = torch.load(
                ft["audit"] / "optimizer" / site / "vqvae" / f"steps_{rnd:03d}.pt", weights_only=False
            )
            assert sorted(rec["param_order"]) == sorted(trainable)  # Opacus saw only the trainable tensors
            assert finetune_release_problems(delta, received, ck_state, trainable, rec) == []
            replayed = replay_round(received, rec)
            for k, v in delta.items():
                assert torch.allclose(v.float(), (replayed[k] - received[k]).float(), atol=1e-6, rtol=1e-5), k
    final = read_checkpoint(ft["root"] / "dpft" / "fl" / "vqvae")["params"]
    frozen = [k for k in ck_state if k not in trainable]
    assert all(
        torch.equal(torch.as_tensor(final[k]), ck_state[k]) for k in frozen
    )  # the server merged a part
    assert all(not torch.equal(torch.as_tensor(final[k]), ck_state[k]) for k in trainable)

"""``synthbrain pretrain``: a central run on simulated data that writes a complete global-model directory."""

from __future__ import annotations

import json

from fl_app.cli import main
from fl_app.data.nifti import file_sha256
from fl_app.global_model import load_global_model
from fl_app.pretrain import PRETRAIN_SEED


def test_pretrain_writes_a_global_model_with_a_verifiable_card(tmp_path) -> None:
    out = tmp_path / "pre"
    argv = [
        "pretrain",
        "--out",
        str(out),
        "--sites",
        "1",
        "--subjects-per-site",
        "5",
        "--vqvae-steps",
        "2",
        "--prior-steps",
        "2",
        "--set",
        "data.shape=[32,32,32]",
        "--set",
        "data.spacing=[6,6,6]",
        "--set",
        "vqvae.channels=[8,8]",
        "--set",
        "vqvae.num_res_channels=[8,8]",
        "--prior-set",
        "prior.d_model=32",
        "--prior-set",
        "prior.n_layers=1",
    ]
    rc = main(argv)
    assert rc == 0
    gdir = out / "global"
    card = json.loads((gdir / "model_card.json").read_text())
    assert card["command"].startswith("synthbrain pretrain --out")
    assert card["data"]["seed"] == PRETRAIN_SEED and card["data"]["subjects_per_site"] == 5
    assert card["vqvae"]["steps"] == 2 and card["prior"]["steps"] == 2
    assert card["vqvae"]["n_train"] + card["vqvae"]["n_val"] == 5
    assert "psnr_db" in card["vqvae"]["held_out"] and "bits_per_code" in card["prior"]["held_out"]
    for name, digest in card["weights_sha256"].items():
        assert file_sha256(gdir / name) == digest
    assert card["wall_seconds"]["total"] >= card["wall_seconds"]["vqvae"] > 0
    gm = load_global_model(gdir, device="cpu")  # the sampler's loader accepts it as a global model
    assert tuple(gm.prior.code_shape) == (8, 8, 8)
    # resuming the VQ-VAE stage adds to its history: the card lists both commands and the total steps
    more = [*argv, "--resume"]
    more[more.index("--vqvae-steps") + 1] = "3"
    assert main(more) == 0
    card = json.loads((gdir / "model_card.json").read_text())
    assert [st["steps"] for st in card["vqvae"]["stages"]] == [2, 3] and card["vqvae"]["steps"] == 5
    assert len(card["commands"]) == 2 and card["commands"][1].endswith("--resume")
    assert file_sha256(gdir / "vqvae.pt") == card["weights_sha256"]["vqvae.pt"]
    # continuing the prior alone, with the condition added at every position: the same simulated data is
    # reused (not rewritten), the VQ-VAE is untouched, and the prior's history grows
    t1w = next((out / "data").rglob("*_T1w.nii.gz"))
    mtime, vq_hash = t1w.stat().st_mtime_ns, card["weights_sha256"]["vqvae.pt"]
    argv_prior = [*argv, "--skip-vqvae", "--prior-resume", "--prior-set", "prior.cond_every_position=true"]
    assert main(argv_prior) == 0
    card = json.loads((gdir / "model_card.json").read_text())
    assert t1w.stat().st_mtime_ns == mtime
    assert card["weights_sha256"]["vqvae.pt"] == vq_hash and card["vqvae"]["steps"] == 5
    assert [st["steps"] for st in card["prior"]["stages"]] == [2, 2] and card["prior"]["steps"] == 4
    assert card["commands"][-1].endswith("prior.cond_every_position=true") and len(card["commands"]) == 3
    assert load_global_model(gdir, device="cpu").prior.cond_proj is not None


def test_the_shipped_checkpoint_loads_and_matches_its_card() -> None:
    """The package's cpu-demo checkpoint: present, small, hashes equal to its card's, loadable as a global
    model, and its card's command is a ``synthbrain pretrain`` command line on the reserved seed."""
    import argparse
    import shlex

    from fl_app.models.pretrained import pretrained_dir
    from fl_app.pretrain import add_pretrain_parser

    gdir = pretrained_dir("cpu-demo")
    card = json.loads((gdir / "model_card.json").read_text())
    assert set(card["weights_sha256"]) == {"vqvae.pt", "prior.pt"}
    for name, digest in card["weights_sha256"].items():
        assert file_sha256(gdir / name) == digest, f"{gdir / name} differs from its model card"
    assert sum(p.stat().st_size for p in gdir.iterdir()) < 50 * 2**20
    gm = load_global_model(gdir, device="cpu")
    assert gm.profile.vqvae.quantiser == card["vqvae"]["quantiser"]
    assert tuple(gm.prior.code_shape) == tuple(s // 4 for s in gm.profile.data.shape)
    argv = shlex.split(card["command"])
    assert argv[:2] == ["synthbrain", "pretrain"]
    p = argparse.ArgumentParser()
    add_pretrain_parser(p.add_subparsers())
    args = p.parse_args(argv[1:])
    assert args.seed == PRETRAIN_SEED == card["data"]["seed"] and not args.bids
    assert card["prior"]["stages"][-1]["steps"] == args.prior_steps
    assert card["prior"]["steps"] == sum(st["steps"] for st in card["prior"]["stages"]) > 0
    assert card["vqvae"]["steps"] == sum(st["steps"] for st in card["vqvae"]["stages"]) > 0
    assert card["commands"][-1] == card["command"]

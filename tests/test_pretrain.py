"""``synthbrain pretrain``: a central run on simulated data that writes a complete global-model directory."""

from __future__ import annotations

import json

from fl_app.cli import main
from fl_app.data.nifti import file_sha256
from fl_app.global_model import load_global_model
from fl_app.pretrain import PRETRAIN_SEED


def test_pretrain_writes_a_global_model_with_a_verifiable_card(tmp_path) -> None:
    out = tmp_path / "pre"
    rc = main(
        [
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
    )
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

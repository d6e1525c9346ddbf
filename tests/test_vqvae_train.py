"""Local (non-DP) VQ-VAE training, evaluation and the train-local CLI (tiny shapes, CPU)."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

from fl_app.config import parse_overrides, profile_from_dict
from fl_app.models.vqvae import build_vqvae, load_vqvae, make_input
from fl_app.train.vqvae_local import (
    add_train_local_vqvae_parser,
    build_discriminator,
    evaluate_vqvae,
    make_optimizer,
    make_vqvae_loader,
    train_vqvae_local,
)


def tiny_profile(**vq):
    cfg = {"channels": [8, 8], "num_res_channels": [8, 8], "num_res_layers": 1, "num_embeddings": 32}
    cfg.update({"embedding_dim": 4, **vq})
    return profile_from_dict(
        {
            "name": "tiny",
            "data": {"shape": [16, 16, 16], "spacing": [3, 3, 3]},
            "vqvae": cfg,
            "train": {"lr": 3e-3, "batch_size": 2},
        }
    )


def blobs(n=6, seed=0):
    """Smooth synthetic 'brains': nested spheres (WM inside GM inside CSF) of random radius."""
    g = torch.Generator().manual_seed(seed)
    ax = torch.arange(16) - 7.5
    r = (ax[:, None, None] ** 2 + ax[None, :, None] ** 2 + ax[None, None, :] ** 2).sqrt()
    items = []
    for _ in range(n):
        s = 5 + 2 * torch.rand(1, generator=g).item()
        label = torch.zeros(16, 16, 16, dtype=torch.long)
        label[r < s] = 1
        label[r < s - 1.5] = 2
        label[r < s - 3.0] = 3
        image = torch.tensor([0.0, 0.3, 0.6, 0.9])[label][None]
        items.append({"image": image, "label": label, "has_label": torch.tensor(True)})
    return items


def _planted_dead_code_run(restart: bool) -> tuple[dict, torch.Tensor, int]:
    """One step with a planted dead code: an exact duplicate of code 0 at the last index, which no encoder
    output can reach (the nearest-code search returns the first of equal distances). The learning rate is
    zero, so the encoder is fixed and the outputs it restarts from are the ones re-encoded afterwards.
    Returns the run's result, the codes of the batch afterwards and the planted index."""
    torch.manual_seed(0)
    p = tiny_profile(quantiser="loss", dead_code_every=1, warmup_steps=0)
    model = build_vqvae(p)
    weight = model.codebook.embedding.weight
    planted = weight.shape[0] - 1
    with torch.no_grad():
        weight[planted] = weight[0]
    loader = make_vqvae_loader(blobs(2), 2, shuffle=False)
    batch = next(iter(loader))
    x = make_input(batch["image"], batch["label"], model.joint)
    with torch.no_grad():
        assert int((model.codebook.quantize(model.encoder_output(x))[2] == planted).sum()) == 0
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    res = train_vqvae_local(model, loader, p, optimizer=opt, max_steps=1, dead_code_restart=restart)
    with torch.no_grad():
        codes = model.codebook.quantize(model.encoder_output(x))[2]
    return res, codes, planted


def test_dead_code_restart_moves_a_planted_dead_code_into_use() -> None:
    res, codes, planted = _planted_dead_code_run(restart=True)
    assert res["epochs"][0]["dead_codes_restarted"] >= 1
    assert int((codes == planted).sum()) >= 1  # re-seeded from an encoder output, which now maps to it
    res, codes, planted = _planted_dead_code_run(restart=False)
    assert res["epochs"][0]["dead_codes_restarted"] == 0
    assert int((codes == planted).sum()) == 0


def test_training_learns_images_and_labels() -> None:
    torch.manual_seed(0)
    p = tiny_profile(quantiser="loss", dead_code_every=5, recon_loss="l1+l2")
    model = build_vqvae(p)
    data = blobs()
    loader = make_vqvae_loader(data, 2, shuffle=True)
    val_loader = make_vqvae_loader(data, 3, False)
    before = evaluate_vqvae(model, val_loader)
    empty = {"image": torch.empty(0, 1, 16, 16, 16), "label": torch.empty(0, 16, 16, 16, dtype=torch.long)}
    opt = make_optimizer(model, p, lr=1e-2)
    # an empty batch is skipped without a step outside DP
    res = train_vqvae_local(model, [*loader, empty], p, optimizer=opt, epochs=1)
    assert res["empty_batches"] == 1 and res["steps"] == 3 and not res["dp"]
    first = res["epochs"][0]["loss"]
    res = train_vqvae_local(model, loader, p, optimizer=opt, epochs=30, val_loader=val_loader)
    assert res["steps"] == 30 * 3 and res["train_volumes"] == 30 * 6
    last = res["epochs"][-1]
    assert last["loss"] < 0.5 * first
    val = last["val"]
    for key in ("psnr_db", "ssim", "ms_ssim", "dice_mean", "codebook_perplexity", "codebook_usage"):
        assert math.isfinite(val[key]), key
    assert val["n_volumes"] == 6
    assert 1.0 <= val["codebook_perplexity"] <= 32
    # it learned something: PSNR up by > 5 dB, tissue Dice well above chance
    assert val["psnr_db"] > before["psnr_db"] + 5, (before["psnr_db"], val["psnr_db"])
    assert val["dice_mean"] > 0.3 and val["ms_ssim"] > 0.5


def test_step_budget_and_image_only_evaluation() -> None:
    torch.manual_seed(0)
    p = tiny_profile()
    model = build_vqvae(p, joint=False)
    loader = make_vqvae_loader(blobs(4), 2, shuffle=False)
    res = train_vqvae_local(model, loader, p, optimizer=make_optimizer(model, p), max_steps=3)
    assert res["steps"] == 3
    ev = evaluate_vqvae(model, loader)
    assert math.isnan(ev["dice_mean"]) and math.isfinite(ev["psnr_db"])


def test_adversarial_term_trains_discriminator() -> None:
    torch.manual_seed(0)
    p = tiny_profile(adv_weight=0.1)
    model = build_vqvae(p)
    disc = build_discriminator(p, channels=4, num_layers=2)
    before = [q.detach().clone() for q in disc.parameters()]
    loader = make_vqvae_loader(blobs(4), 2, shuffle=False)
    res = train_vqvae_local(
        model,
        loader,
        p,
        optimizer=make_optimizer(model, p),
        max_steps=2,
        discriminator=disc,
        disc_optimizer=torch.optim.Adam(disc.parameters(), lr=1e-3),
    )
    assert res["steps"] == 2
    assert any(not torch.equal(a, b) for a, b in zip(before, disc.parameters(), strict=True))


def test_parse_overrides() -> None:
    assert parse_overrides(["vqvae.num_embeddings=64", "train.lr=1e-4", "vqvae.channels=[8, 16]"]) == {
        "vqvae": {"num_embeddings": 64, "channels": [8, 16]},
        "train": {"lr": 1e-4},
    }


def test_train_local_cli_on_simulated_sites(tmp_path) -> None:
    from fl_app.config import load_profile
    from fl_app.data.simulate import simulate_sites

    # a coarse custom profile keeps simulation, preprocessing and training to seconds
    prof_yaml = tmp_path / "coarse.yaml"
    prof_yaml.write_text(
        "extends: cpu-demo\n"
        "data: {shape: [32, 32, 32], spacing: [6.0, 6.0, 6.0]}\n"
        "vqvae: {channels: [4, 4, 8], num_res_channels: [4, 4, 8], num_embeddings: 16}\n"
    )
    prof = load_profile(prof_yaml)
    sites = simulate_sites(tmp_path / "bids", 2, 2, prof, seed=0)
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    add_train_local_vqvae_parser(sub)
    run = tmp_path / "run"
    argv = ["vqvae", "--profile", str(prof_yaml), "--out", str(run), "--max-steps", "2", "--batch-size", "2"]
    argv += [x for s in sites for x in ("--bids", str(s))]
    argv += ["--set", "vqvae.num_embeddings=32", "--cache-dir", str(tmp_path / "cache")]
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 2 and metrics["n_train"] + metrics["n_val"] == 4
    assert "psnr_db" in metrics["final"]["val"]
    assert metrics["compression_ratio"] == 4**3 * 5 / (32**3 * 16)
    model, p = load_vqvae(run / "vqvae.pt")
    assert p.vqvae.num_embeddings == 32 and p.data.shape == (32, 32, 32) and model.joint
    assert "num_embeddings: 32" in (run / "profile.yaml").read_text()


def _record_lrs(opt: torch.optim.Optimizer) -> list[float]:
    """Wrap ``opt.step`` so that each step appends the learning rate it used."""
    lrs: list[float] = []
    step = opt.step

    def recording_step(*a, **k):
        lrs.append(opt.param_groups[0]["lr"])
        return step(*a, **k)

    opt.step = recording_step
    return lrs


def test_warmup_runs_once_over_the_optimisers_life() -> None:
    """Federated clients keep their optimiser between rounds: the warm-up spans its first steps only,
    not the start of every call (which starved short rounds), and the base learning rate is restored."""
    torch.manual_seed(0)
    p = tiny_profile(quantiser="loss", warmup_steps=4)
    model = build_vqvae(p)
    loader = make_vqvae_loader(blobs(6), 2, shuffle=False)
    opt = make_optimizer(model, p, lr=1e-2)
    lrs = _record_lrs(opt)
    for _ in range(2):  # two "rounds" of 3 steps each
        train_vqvae_local(model, loader, p, optimizer=opt, epochs=1)
        assert opt.param_groups[0]["lr"] == 1e-2
    assert lrs == [2.5e-3, 5e-3, 7.5e-3, 1e-2, 1e-2, 1e-2]
    fresh = make_optimizer(model, p, lr=1e-2)  # a new site process warms up again
    lrs = _record_lrs(fresh)
    train_vqvae_local(model, loader, p, optimizer=fresh, epochs=1)
    assert lrs == [2.5e-3, 5e-3, 7.5e-3]


def test_cosine_schedule_decays_over_the_step_budget() -> None:
    """``vqvae.lr_schedule: cosine`` warms up, then lowers the rate along a half cosine to 10 % at the run's
    last step (--max-steps), and leaves the optimiser's base rate in place afterwards."""
    torch.manual_seed(0)
    p = tiny_profile(quantiser="loss", warmup_steps=2, lr_schedule="cosine")
    model = build_vqvae(p)
    loader = make_vqvae_loader(blobs(6), 2, shuffle=False)
    opt = make_optimizer(model, p, lr=1e-2)
    lrs = _record_lrs(opt)
    train_vqvae_local(model, loader, p, optimizer=opt, max_steps=5, decay_steps=5)
    cos = [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * i / 5)) for i in range(5)]
    expected = [1e-2 * c * w for c, w in zip(cos, [0.5, 1, 1, 1, 1], strict=True)]
    assert lrs == [pytest.approx(e, rel=1e-9) for e in expected]
    assert lrs[-1] < 0.25e-2 and opt.param_groups[0]["lr"] == 1e-2
    constant = tiny_profile(quantiser="loss", warmup_steps=2)  # the default keeps federated rounds flat
    opt = make_optimizer(model, constant, lr=1e-2)
    lrs = _record_lrs(opt)
    train_vqvae_local(model, loader, constant, optimizer=opt, max_steps=4)
    assert lrs == [5e-3, 1e-2, 1e-2, 1e-2]
    # a cosine profile travels with its checkpoint into federated jobs: a round (no decay_steps, max_steps =
    # the round's steps) keeps a constant rate instead of decaying within every round
    opt = make_optimizer(model, p, lr=1e-2)
    lrs = _record_lrs(opt)
    train_vqvae_local(model, loader, p, optimizer=opt, max_steps=4)
    assert lrs == [5e-3, 1e-2, 1e-2, 1e-2]

"""Local prior training: conditioning lowers held-out bits per code, DP with empty batches, the CLI."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

from fl_app.config import PriorSection
from fl_app.models.prior import ConditionalPrior, load_prior
from fl_app.train.prior_local import (
    CodeDataset,
    evaluate_prior,
    make_prior_loader,
    train_prior_local,
)

V = 8
SHAPE = (2, 2, 4)  # N = 16


def toy_codes(n: int, seed: int) -> CodeDataset:
    """Code grids whose distribution depends on sex, diagnosis and age (4 age bands).

    Each code is, with probability 0.6, a deterministic function of (sex, diagnosis, age band,
    position), otherwise uniform: the best conditional model needs about 1.92 bits per code, an
    unconditional one more (it must infer the covariates from the codes it has seen).
    """
    g = torch.Generator().manual_seed(seed)
    n_codes = math.prod(SHAPE)
    sex = torch.randint(0, 2, (n,), generator=g)
    dx = torch.randint(0, 3, (n,), generator=g)
    age = 20 + 75 * torch.rand(n, generator=g)
    band = ((age - 20) / 75 * 4).long().clamp(max=3)
    pos = torch.arange(n_codes)
    f = (3 * dx[:, None] + 5 * sex[:, None] + pos[None] * (1 + band[:, None])) % V
    noise = torch.randint(0, V, (n, n_codes), generator=g)
    keep = torch.rand(n, n_codes, generator=g) < 0.6
    return CodeDataset(torch.where(keep, f, noise).reshape(n, *SHAPE), age, sex, dx)


def _train(
    cond_dropout: float, data: CodeDataset, steps: int, attention: str = "softmax", every: bool = False
):
    torch.manual_seed(0)
    cfg = PriorSection(
        d_model=32, n_layers=2, n_heads=4, attention=attention, cond_dropout=cond_dropout,
        cond_every_position=every,
    )  # fmt: skip
    model = ConditionalPrior(cfg, V, SHAPE)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    res = train_prior_local(model, make_prior_loader(data, 32, True), None, optimizer=opt, max_steps=steps)
    return model, res


@pytest.mark.parametrize("every", [False, True])
def test_conditioning_lowers_held_out_bits_per_code(every):
    train, val = toy_codes(2000, 0), toy_codes(400, 1)
    val_loader = make_prior_loader(val, 200, False)
    cond, res = _train(0.1, train, 200, every=every)
    uncond, _ = _train(1.0, train, 200)
    assert res["steps"] == 200 and 199 * 32 > res["train_sequences"] > 190 * 32  # partial last batches
    assert res["epochs"][0]["bits_per_code"] > res["final"]["bits_per_code"]  # it learned
    b_cond = evaluate_prior(cond, val_loader)["bits_per_code"]
    b_uncond = evaluate_prior(uncond, val_loader)["bits_per_code"]
    b_dropped = evaluate_prior(cond, val_loader, drop_conditions=True)["bits_per_code"]
    assert b_cond < 3.0  # log2(8) = 3 bits is the uniform model
    assert b_cond < b_uncond - 0.1
    assert b_cond < b_dropped - 0.1  # the same model, told nothing, does worse


def test_evaluate_prior_is_cross_entropy_in_bits():
    data = toy_codes(6, 2)
    model = ConditionalPrior(PriorSection(d_model=16, n_layers=1, n_heads=2), V, SHAPE)
    res = evaluate_prior(model, make_prior_loader(data, 4, False))
    seq = model.grid_to_sequence(data.codes)
    model.eval()
    with torch.no_grad():
        logits = model(seq[:, :-1], data.age, data.sex, data.diagnosis)
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, V), seq.reshape(-1))
    assert res["n_sequences"] == 6
    assert res["bits_per_code"] == pytest.approx(float(ce) / math.log(2), rel=1e-5)


def test_empty_batches_are_skipped_without_dp():
    data = toy_codes(4, 3)
    model = ConditionalPrior(PriorSection(d_model=16, n_layers=1, n_heads=2), V, SHAPE)
    batch = next(iter(make_prior_loader(data, 4, False)))
    empty = {k: v[:0] for k, v in batch.items()}
    res = train_prior_local(
        model, [empty, batch, [], empty], None, optimizer=torch.optim.SGD(model.parameters(), 0.1)
    )
    assert res["steps"] == 1 and res["empty_batches"] == 3 and not res["dp"]


def test_dp_training_with_poisson_sampling():
    """Opacus' Poisson loader (with empty batches at this sampling rate): every batch is one DP step."""
    from opacus import PrivacyEngine

    torch.manual_seed(0)
    data = toy_codes(4, 4)
    model = ConditionalPrior(PriorSection(d_model=16, n_layers=1, n_heads=2, attention="linear"), V, SHAPE)
    engine = PrivacyEngine(accountant="rdp")
    dp_model, dp_opt, dp_loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
        data_loader=make_prior_loader(data, 1, True),  # sample rate 1/4: P(empty batch) ~ 0.32
        noise_multiplier=1.0,
        max_grad_norm=1.0,
    )
    res = train_prior_local(dp_model, dp_loader, None, optimizer=dp_opt, epochs=8, dp_engine=engine)
    assert res["dp"] and res["steps"] == 8 * 4
    assert res["empty_batches"] > 0  # P(none in 32 batches) ~ 4e-6
    assert len(engine.accountant.history) > 0 and res["epsilon"] > 0
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_train_local_prior_cli(tmp_path):
    """`synthbrain train-local prior` on a simulated site with a (tiny, untrained) VQ-VAE; codes cached."""
    from fl_app.config import load_profile
    from fl_app.data.simulate import simulate_sites
    from fl_app.models.vqvae import build_vqvae, save_vqvae
    from fl_app.train.prior_local import add_train_local_prior_parser

    profile = load_profile(
        "cpu-demo",
        {"vqvae": {"channels": [4, 4, 8], "num_res_channels": [4, 4, 8], "num_embeddings": 16}},
    )
    sites = simulate_sites(tmp_path / "bids", 1, 4, profile, seed=0)
    vq_run = tmp_path / "vq"
    save_vqvae(build_vqvae(profile), profile, vq_run / "vqvae.pt")
    parser = argparse.ArgumentParser()
    add_train_local_prior_parser(parser.add_subparsers())
    out = tmp_path / "prior_run"
    argv = ["prior", "--vqvae", str(vq_run), "--bids", str(sites[0]), "--out", str(out), "--max-steps", "2"]
    argv += ["--cache-dir", str(tmp_path / "pre"), "--device", "cpu", "--batch-size", "2"]
    argv += ["--set", "prior.d_model=16", "--set", "prior.n_layers=1", "--set", "prior.n_heads=2"]
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 2 and metrics["n_train"] + metrics["n_val"] == 4
    assert 0 < metrics["val"]["bits_per_code"] < 10
    model, p = load_prior(out / "prior.pt")
    assert model.num_codes == 16 and model.code_shape == (8, 8, 8) and p.prior.d_model == 16
    cached = list((out / "code_cache").rglob("*.pt"))
    assert len(cached) == 4
    stamp = {f: f.stat().st_mtime_ns for f in cached}
    args = parser.parse_args([*argv, "--unconditional", "--out", str(out)])
    assert args.func(args) == 0  # second run reuses the cached code grids
    assert {f: f.stat().st_mtime_ns for f in cached} == stamp
    assert json.loads((out / "metrics.json").read_text())["cond_dropout"] == 1.0

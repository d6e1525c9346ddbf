"""The conditioning bench's logic (``bench/prior_conditioning.py``): paired statistics, the unigram reference,
covariate masking / shuffling, per-subject bits against ``evaluate_prior``, and that the unconditional control
(``cond_dropout = 1``) is exactly a prior trained without covariates. Tiny priors; no simulation, no timing."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import prior_conditioning as pc

from fl_app.config import load_profile
from fl_app.data.covariates import UNKNOWN_DIAGNOSIS, UNKNOWN_SEX
from fl_app.models.prior import build_prior
from fl_app.train.prior_local import CodeDataset, evaluate_prior, make_prior_loader


@pytest.fixture(scope="module")
def tiny_profile():
    return load_profile(
        "cpu-demo",
        {
            "data": {"shape": [16, 16, 16]},
            "vqvae": {"num_embeddings": 8},
            "prior": {"d_model": 16, "n_layers": 1, "n_heads": 2, "cond_dropout": 0.1},
            "train": {"batch_size": 2, "lr": 0.01},
        },
    )


def _codes(profile, n: int, seed: int = 0) -> CodeDataset:
    g = torch.Generator().manual_seed(seed)
    shape = (n, *profile.code_shape)
    return CodeDataset(
        torch.randint(0, profile.vqvae.num_embeddings, shape, generator=g),
        torch.linspace(50, 85, n),
        torch.arange(n) % 2,
        torch.arange(n) % 3,
    )


def test_paired_summary_matches_t_formula_and_bootstrap_brackets_mean():
    d = np.array([-1.0, -2.0, -3.0, -4.0, 0.5])
    s = pc.paired_summary(d, n_boot=2000, seed=1)
    assert s["n"] == 5
    assert s["mean"] == pytest.approx(-1.9)
    assert s["sd"] == pytest.approx(d.std(ddof=1))
    half = 2.7764451051977987 * d.std(ddof=1) / math.sqrt(5)  # t(0.975, 4)
    assert s["ci95_t"] == pytest.approx([-1.9 - half, -1.9 + half])
    lo, hi = s["ci95_bootstrap"]
    assert d.min() <= lo < s["mean"] < hi <= d.max()
    assert s["fraction_negative"] == pytest.approx(0.8)
    assert pc.paired_summary(d, n_boot=2000, seed=1) == s  # seeded
    one = pc.paired_summary([0.3])
    assert one["mean"] == pytest.approx(0.3) and all(math.isnan(x) for x in one["ci95_t"])
    with pytest.raises(ValueError):
        pc.paired_summary([])


def test_unigram_bits_add_one_smoothing():
    train = torch.tensor([0, 0, 1, 1])
    assert pc.unigram_bits(train, torch.tensor([0, 1]), vocab=2) == pytest.approx(1.0)
    # counts + 1 = [3, 3, 1, 1] over 8: code 0 costs log2(8/3), code 3 costs 3 bits
    assert pc.unigram_bits(train, torch.tensor([0]), vocab=4) == pytest.approx(math.log2(8 / 3))
    assert pc.unigram_bits(train, torch.tensor([3]), vocab=4) == pytest.approx(3.0)


def test_shuffle_and_mask_covariates(tiny_profile):
    data = _codes(tiny_profile, 7)
    sh = pc.shuffle_covariates(data, seed=3)
    assert torch.equal(sh.codes, data.codes)
    triples = {(float(a), int(s), int(x)) for a, s, x in zip(data.age, data.sex, data.diagnosis, strict=True)}
    moved = {(float(a), int(s), int(x)) for a, s, x in zip(sh.age, sh.sex, sh.diagnosis, strict=True)}
    assert moved == triples  # the same (age, sex, diagnosis) rows, permuted together
    assert not torch.equal(sh.age, data.age)
    m = pc.mask_covariates(data, (True, False, False))
    assert torch.equal(m.age, data.age)
    assert (m.sex == UNKNOWN_SEX).all() and (m.diagnosis == UNKNOWN_DIAGNOSIS).all()
    assert torch.isnan(pc.mask_covariates(data, (False, True, True)).age).all()


def test_per_subject_bits_agrees_with_evaluate_prior(tiny_profile):
    torch.manual_seed(0)
    model = build_prior(tiny_profile)
    with torch.no_grad():  # make the covariates matter, so that masking visibly changes the likelihood
        model.sex_emb.weight.normal_(0, 2.0)
        model.dx_emb.weight.normal_(0, 2.0)
    data = _codes(tiny_profile, 5)
    loader = make_prior_loader(data, 2, shuffle=False)
    bits = pc.per_subject_bits(model, data, batch_size=2)
    assert bits.shape == (5,)
    assert bits.mean() == pytest.approx(evaluate_prior(model, loader)["bits_per_code"], rel=1e-6)
    dropped = pc.per_subject_bits(model, data, (False, False, False), batch_size=3)
    ev_drop = evaluate_prior(model, loader, drop_conditions=True)["bits_per_code"]
    assert dropped.mean() == pytest.approx(ev_drop, rel=1e-6)
    assert not np.allclose(bits, dropped)
    one = pc.per_subject_bits(model, data.subset([3]))  # row order is data's order
    assert one[0] == pytest.approx(bits[3], rel=1e-6)
    assert model.training  # restored


def test_unconditional_control_equals_training_without_covariates(tiny_profile):
    """cond_dropout = 1 trains exactly the model that never sees a covariate (same init, batches, steps)."""
    data = _codes(tiny_profile, 6)
    unknown = pc.mask_covariates(data, (False, False, False))
    torch.manual_seed(0)
    init = build_prior(tiny_profile).state_dict()
    dev = torch.device("cpu")
    a, info_a = pc.train_variant(tiny_profile, 1.0, init, data, 4, 0, 2, 0.01, dev)
    b, _ = pc.train_variant(tiny_profile, 1.0, init, unknown, 4, 0, 2, 0.01, dev)
    c, _ = pc.train_variant(tiny_profile, 0.1, init, data, 4, 0, 2, 0.01, dev)
    assert info_a["steps"] == 4
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)  # the conditional variant does learn differently
    assert not any(torch.equal(sa[k], init[k]) for k in ("head.weight", "tok_emb.weight"))


def test_positional_reference_counts_per_position():
    # 3 training grids of 2 positions: position 0 always code 1; position 1 codes 0, 0, 2
    train = torch.tensor([[1, 0], [1, 0], [1, 2]])
    test = torch.tensor([[1, 0], [3, 2]])
    ref = pc.positional_reference(train, test, vocab=4)
    assert ref["mode_agreement"] == pytest.approx(2 / 4)  # codes equal to the per-position mode: 1, 0
    # probabilities (count + 1/4) / 4: pos0 code1 3.25/4, code3 0.25/4; pos1 code0 2.25/4, code2 1.25/4
    want = -(math.log2(3.25 / 4) + math.log2(0.25 / 4) + math.log2(2.25 / 4) + math.log2(1.25 / 4)) / 4
    assert ref["bits_per_code"] == pytest.approx(want)
    with pytest.raises(ValueError, match="grids differ"):
        pc.positional_reference(train, torch.tensor([[1, 0, 0]]), vocab=4)


# --------------------------------------------------------------------------- checkpoint mode (--prior)


def _tiny_global_model(root: Path):
    """A global-model directory with an untrained tiny VQ-VAE (8^3 codes of 16) and prior, and its profile."""
    from fl_app.models.prior import save_prior
    from fl_app.models.vqvae import build_vqvae, save_vqvae

    profile = load_profile(
        "cpu-demo",
        {
            "vqvae": {"channels": [4, 4, 8], "num_res_channels": [4, 4, 8], "num_embeddings": 16},
            "prior": {"d_model": 16, "n_layers": 1, "n_heads": 2},
            "train": {"batch_size": 2},
        },
    )
    torch.manual_seed(0)
    save_vqvae(build_vqvae(profile), profile, root / "vqvae.pt")
    prior = build_prior(profile)
    with torch.no_grad():  # covariates that visibly change the likelihood
        prior.sex_emb.weight.normal_(0, 2.0)
        prior.dx_emb.weight.normal_(0, 2.0)
    save_prior(prior, profile, root / "prior.pt")
    return profile


def test_checkpoint_mode_evaluates_a_saved_prior_without_training(tmp_path):
    gm = tmp_path / "global"
    _tiny_global_model(gm)
    common = ["--test-subjects", "4", "--shuffles", "2", "--device", "cpu", "--threads", "1"]
    assert pc.main(["--prior", str(gm), "--json", str(tmp_path / "ck.json"), *common]) == 0
    out = json.loads((tmp_path / "ck.json").read_text())
    assert out["mode"] == "checkpoint" and "covariates dropped" in out["unconditional_control"]
    assert out["prior_checkpoint"]["source"] == str((gm / "prior.pt").resolve())
    assert out["vqvae"]["source"] == str((gm / "vqvae.pt").resolve())  # the VQ-VAE beside the prior
    assert out["n_test"] == 4 and out["n_train"] is None and out["steps"] is None
    assert out["batch_size"] == 2 and out["code_shape"] == [8, 8, 8] and out["prior"]["d_model"] == 16
    held = out["heldout_bits_per_code"]
    assert set(held) == {f"conditional_{c}" for c in [*pc.CONDITIONS, "shuffled"]}  # no "unconditional"
    assert held["conditional_true"] != pytest.approx(held["conditional_dropped"], abs=1e-4)
    paired = out["paired"]
    assert paired["conditional_true_minus_unconditional"] is None
    assert paired["conditional_dropped_minus_unconditional"] is None
    for other in ("dropped", "shuffled"):
        s = paired[f"conditional_true_minus_conditional_{other}"]
        assert s["n"] == 4
        assert s["mean"] == pytest.approx(held["conditional_true"] - held[f"conditional_{other}"], abs=1e-9)
    ci_dropped = paired["conditional_true_minus_conditional_dropped"]["ci95_bootstrap"]
    ci_shuffled = paired["conditional_true_minus_conditional_shuffled"]["ci95_bootstrap"]
    assert out["conditioning_helps"] is (ci_dropped[1] < 0 and ci_shuffled[1] < 0)

    # every key of the trained-pair JSON is there (null where only a trained pair gives it)
    trained = ["--vqvae", str(gm / "vqvae.pt"), "--sites", "1", "--subjects", "2", "--steps", "1"]
    trained += ["--no-curve", *(f"--set=prior.{kv}" for kv in ("d_model=16", "n_layers=1", "n_heads=2"))]
    assert pc.main([*trained, "--json", str(tmp_path / "tr.json"), *common]) == 0
    tr = json.loads((tmp_path / "tr.json").read_text())
    assert tr["mode"] == "trained pair"
    assert set(tr) <= set(out) and set(tr["paired"]) == set(paired)

    # a prior without a VQ-VAE beside it, and an unknown path, are refused by name
    alone = tmp_path / "alone" / "p.pt"
    alone.parent.mkdir()
    alone.write_bytes((gm / "prior.pt").read_bytes())
    with pytest.raises(SystemExit, match=r"no VQ-VAE at .*vqvae\.pt"):
        pc.main(["--prior", str(alone), *common])
    with pytest.raises(FileNotFoundError, match=r"--prior .*missing\.pt does not exist"):
        pc.main(["--prior", str(tmp_path / "missing.pt"), *common])


def test_checkpoint_prior_pretrained_is_the_shipped_checkpoint():
    from fl_app.models.pretrained import pretrained_dir

    prior, path, vq_path = pc._load_checkpoint_prior("pretrained", None, torch.device("cpu"))
    assert path == (pretrained_dir("cpu-demo") / "prior.pt").resolve()
    assert vq_path == path.parent / "vqvae.pt" and not prior.training


STRADDLES_ZERO = [-1.0, -1.0, -1.0, 1.0, 1.0, 0.5]  # mean < 0, but its bootstrap CI contains 0


@pytest.mark.parametrize(
    "shift, helps",
    [
        ({"true": -0.5}, True),
        ({"true": 0.5}, False),
        ({"true": -0.5, "shuffled": -0.5}, False),  # beats dropped covariates, not shuffled ones
        ({"true": -0.5, "dropped": -0.5}, False),  # beats shuffled covariates, not dropped ones
        ({"true": STRADDLES_ZERO}, False),
    ],
)
def test_checkpoint_conditioning_helps_needs_both_cis_below_zero(tiny_profile, monkeypatch, shift, helps):
    """With made-up per-subject bits (a fixed base plus a shift per condition), conditioning_helps is true
    exactly when the bootstrap CIs of true - dropped and true - shuffled both lie below zero."""
    data = _codes(tiny_profile, 6)
    base = np.linspace(2.0, 2.5, 6)

    def fake_bits(model, ds, known=(True, True, True), *a, **kw):
        if ds is not data:
            cond = "shuffled"
        else:
            cond = {(True, True, True): "true", (False, False, False): "dropped"}.get(known, "other")
        return base + np.asarray(shift.get(cond, 0.0))

    monkeypatch.setattr(pc, "per_subject_bits", fake_bits)
    args = argparse.Namespace(batch_size=None, shuffles=2, seed=0)
    timing = {"data_seconds": 0.0, "encode_seconds": 0.0, "t_start": 0.0}
    prior = build_prior(tiny_profile)
    out = pc.evaluate_checkpoint(
        args, tiny_profile, prior, Path("p.pt"), {}, data, torch.device("cpu"), timing
    )
    true_shift = np.mean(shift["true"])
    assert out["paired"]["conditional_true_minus_conditional_dropped"]["mean"] == pytest.approx(
        true_shift - np.mean(shift.get("dropped", 0.0))
    )
    assert out["heldout_bits_per_code"]["conditional_shuffled"] == pytest.approx(
        base.mean() + np.mean(shift.get("shuffled", 0.0))
    )
    assert out["conditioning_helps"] is helps

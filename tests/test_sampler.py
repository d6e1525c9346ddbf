"""Sampler: cached decoding equals recomputation, seeding, filtering, conditions, VQ-VAE hand-off."""

from __future__ import annotations

import math

import pytest
import torch

from fl_app.config import PriorSection
from fl_app.data.covariates import UNKNOWN_DIAGNOSIS
from fl_app.generate.sampler import (
    filter_logits,
    guidance_levels,
    make_condition,
    normalize_guidance,
    parse_guidance,
    sample,
    sample_next,
)
from fl_app.models.prior import ConditionalPrior

V = 16
SHAPE = (2, 3, 4)  # N = 24


def _model(attention: str = "softmax", ordering: str = "raster", dtype=torch.float64) -> ConditionalPrior:
    torch.manual_seed(0)
    cfg = PriorSection(d_model=32, n_layers=2, n_heads=4, attention=attention, ordering=ordering)
    m = ConditionalPrior(cfg, V, SHAPE).to(dtype).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.3)
    return m


COND = make_condition(
    3, age=(60.0, 80.0), sex="F", diagnosis="AD", generator=torch.Generator().manual_seed(0)
)


@pytest.mark.parametrize("attention", ["softmax", "linear"])
@pytest.mark.parametrize("ordering", ["raster", "random"])
def test_greedy_cache_equals_recompute(attention, ordering):
    m = _model(attention, ordering)
    cached = sample(m, 3, COND, temperature=0.0, progress=False)
    full = sample(m, 3, COND, temperature=0.0, progress=False, use_cache=False)
    assert cached.shape == (3, *SHAPE) and cached.dtype == torch.long
    assert torch.equal(cached, full)
    assert len(torch.unique(cached)) > 1  # not a constant sequence


def test_greedy_is_the_argmax_sequence():
    """The greedy sample is, token by token, the argmax of the model's teacher-forced logits."""
    m = _model(ordering="random")
    grid = sample(m, 2, {k: v[:2] for k, v in COND.items()}, temperature=0.0, progress=False)
    seq = m.grid_to_sequence(grid)
    logits = m(seq[:, :-1], COND["age"][:2], COND["sex"][:2], COND["diagnosis"][:2])
    assert torch.equal(logits.argmax(-1), seq)


@pytest.mark.parametrize("attention", ["softmax", "linear"])
def test_seed_reproduces_and_batching(attention):
    m = _model(attention, dtype=torch.float32)
    a = sample(m, 5, make_condition(5, age=75.0), seed=123, progress=False, batch_size=2)
    b = sample(m, 5, make_condition(5, age=75.0), seed=123, progress=False, batch_size=2)
    c = sample(m, 5, make_condition(5, age=75.0), seed=124, progress=False, batch_size=2)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.shape == (5, *SHAPE) and int(a.min()) >= 0 and int(a.max()) < V
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert torch.equal(
        sample(m, 2, None, generator=g1, progress=False), sample(m, 2, None, generator=g2, progress=False)
    )


@pytest.mark.parametrize("temperature, top_k", [(1.0, None), (0.6, None), (1.0, 3)])
def test_sampled_sequences_follow_the_models_joint_distribution(temperature, top_k):
    """Full autoregressive sampling (cached path, batched) on a prior small enough to enumerate: 4 codes on
    a 1x1x3 grid = 64 sequences, whose exact probabilities are the product of the teacher-forced
    conditionals (one parallel forward pass; tempered and top-k-renormalised per token). The frequencies
    of 20 000 samples pass a chi-square test against them."""
    from scipy.stats import chisquare

    v, shape = 4, (1, 1, 3)
    torch.manual_seed(1)
    cfg = PriorSection(d_model=16, n_layers=2, n_heads=2)
    m = ConditionalPrior(cfg, v, shape).double().eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.5)
    n = 20_000
    cond = make_condition(n, age=72.0, sex="M", diagnosis="MCI")
    grids = sample(m, n, cond, temperature=temperature, top_k=top_k, seed=0, batch_size=5000, progress=False)
    seqs = m.grid_to_sequence(grids)
    index = (seqs * torch.tensor([v * v, v, 1])).sum(1)
    observed = torch.bincount(index, minlength=v**3).double()
    every = torch.cartesian_prod(*[torch.arange(v)] * 3)  # all 64 sequences, in index order
    c = {k: t[:1].expand(len(every)) for k, t in cond.items()}
    with torch.no_grad():
        logits = m(every[:, :-1], c["age"], c["sex"], c["diagnosis"]) / temperature
    if top_k is not None:
        kth = logits.topk(top_k, -1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    logp = logits.log_softmax(-1).gather(-1, every[..., None])[..., 0].sum(1)
    expected = n * logp.exp()
    assert float(expected.sum()) == pytest.approx(n)
    assert float(expected.max()) < 0.5 * n  # a spread distribution, not one dominant sequence
    if top_k is not None:
        assert int(observed[expected == 0].sum()) == 0  # codes outside the top k never drawn
    big = expected >= 5  # pool the rare sequences into one cell
    obs = torch.cat([observed[big], observed[~big].sum()[None]]).numpy()
    exp = torch.cat([expected[big], expected[~big].sum()[None]]).numpy()
    keep = exp > 0
    assert chisquare(obs[keep], exp[keep]).pvalue > 1e-3


def test_top_k_1_and_tiny_top_p_are_greedy_and_cached_matches_recomputed():
    """With top_k=1 sampling is greedy; cached sampling at T=1 matches recomputation for the same seed."""
    m = _model()
    greedy = sample(m, 3, COND, temperature=0.0, progress=False)
    assert torch.equal(sample(m, 3, COND, top_k=1, seed=5, progress=False), greedy)
    assert torch.equal(sample(m, 3, COND, top_p=1e-6, seed=5, progress=False), greedy)
    s1 = sample(m, 3, COND, seed=9, progress=False)
    s2 = sample(m, 3, COND, seed=9, progress=False, use_cache=False)
    assert torch.equal(s1, s2)


def test_filter_logits():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    k2 = filter_logits(logits, top_k=2)
    assert torch.isfinite(k2[0, :2]).all() and torch.isinf(k2[0, 2:]).all()
    p = filter_logits(logits, top_p=0.75)  # 0.5 < 0.75 <= 0.8: keep the two most probable
    assert torch.isfinite(p[0, :2]).all() and torch.isinf(p[0, 2:]).all()
    p = filter_logits(logits, top_p=0.81)
    assert torch.isfinite(p[0, :3]).all() and torch.isinf(p[0, 3])
    shuffled = logits[:, [2, 0, 3, 1]]
    assert torch.equal(
        torch.isfinite(filter_logits(shuffled, top_p=0.75)), torch.tensor([[False, True, False, True]])
    )
    # empirical frequencies at temperature 1 follow the probabilities
    g = torch.Generator().manual_seed(0)
    draws = sample_next(logits.expand(20000, 4), generator=g)
    freq = torch.bincount(draws, minlength=4).float() / 20000
    torch.testing.assert_close(freq, probs[0], atol=0.015, rtol=0)


def test_make_condition_and_unknowns():
    c = make_condition(4, age=(70, 80), sex="F", diagnosis="AD", generator=torch.Generator().manual_seed(0))
    assert ((c["age"] >= 70) & (c["age"] <= 80)).all()
    assert c["sex"].tolist() == [0] * 4 and c["diagnosis"].tolist() == [2] * 4
    u = make_condition(2)
    assert torch.isnan(u["age"]).all() and u["diagnosis"].tolist() == [UNKNOWN_DIAGNOSIS] * 2
    with pytest.raises(ValueError):
        make_condition(1, sex="X")
    m = _model()
    # a partial condition dict: missing keys are unknown
    a = sample(m, 2, {"age": torch.tensor([70.0, math.nan])}, seed=1, progress=False)
    b = sample(m, 2, {**make_condition(2), "age": torch.tensor([70.0, math.nan])}, seed=1, progress=False)
    assert torch.equal(a, b)
    with pytest.raises(ValueError):
        sample(m, 2, {"age": torch.zeros(3)}, progress=False)
    with pytest.raises(ValueError):
        sample(m, 1, None, code_shape=(4, 4, 4), progress=False)


def test_codes_decode_with_vqvae():
    """Sampled grids are valid VQ-VAE input: a real (tiny, untrained) VQ-VAE decodes them."""
    from fl_app.config import load_profile
    from fl_app.models.prior import build_prior
    from fl_app.models.vqvae import build_vqvae, decode

    profile = load_profile(
        "cpu-demo",
        {
            "data": {"shape": [16, 16, 16]},
            "vqvae": {
                "channels": [4, 4],
                "num_res_channels": [4, 4],
                "num_embeddings": 8,
                "embedding_dim": 4,
            },
            "prior": {"d_model": 16, "n_layers": 1, "n_heads": 2},
        },
    )
    prior = build_prior(profile)
    codes = sample(prior, 2, make_condition(2, sex="M"), seed=0, progress=False)
    assert codes.shape == (2, *profile.code_shape)
    image, _ = decode(build_vqvae(profile), codes)
    assert image.shape == (2, 1, 16, 16, 16) and torch.isfinite(image).all()


@pytest.mark.parametrize("attention", ["softmax", "linear"])
def test_bfloat16_sampling_tracks_float32_and_leaves_the_model_alone(attention):
    m = _model(attention, dtype=torch.float32)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    grid = sample(m, 3, COND, temperature=0.0, progress=False, precision="bfloat16")
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert m.head.weight.dtype == torch.float32
    # each bfloat16-greedy code is the float32 model's argmax, bar near-ties
    seq = m.grid_to_sequence(grid)
    with torch.no_grad():
        logits = m(seq[:, :-1], COND["age"], COND["sex"], COND["diagnosis"])
    agree = (logits.argmax(-1) == seq).float().mean().item()
    assert agree >= 0.9, agree
    a = sample(m, 3, COND, seed=5, progress=False, precision="bfloat16")
    assert torch.equal(a, sample(m, 3, COND, seed=5, progress=False, precision="bfloat16"))


def test_bfloat16_copy_keeps_the_age_embedding_in_float32():
    """Fourier age features at π·2^k would lose their phase in bfloat16; the copy keeps that branch exact."""
    m = _model(dtype=torch.float32)
    c = m.sampling_copy(torch.bfloat16)
    assert c.blocks[0].fc.weight.dtype == torch.bfloat16 and c.age_emb.mlp[0].weight.dtype == torch.float32
    with torch.no_grad():
        ref = m.condition_prefix(COND["age"], COND["sex"], COND["diagnosis"])
        got = c.condition_prefix(COND["age"], COND["sex"], COND["diagnosis"]).float()
    assert got.dtype == torch.float32 and torch.allclose(got, ref, rtol=1e-2, atol=1e-2)
    with pytest.raises(ValueError, match="precision"):
        sample(m, 1, progress=False, precision="float16")


@pytest.mark.parametrize("attention", ["softmax", "linear"])
def test_classifier_free_guidance(attention):
    """Guidance w draws from l_u + w·(l_c − l_u): w = 0 is exactly unconditional sampling (same draws),
    greedy decoding with w = 2 follows the extrapolated logits token by token, on both back ends and the
    recompute path alike."""
    m = _model(attention)
    plain_uncond = sample(m, 3, None, seed=5, progress=False)
    assert torch.equal(sample(m, 3, COND, seed=5, progress=False, guidance=0.0), plain_uncond)
    assert not torch.equal(sample(m, 3, COND, seed=5, progress=False), plain_uncond)
    g = sample(m, 3, COND, temperature=0.0, progress=False, guidance=2.0)
    assert torch.equal(g, sample(m, 3, COND, temperature=0.0, progress=False, guidance=2.0, use_cache=False))
    seq = m.grid_to_sequence(g)
    lc = m(seq[:, :-1], COND["age"], COND["sex"], COND["diagnosis"])
    unknown = make_condition(3)
    lu = m(seq[:, :-1], unknown["age"], unknown["sex"], unknown["diagnosis"])
    assert torch.equal((lu + 2.0 * (lc - lu)).argmax(-1), seq)
    assert not torch.equal(g, sample(m, 3, COND, temperature=0.0, progress=False))  # it changed the draw


def test_guidance_per_covariate():
    """One weight per covariate chains l_0 + w_age·(l_1 − l_0) + w_sex·(l_2 − l_1) + w_dx·(l_3 − l_2): equal weights
    are the single-weight rule (same draws); guiding only the diagnosis follows l_2 + w·(l_3 − l_2) greedily."""
    m = _model("softmax")
    same = {"age": 2.0, "sex": 2.0, "diagnosis": 2.0}
    assert torch.equal(sample(m, 3, COND, seed=5, progress=False, guidance=same),
                       sample(m, 3, COND, seed=5, progress=False, guidance=2.0))  # fmt: skip
    g = sample(m, 3, COND, temperature=0.0, progress=False, guidance={"diagnosis": 3.0})
    seq = m.grid_to_sequence(g)
    no_dx = dict(COND, diagnosis=make_condition(3)["diagnosis"])
    l3 = m(seq[:, :-1], COND["age"], COND["sex"], COND["diagnosis"])
    l2 = m(seq[:, :-1], no_dx["age"], no_dx["sex"], no_dx["diagnosis"])
    assert torch.equal((l2 + 3.0 * (l3 - l2)).argmax(-1), seq)
    assert not torch.equal(g, sample(m, 3, COND, temperature=0.0, progress=False, guidance=3.0))


def test_guidance_levels_and_parsing():
    assert guidance_levels(1.0) == [(3, 1.0)]  # plain conditional sampling: one pass
    assert guidance_levels(3.0) == [(0, -2.0), (3, 3.0)]
    assert guidance_levels(0.0) == [(0, 1.0)]  # unconditional
    assert guidance_levels({"age": 3.0, "sex": 5.0, "diagnosis": 5.0}) == [(0, -2.0), (1, -2.0), (3, 5.0)]
    assert parse_guidance("4") == 4.0
    assert parse_guidance("age=3, sex=5,diagnosis=5") == {"age": 3.0, "sex": 5.0, "diagnosis": 5.0}
    assert parse_guidance("sex=5") == {"age": 1.0, "sex": 5.0, "diagnosis": 1.0}
    assert parse_guidance("age=2,sex=2,diagnosis=2") == 2.0
    # the Python API records the same form as the command line: resuming a cohort compares it
    assert normalize_guidance({"sex": 5}) == {"age": 1.0, "sex": 5.0, "diagnosis": 1.0}
    assert normalize_guidance({"age": 2, "sex": 2, "diagnosis": 2}) == normalize_guidance(2) == 2.0
    for bad in ("height=2", "age", "age=x"):
        with pytest.raises(ValueError, match="guidance"):
            parse_guidance(bad)
    with pytest.raises(ValueError, match="unknown covariates"):
        guidance_levels({"weight": 2.0})

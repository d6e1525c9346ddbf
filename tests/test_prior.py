"""Conditional transformer prior: orderings, attention back ends, conditioning, save/load, Opacus."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from fl_app.config import PriorSection, load_profile
from fl_app.data.covariates import UNKNOWN_DIAGNOSIS, UNKNOWN_SEX
from fl_app.models import linear_attention as LA
from fl_app.models.prior import (
    ConditionalPrior,
    build_prior,
    load_prior,
    load_prior_weights,
    make_ordering,
    save_prior,
)

V = 16
SHAPE = (3, 3, 4)  # N = 36


def _model(attention: str = "softmax", dtype=torch.float32, **kw) -> ConditionalPrior:
    torch.manual_seed(0)
    cfg = PriorSection(d_model=32, n_layers=2, n_heads=4, attention=attention, **kw)
    m = ConditionalPrior(cfg, V, SHAPE).to(dtype).eval()
    with torch.no_grad():  # larger weights than the 0.02 init so that attention is far from uniform
        for p in m.parameters():
            p.normal_(0.0, 0.3)
    return m


def _cond(b: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    age = torch.tensor([72.0, math.nan, 35.0, 90.0][:b])
    sex = torch.tensor([0, 1, UNKNOWN_SEX, 0][:b])
    dx = torch.tensor([2, UNKNOWN_DIAGNOSIS, 0, 1][:b])
    return age, sex, dx


@pytest.mark.parametrize("kind", ["raster", "random"])
def test_ordering_round_trip(kind):
    m = _model(ordering=kind)
    grid = torch.randint(0, V, (2, *SHAPE))
    seq = m.grid_to_sequence(grid)
    assert seq.shape == (2, 36)
    assert torch.equal(m.sequence_to_grid(seq), grid)
    order = make_ordering(36, kind, seed=0)
    assert sorted(order.tolist()) == list(range(36))
    if kind == "raster":
        assert torch.equal(seq, grid.reshape(2, -1))
    else:
        assert not torch.equal(order, torch.arange(36))
        assert torch.equal(order, make_ordering(36, "random", seed=0))
        assert not torch.equal(order, make_ordering(36, "random", seed=1))


def test_forward_shapes_and_wrong_grid():
    m = _model()
    age, sex, dx = _cond(2)
    seq = torch.randint(0, V, (2, 36))
    assert m(seq[:, :-1], age, sex, dx).shape == (2, 36, V)
    assert m(seq[:, :0], age, sex, dx).shape == (2, 1, V)
    with pytest.raises(ValueError):
        m(seq, age, sex, dx)  # one code too many
    with pytest.raises(ValueError):
        m.grid_to_sequence(torch.zeros(1, 4, 4, 4, dtype=torch.long))


@pytest.mark.parametrize(
    "attention,every", [("softmax", False), ("linear", False), ("softmax", True), ("linear", True)]
)
def test_incremental_equals_parallel(attention, every):
    """KV cache (softmax) / recurrent state (linear) reproduce the parallel pass within 1e-5, also with the
    condition added at every position (carried in the sampling state)."""
    m = _model(attention, linear_impl="torch", linear_chunk=5, cond_every_position=every)
    age, sex, dx = _cond(4)
    seq = torch.randint(0, V, (4, 36))
    full = m(seq[:, :-1], age, sex, dx)
    state = m.new_state(4)
    steps = [m.prefill(age, sex, dx, state)]
    for i in range(35):
        steps.append(m.step(seq[:, i], state))
    inc = torch.stack(steps, 1)
    assert full.abs().max() > 0.5
    torch.testing.assert_close(inc, full, atol=1e-5, rtol=0)
    with pytest.raises(ValueError):
        m.step(seq[:, 0], state)  # sequence complete


def test_linear_attention_matches_quadratic_definition():
    """Chunked parallel form and recurrent form both equal the masked-kernel definition (float64)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 23, 8, generator=g, dtype=torch.float64) for _ in range(3))
    qf, kf = LA.elu_feature_map(q), LA.elu_feature_map(k)
    scores = (qf @ kf.transpose(-1, -2)).tril()  # (B, H, T, T)
    ref = (scores @ v) / (scores.sum(-1, keepdim=True) + LA.EPS)
    for chunk in (1, 4, 7, 64):
        out = LA.causal_linear_attention(q, k, v, impl="torch", chunk=chunk)
        torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-10)
    state = LA.linear_attention_state(2, 3, 8, 8, "cpu", torch.float64)
    rec = torch.cat([LA.linear_attention_step(q[:, :, i : i + 1], k[:, :, i : i + 1], v[:, :, i : i + 1], state)
                     for i in range(23)], dim=2)  # fmt: skip
    torch.testing.assert_close(rec, ref, atol=1e-12, rtol=1e-10)
    # a multi-token step on top of a carried state (prefill then continue)
    state = LA.linear_attention_state(2, 3, 8, 8, "cpu", torch.float64)
    a = LA.linear_attention_step(q[:, :, :10], k[:, :, :10], v[:, :, :10], state)
    b = LA.linear_attention_step(q[:, :, 10:], k[:, :, 10:], v[:, :, 10:], state)
    torch.testing.assert_close(torch.cat([a, b], 2), ref, atol=1e-12, rtol=1e-10)


def test_fast_transformers_agree():
    """pytorch-fast-transformers (the `fast` extra) and the pure-PyTorch back end give the same results."""
    pytest.importorskip("fast_transformers.causal_product", reason="pytorch-fast-transformers not installed")
    from fast_transformers.attention import CausalLinearAttention
    from fast_transformers.masking import LengthMask, TriangularCausalMask
    from fast_transformers.recurrent.attention import RecurrentLinearAttention

    assert LA.fast_available("cpu")
    g = torch.Generator().manual_seed(1)
    b, h, t, d = 2, 4, 37, 16
    q, k, v = (torch.randn(b, h, t, d, generator=g) for _ in range(3))
    ours = LA.causal_linear_attention(q, k, v, impl="torch", chunk=8)
    via_fast_kernel = LA.causal_linear_attention(q, k, v, impl="fast")
    torch.testing.assert_close(via_fast_kernel, ours, atol=1e-5, rtol=1e-5)
    # their attention module (layout (B, T, H, D)) and their recurrent module
    theirs = CausalLinearAttention(d)(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        TriangularCausalMask(t),
        LengthMask(torch.full((b,), t, dtype=torch.long), max_len=t),
        LengthMask(torch.full((b,), t, dtype=torch.long), max_len=t),
    ).transpose(1, 2)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    rec, state = RecurrentLinearAttention(d), None
    outs = []
    for i in range(t):
        o, state = rec(q[:, :, i], k[:, :, i], v[:, :, i], state=state)
        outs.append(o)
    torch.testing.assert_close(torch.stack(outs, 2), ours, atol=1e-5, rtol=1e-5)
    # whole model: same logits and gradients with either kernel
    m_fast = _model("linear", linear_impl="fast", cond_dropout=0.0).train()
    m_torch = _model("linear", linear_impl="torch", cond_dropout=0.0).train()
    age, sex, dx = _cond(2)
    seq = torch.randint(0, V, (2, 36))
    lf, lt = m_fast(seq[:, :-1], age, sex, dx), m_torch(seq[:, :-1], age, sex, dx)
    torch.testing.assert_close(lf, lt, atol=1e-5, rtol=1e-5)
    lf.square().mean().backward()
    lt.square().mean().backward()
    for (name, pf), pt in zip(m_fast.named_parameters(), m_torch.parameters(), strict=True):
        torch.testing.assert_close(pf.grad, pt.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_conditioning_and_unknowns():
    m = _model()
    seq = torch.randint(0, V, (1, 36)).expand(4, 36)
    age = torch.tensor([30.0, 80.0, 80.0, 80.0])
    sex = torch.tensor([0, 0, 1, 1])
    dx = torch.tensor([0, 0, 0, 2])
    logits = m(seq[:, :-1], age, sex, dx)
    assert torch.isfinite(logits).all()
    for a, b in ((0, 1), (1, 2), (2, 3)):  # each covariate changes the prediction
        assert (logits[a] - logits[b]).abs().max() > 1e-3
    # NaN age, out-of-range / unknown indices all mean "unknown"
    nan = m(
        seq[:1, :-1], torch.tensor([math.nan]), torch.tensor([UNKNOWN_SEX]), torch.tensor([UNKNOWN_DIAGNOSIS])
    )
    odd = m(seq[:1, :-1], torch.tensor([math.nan]), torch.tensor([-1]), torch.tensor([7]))
    assert torch.isfinite(nan).all()
    torch.testing.assert_close(nan, odd)
    # condition dropout = 1 in training mode is exactly the all-unknown condition
    m1 = _model(cond_dropout=1.0).train()
    with torch.no_grad():
        dropped = m1(seq[:1, :-1], age[:1], sex[:1], dx[:1])
        m1.eval()
        unknown = m1(
            seq[:1, :-1],
            torch.tensor([math.nan]),
            torch.tensor([UNKNOWN_SEX]),
            torch.tensor([UNKNOWN_DIAGNOSIS]),
        )
    torch.testing.assert_close(dropped, unknown)


def test_save_load_round_trip(tmp_path):
    profile = load_profile(
        "cpu-demo",
        {"prior": {"d_model": 32, "n_layers": 1, "n_heads": 2, "attention": "linear", "ordering": "random"}},
    )
    m = build_prior(profile)
    assert m.num_codes == profile.vqvae.num_embeddings and m.code_shape == profile.code_shape
    save_prior(m, profile, tmp_path / "prior.pt", extra={"note": 1})
    m2, p2 = load_prior(tmp_path / "prior.pt")
    assert p2 == profile and m2.cfg == m.cfg and m2.checkpoint_extra == {"note": 1}
    assert torch.equal(m2.order, m.order)
    for (k, a), b in zip(m.state_dict().items(), m2.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    with pytest.raises(ValueError):
        torch.save({"format": "other"}, tmp_path / "bad.pt")
        load_prior(tmp_path / "bad.pt")


@pytest.mark.parametrize(
    "attention,every", [("softmax", False), ("linear", False), ("softmax", True), ("linear", True)]
)
def test_every_parameter_gets_a_gradient(attention, every):
    """Opacus needs a per-sample gradient for every parameter in every step, even with all covariates known."""
    from opacus.validators import ModuleValidator

    m = _model(attention, cond_dropout=0.0, linear_impl="torch", cond_every_position=every).train()
    assert ModuleValidator.validate(m, strict=False) == []
    seq = torch.randint(0, V, (3, 36))
    age, sex, dx = torch.tensor([60.0, 70.0, 80.0]), torch.tensor([0, 1, 0]), torch.tensor([0, 1, 2])
    m(seq[:, :-1], age, sex, dx).logsumexp(-1).mean().backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None]
    assert missing == []


@pytest.mark.parametrize("attention", ["softmax", "linear"])
def test_one_dp_step(attention):
    """One real DP-SGD step through Opacus' PrivacyEngine (per-sample gradients, clipping, noise, accounting)."""
    from opacus import PrivacyEngine

    from fl_app.train.prior_local import CodeDataset, make_prior_loader, train_prior_local

    torch.manual_seed(0)
    cfg = PriorSection(d_model=32, n_layers=1, n_heads=2, attention=attention, linear_impl="torch")
    model = ConditionalPrior(cfg, V, SHAPE)
    n = 12
    data = CodeDataset(
        torch.randint(0, V, (n, *SHAPE)),
        torch.linspace(40, 90, n),
        torch.arange(n) % 3,
        torch.arange(n) % 4,
    )
    loader = make_prior_loader(data, batch_size=4, shuffle=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = PrivacyEngine(accountant="rdp")
    dp_model, dp_opt, dp_loader = engine.make_private(
        module=model, optimizer=opt, data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = train_prior_local(dp_model, dp_loader, None, optimizer=dp_opt, max_steps=1, dp_engine=engine)
    assert res["dp"] and res["steps"] == 1
    assert 0 < res["epsilon"] < math.inf
    changed = [k for k, v in model.state_dict().items() if k in before and not torch.equal(v, before[k])]
    params = [k for k, _ in model.named_parameters()]
    assert set(params) <= set(changed)  # noise reaches every parameter


@pytest.mark.parametrize(
    "attention,every", [("softmax", False), ("linear", False), ("softmax", True), ("linear", True)]
)
def test_opacus_per_sample_gradients_are_exact(attention, every):
    """Opacus' per-sample gradients equal gradients of each sample alone (no mixing across the batch)."""
    from opacus import GradSampleModule

    torch.manual_seed(0)
    cfg = PriorSection(
        d_model=16, n_layers=1, n_heads=2, attention=attention, cond_dropout=0.0, cond_every_position=every
    )
    model = ConditionalPrior(cfg, V, SHAPE).double().train()
    if every:  # away from its zero initialisation, so that its per-sample gradients involve the input
        torch.nn.init.normal_(model.cond_proj.weight, std=0.1)
    ref = copy.deepcopy(model)  # without Opacus' hooks
    gsm = GradSampleModule(model, loss_reduction="sum")
    seq = torch.randint(0, V, (3, 36))
    age, sex, dx = torch.tensor([60.0, math.nan, 80.0]), torch.tensor([0, 1, 2]), torch.tensor([0, 3, 2])

    def loss_of(mod, sl):
        logits = mod(seq[sl, :-1], age[sl], sex[sl], dx[sl])
        return torch.nn.functional.cross_entropy(logits.reshape(-1, V), seq[sl].reshape(-1), reduction="sum")

    loss_of(gsm, slice(0, 3)).backward()
    for i in range(3):
        grads = torch.autograd.grad(loss_of(ref, slice(i, i + 1)), list(ref.parameters()))
        for (name, p), g in zip(model.named_parameters(), grads, strict=True):
            torch.testing.assert_close(p.grad_sample[i], g, atol=1e-9, rtol=1e-7, msg=name)


def test_condition_at_every_position_extends_a_prefix_only_checkpoint(tmp_path):
    """A prefix-only checkpoint loads into a model with the every-position path, which starts at zero (the same
    logits), then learns (the covariates move every code's logits); any other mismatch is refused."""
    prefix_only = _model()
    save_prior(prefix_only, load_profile("cpu-demo"), tmp_path / "p.pt")
    every = ConditionalPrior(
        PriorSection(d_model=32, n_layers=2, n_heads=4, cond_every_position=True), V, SHAPE
    )
    assert load_prior_weights(every, tmp_path / "p.pt") == ["cond_proj.bias", "cond_proj.weight"]
    every.eval()
    age, sex, dx = _cond(4)
    seq = torch.randint(0, V, (4, 36))
    with torch.no_grad():
        torch.testing.assert_close(every(seq[:, :-1], age, sex, dx), prefix_only(seq[:, :-1], age, sex, dx))
        every.cond_proj.weight.normal_(0.0, 0.3)
        moved = every(seq[:, :-1], age, sex, dx) - prefix_only(seq[:, :-1], age, sex, dx)
    assert moved[:, 1:].abs().amax(dim=(0, 2)).min() > 1e-3  # every code position, not only the first
    wider = ConditionalPrior(PriorSection(d_model=64, n_layers=2, n_heads=4), V, SHAPE)
    with pytest.raises(ValueError, match=r"p\.pt"):
        load_prior_weights(wider, tmp_path / "p.pt")
    save_prior(every, load_profile("cpu-demo"), tmp_path / "e.pt")
    with pytest.raises(ValueError, match="unexpected"):  # the other way round would drop learned weights
        load_prior_weights(_model(), tmp_path / "e.pt")

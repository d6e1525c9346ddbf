"""DP mode of the VQ-VAE with a real Opacus PrivacyEngine (tiny shapes, CPU)."""

from __future__ import annotations

import copy

import pytest
import torch
from opacus import PrivacyEngine
from opacus.validators import ModuleValidator

from fl_app.config import profile_from_dict
from fl_app.models.vqvae import build_vqvae, make_input
from fl_app.train.vqvae_local import make_vqvae_loader, train_vqvae_local, vqvae_loss

pytestmark = [
    pytest.mark.filterwarnings("ignore:Secure RNG turned off"),
    pytest.mark.filterwarnings("ignore:Full backward hook is firing"),
]


def tiny_profile(**vq):
    cfg = {"channels": [4, 8], "num_res_channels": [4, 8], "num_res_layers": 1, "num_embeddings": 16}
    cfg.update({"embedding_dim": 4, "codebook_init_scale": 0.5, "warmup_steps": 0, **vq})
    return profile_from_dict(
        {"name": "tiny", "data": {"shape": [16, 16, 16], "spacing": [3, 3, 3]}, "vqvae": cfg}
    )


def dataset(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n):
        has = i != 1  # one subject without a label map
        label = torch.randint(0, 4, (16, 16, 16), generator=g) if has else torch.full((16, 16, 16), -1)
        items.append(
            {
                "image": torch.rand(1, 16, 16, 16, generator=g),
                "label": label,
                "has_label": torch.tensor(has),
                "age": torch.tensor(70.0),
                "participant_id": f"sub-{i:02d}",  # a string field, as in SiteDataset
            }
        )
    return items


def private(model, data, lr=0.05, noise=1.0, batch_size=2):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    pe = PrivacyEngine()
    gm, dp_opt, loader = pe.make_private(
        module=model,
        optimizer=opt,
        data_loader=make_vqvae_loader(data, batch_size, shuffle=True),
        noise_multiplier=noise,
        max_grad_norm=1.0,
        poisson_sampling=True,
    )
    return pe, gm, dp_opt, loader


def test_dp_model_is_opacus_valid() -> None:
    assert ModuleValidator.validate(build_vqvae(tiny_profile(), dp=True), strict=False) == []
    assert ModuleValidator.validate(build_vqvae(tiny_profile(), joint=False, dp=True), strict=False) == []


def test_per_sample_gradients_match_single_sample_gradients() -> None:
    """Opacus' per-sample gradients (embedding sampler, Conv3d sampler, functorch for ConvTranspose3d)
    equal each sample's own gradient, for every parameter incl. the codebook."""
    torch.manual_seed(0)
    p = tiny_profile()
    model = build_vqvae(p, dp=True)
    plain = copy.deepcopy(model)
    data = dataset(2)
    _, gm, dp_opt, _ = private(model, data)
    image = torch.stack([d["image"] for d in data])
    label = torch.stack([d["label"] for d in data])
    has = torch.stack([d["has_label"] for d in data])
    dp_opt.zero_grad()
    loss, *_ = vqvae_loss(gm, image, label, has, p)
    loss.backward()
    names = [n for n, _ in plain.named_parameters()]
    assert "net.quantizer.quantizer.embedding.weight" in names
    gs = {n: q.grad_sample for n, q in model.named_parameters()}
    for i in range(2):
        plain.zero_grad()
        li, *_ = vqvae_loss(plain, image[i : i + 1], label[i : i + 1], has[i : i + 1], p)
        li.backward()
        for n, q in plain.named_parameters():
            assert gs[n].shape == (2, *q.shape), n
            assert torch.allclose(gs[n][i], q.grad, atol=1e-6, rtol=1e-4), n
    # the codebook does get a (non-zero) per-sample gradient
    assert gs["net.quantizer.quantizer.embedding.weight"].abs().sum() > 0


def _one_dp_step(p, lr: float = 0.05):
    """One DP-SGD step (plain SGD) of a DP-built VQ-VAE; asserts the invariants every DP-safe quantiser
    owes: the exported state is parameters only, each moved by exactly lr times its noised gradient, and one
    step is accounted. Returns the model's parameters and its state before and after."""
    model = build_vqvae(p, dp=True)
    pe, gm, dp_opt, _ = private(model, dataset(4), lr=lr)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    params = dict(model.named_parameters())
    assert set(before) == set(params), "exported state must consist of parameters only"
    batch = {k: torch.stack([d[k] for d in dataset(4)[:2]]) for k in ("image", "label", "has_label")}
    res = train_vqvae_local(gm, [batch], p, optimizer=dp_opt, max_steps=1)
    assert res["dp"] and res["steps"] == 1
    after = model.state_dict()
    assert set(after) == set(before)
    for name, old in before.items():
        grad = params[name].grad
        assert grad is not None, f"{name} has no (noised) gradient"
        # plain SGD: the new value is exactly the optimiser's update of the DP gradient
        assert torch.allclose(after[name], old - lr * grad, atol=1e-7), name
    assert sum(h[2] for h in pe.accountant.history) == 1
    return model, params, before, after


def test_one_dp_step_changes_state_only_through_the_optimiser() -> None:
    torch.manual_seed(0)
    _, params, before, after = _one_dp_step(tiny_profile())
    # the noised gradient is not the clipped batch gradient (noise was added to every tensor)
    cb = params["net.quantizer.quantizer.embedding.weight"]
    assert not torch.equal(
        after["net.quantizer.quantizer.embedding.weight"], before["net.quantizer.quantizer.embedding.weight"]
    )
    assert cb.grad.abs().min() > 0  # unused codes also moved (noise), so nothing is data-selected


def test_one_dp_step_with_fsq_changes_state_only_through_the_optimiser() -> None:
    """FSQ has no codebook and no buffers: the DP model's whole state is encoder and decoder parameters."""
    torch.manual_seed(0)
    p = tiny_profile(quantiser="fsq", fsq_levels=[4, 2, 2], num_embeddings=16, embedding_dim=3)
    model, _, before, _ = _one_dp_step(p)
    assert model.quantiser == "fsq"
    assert not list(model.codebook.parameters()) and not list(model.codebook.buffers())
    assert not any("quantizer" in name for name in before)


def test_forward_alone_changes_nothing_in_dp_mode_but_does_with_ema() -> None:
    image = torch.stack([d["image"] for d in dataset(2)])
    label = torch.stack([d["label"] for d in dataset(2)])
    for dp, expect_change in ((True, False), (False, True)):
        torch.manual_seed(0)
        m = build_vqvae(tiny_profile(quantiser="loss" if dp else "ema"), dp=dp).train()
        before = {k: v.detach().clone() for k, v in m.state_dict().items()}
        out, qloss, _ = m(make_input(image, label, True))
        (out.mean() + qloss).backward()
        changed = [k for k, v in m.state_dict().items() if not torch.equal(before[k], v)]
        assert bool(changed) is expect_change, changed
        if expect_change:  # MONAI's EMA codebook moves in forward, outside any optimiser
            assert "net.quantizer.quantizer.ema_w" in changed


def test_poisson_empty_batches_take_noise_only_steps() -> None:
    torch.manual_seed(3)
    p = tiny_profile()
    model = build_vqvae(p, dp=True)
    pe, gm, dp_opt, loader = private(model, dataset(4), batch_size=1, noise=1.0)
    # Opacus re-creates empty batches from the first batch's structure: with vqvae_collate they are dicts
    batches = [b for _ in range(4) for b in loader]
    empties = [b for b in batches if isinstance(b, dict) and b["image"].shape[0] == 0]
    assert empties, "expected at least one empty Poisson batch with sample rate 1/4"
    # an empty batch still moves the parameters (noise) and is counted by the accountant
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    res = train_vqvae_local(gm, [empties[0]], p, optimizer=dp_opt, epochs=1)
    assert res["empty_batches"] == 1 and res["steps"] == 1
    assert all(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    res = train_vqvae_local(gm, loader, p, optimizer=dp_opt, epochs=3)
    n_batches = 3 * len(loader)
    assert res["steps"] == n_batches
    assert sum(h[2] for h in pe.accountant.history) == 1 + n_batches
    assert pe.get_epsilon(1e-5) > 0


def test_dp_refuses_ema_codebook_and_adversarial_term() -> None:
    torch.manual_seed(0)
    p = tiny_profile(quantiser="ema", adv_weight=0.1)
    ema_model = build_vqvae(p)  # non-DP build keeps MONAI's EMA quantiser
    opt = torch.optim.SGD(ema_model.parameters(), lr=0.1)
    pe = PrivacyEngine()
    gm, dp_opt, loader = pe.make_private(
        module=ema_model,
        optimizer=opt,
        data_loader=make_vqvae_loader(dataset(2), 1, True),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
    )
    with pytest.raises(ValueError, match="loss-learned codebook"):
        train_vqvae_local(gm, loader, p, optimizer=dp_opt, max_steps=1)
    from fl_app.train.vqvae_local import build_discriminator

    _, gm2, dp_opt2, loader2 = private(build_vqvae(tiny_profile(quantiser="loss"), dp=True), dataset(2))
    disc = build_discriminator(p, channels=4, num_layers=2)
    with pytest.raises(ValueError, match="adversarial"):
        train_vqvae_local(
            gm2,
            loader2,
            p,
            optimizer=dp_opt2,
            max_steps=1,
            discriminator=disc,
            disc_optimizer=torch.optim.Adam(disc.parameters()),
        )

"""VQ-VAE builder, codes API, checkpoints, quantisers (tiny shapes, CPU)."""

from __future__ import annotations

import pytest
import torch
from monai.networks.layers.vector_quantizer import EMAQuantizer

from fl_app.config import ConfigError, load_profile, profile_from_dict
from fl_app.models.quantizer import LossQuantizer, restart_dead_codes
from fl_app.models.vqvae import (
    activation_memory_bytes,
    build_vqvae,
    decode,
    encode,
    load_vqvae,
    make_input,
    save_vqvae,
)


def tiny_profile(**vq):
    cfg = {"channels": [4, 8], "num_res_channels": [4, 8], "num_res_layers": 1, "num_embeddings": 16}
    cfg.update({"embedding_dim": 4, **vq})
    return profile_from_dict(
        {"name": "tiny", "data": {"shape": [16, 16, 16], "spacing": [3, 3, 3]}, "vqvae": cfg}
    )


def batch(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(n, 1, 16, 16, 16, generator=g)
    label = torch.randint(0, 4, (n, 16, 16, 16), generator=g)
    return image, label


@pytest.mark.parametrize("joint", [True, False])
@pytest.mark.parametrize("quantiser", ["ema", "loss"])
def test_shapes_and_round_trip(joint: bool, quantiser: str) -> None:
    torch.manual_seed(0)
    p = tiny_profile(quantiser=quantiser)
    m = build_vqvae(p, joint=joint)
    assert m.joint is joint and m.quantiser == quantiser
    assert m.in_channels == (5 if joint else 1)
    image, label = batch()
    codes = encode(m, image, label if joint else None, batch_size=2)
    assert codes.dtype == torch.long and codes.shape == (3, *p.code_shape) == (3, 4, 4, 4)
    assert int(codes.min()) >= 0 and int(codes.max()) < 16
    rec, logits = decode(m, codes, batch_size=2)
    assert rec.shape == (3, 1, 16, 16, 16)
    if joint:
        assert logits is not None and logits.shape == (3, 4, 16, 16, 16)
    else:
        assert logits is None
    # round trip equals the model's own eval-mode forward, and chunking does not change anything
    m.eval()
    with torch.no_grad():
        out, _, idx = m(make_input(image, label, joint))
    assert torch.equal(idx, codes)
    assert torch.allclose(out[:, :1], rec, atol=1e-5)
    assert torch.equal(encode(m, image, label if joint else None, batch_size=3), codes)
    # the codes API never updates EMA statistics (eval mode) and restores the training flag
    m.train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    encode(m, image, label)
    decode(m, codes)
    assert m.training
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_joint_input_masks_unknown_labels() -> None:
    image, label = batch(2)
    label[1] = -1
    x = make_input(image, label, joint=True)
    assert x.shape == (2, 5, 16, 16, 16)
    assert torch.equal(x[0, 1:].argmax(0), label[0]) and torch.all(x[0, 1:].sum(0) == 1)
    assert torch.all(x[1, 1:] == 0)
    assert torch.all(make_input(image, None, joint=True)[:, 1:] == 0)
    assert make_input(image, label, joint=False).shape == (2, 1, 16, 16, 16)


def test_profiles_code_grids() -> None:
    demo = load_profile("cpu-demo")
    assert demo.code_shape == (8, 8, 8)
    m = build_vqvae(demo)
    assert m.num_embeddings == demo.vqvae.num_embeddings and m.downsample_factor == 8
    full = load_profile("full-1mm")
    assert full.code_shape == (10, 14, 10) and full.vqvae.num_embeddings == 2048
    fm = build_vqvae(full, joint=False, dp=True)
    assert fm.downsample_factor == 16 and fm.quantiser == "loss"
    # same architecture on a small volume: 32^3 / 16 = 2^3 codes
    codes = encode(fm, torch.rand(1, 1, 32, 32, 32))
    assert codes.shape == (1, 2, 2, 2)


def test_dp_mode_has_no_buffers_and_uses_loss_codebook() -> None:
    p = tiny_profile(quantiser="ema")
    ema = build_vqvae(p)
    assert isinstance(ema.codebook, EMAQuantizer) and len(list(ema.buffers())) > 0
    with pytest.raises(ConfigError, match=r"vqvae\.quantiser: 'ema' is not DP-safe"):
        build_vqvae(p, dp=True)  # the profile chooses the quantiser; DP refuses a data-dependent one
    dp = build_vqvae(tiny_profile(quantiser="loss"), dp=True)
    assert isinstance(dp.codebook, LossQuantizer) and dp.dp
    assert list(dp.buffers()) == []
    params = dict(dp.named_parameters())
    assert set(dp.state_dict()) == set(params)  # everything exported is a parameter
    assert all(p_.requires_grad for p_ in params.values())


def test_loss_quantizer_gradients_reach_codebook_and_encoder() -> None:
    torch.manual_seed(0)
    q = LossQuantizer(3, num_embeddings=8, embedding_dim=3, commitment_cost=0.25, init_scale=1.0)
    z = torch.randn(2, 3, 2, 2, 2, requires_grad=True)
    zq, loss, idx = q(z)
    assert idx.shape == (2, 2, 2, 2) and zq.shape == z.shape
    # forward value is the selected code, straight-through gradient is the identity
    assert torch.allclose(zq, q.embed(idx))
    (zq.sum() + loss).backward()
    assert q.embedding.weight.grad is not None and q.embedding.weight.grad.abs().sum() > 0
    # codebook gradient = d/de mse(e, sg z): only used codes move
    unused = torch.ones(8, dtype=torch.bool)
    unused[idx.unique()] = False
    assert torch.all(q.embedding.weight.grad[unused] == 0)
    assert z.grad is not None


@pytest.mark.parametrize("quantiser", ["ema", "loss"])
def test_restart_dead_codes(quantiser: str) -> None:
    torch.manual_seed(0)
    m = build_vqvae(tiny_profile(quantiser=quantiser))
    cb = m.codebook
    counts = torch.zeros(16)
    counts[:4] = 5.0
    z = torch.randn(2, 4, 4, 4, 4) * 10
    before = cb.embedding.weight.detach().clone()
    n = restart_dead_codes(cb, counts, z, generator=torch.Generator().manual_seed(1), noise_std=0.0)
    assert n == 12
    w = cb.embedding.weight.detach()
    assert torch.equal(w[:4], before[:4])
    zp = cb.prepare(z) if quantiser == "loss" else z  # centred + l2-normalised for the loss codebook
    flat = zp.permute(0, 2, 3, 4, 1).reshape(-1, 4)
    # each restarted code is one of the encoder outputs
    assert all(torch.isclose(flat, w[i]).all(1).any() for i in range(4, 16))
    if quantiser == "ema":
        # the EMA state reproduces the new codes after the next EMA normalisation
        n_ = cb.ema_cluster_size.sum()
        wts = (cb.ema_cluster_size + cb.epsilon) / (n_ + 16 * cb.epsilon) * n_
        assert torch.allclose(cb.ema_w[4:] / wts[4:, None], w[4:], atol=1e-5)


def test_save_load_round_trip(tmp_path) -> None:
    torch.manual_seed(0)
    p = tiny_profile()
    m = build_vqvae(p, joint=True, dp=True)
    image, label = batch(2)
    codes = encode(m, image, label)
    path = save_vqvae(m, p, tmp_path / "vqvae.pt", extra={"note": "x"})
    m2, p2 = load_vqvae(path)
    assert p2 == p and m2.joint and m2.dp and m2.quantiser == "loss"
    assert m2.checkpoint_extra == {"note": "x"}
    assert torch.equal(encode(m2, image, label), codes)
    assert torch.allclose(decode(m2, codes)[0], decode(m, codes)[0])
    with pytest.raises(ValueError):
        decode(m2, torch.full((1, 4, 4, 4), 99))


def _real_saved_bytes(profile, batch_size: int) -> int:
    """Bytes of the CPU storages a real training forward pass keeps for the backward pass (each storage
    once, parameters excluded): what the allocator really holds, not numel x element size."""
    torch.manual_seed(0)
    m = build_vqvae(profile, dp=True).train()
    shape = tuple(profile.data.shape)
    x = make_input(torch.rand(batch_size, 1, *shape), torch.randint(0, 4, (batch_size, *shape)), m.joint)
    kept: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        kept.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        m(x)
    params = {q.untyped_storage().data_ptr() for q in m.parameters()}
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in kept}
    return sum(n for ptr, n in storages.items() if ptr not in params)


def test_memory_estimate_bounds_a_real_cpu_allocation() -> None:
    """The meta-device estimator against a real forward pass on the CPU at two small grids: an upper bound
    on the bytes really held for the backward pass (it counts a tensor saved twice twice), by less than
    2x, and scaling with the grid as the real allocation does."""
    ratios = []
    for n in (32, 48):
        p = profile_from_dict({"name": "t", "data": {"shape": [n] * 3, "spacing": [3, 3, 3]},
                               "vqvae": {"channels": [8, 16], "num_res_channels": [8, 16], "num_res_layers": 1,
                                         "num_embeddings": 16, "embedding_dim": 4}})  # fmt: skip
        est = activation_memory_bytes(p, batch_size=2, dp=True)["saved_activations"]
        real = _real_saved_bytes(p, 2)
        assert real <= est <= 2 * real, (n, est, real)
        ratios.append(est / real)
    assert ratios[1] == pytest.approx(ratios[0], rel=0.2)


def test_full_profile_memory_estimate_is_under_20gib() -> None:
    """full-1mm at batch 1 on the meta device: right grids, and the estimate (checked against a real
    allocation above) far below an 80 GB GPU."""
    full = load_profile("full-1mm")
    est = activation_memory_bytes(full, batch_size=1, dp=True)
    assert est["output_shape"] == (1, 5, 160, 224, 160)
    assert est["code_shape"] == (1, 10, 14, 10)
    # fp32 upper bound (bf16 autocast needs less); params + grads + Adam states = 4 x params
    total = est["saved_activations"] + 4 * est["params"]
    assert total < 20 * 2**30, total / 2**30


def test_usage_entropy_term_is_per_volume_and_leaves_codebook_to_the_lookup() -> None:
    torch.manual_seed(0)
    q = LossQuantizer(3, num_embeddings=16, embedding_dim=4, normalize=True, entropy_weight=0.5)
    z = q.prepare(torch.randn(3, 4, 4, 4, 4))
    batch = q.usage_entropy_loss(z)
    single = torch.stack([q.usage_entropy_loss(z[i : i + 1]) for i in range(3)]).mean()
    assert torch.allclose(batch, single, atol=1e-6)  # decomposes per sample (DP-SGD requirement)
    # collapsed assignments score worse than spread ones
    w = torch.nn.functional.normalize(q.embedding.weight.detach(), dim=1)
    spread = w[torch.arange(64) % 16].t().reshape(1, 4, 4, 4, 4)
    collapsed = w[torch.zeros(64, dtype=torch.long)].t().reshape(1, 4, 4, 4, 4)
    assert q.usage_entropy_loss(spread) < q.usage_entropy_loss(collapsed)
    # the entropy term reaches the encoder output but not the codebook parameter
    zz = torch.randn(2, 4, 4, 4, 4, requires_grad=True)
    q.usage_entropy_loss(q.prepare(zz)).backward()
    assert zz.grad is not None and zz.grad.abs().sum() > 0
    assert q.embedding.weight.grad is None

"""Finite scalar quantisation (FSQ): an implicit codebook that cannot collapse and keeps no state."""

from __future__ import annotations

import math

import pytest
import torch

from fl_app.config import ConfigError, profile_from_dict
from fl_app.models.quantizer import FSQuantizer
from fl_app.models.vqvae import build_vqvae, decode, encode, load_vqvae, save_vqvae


def _bins(q: FSQuantizer, codes: torch.Tensor) -> torch.Tensor:
    """Code vectors (B, D, *S) in [-1, 1] -> integer bins per channel, channel last."""
    half = torch.tensor([lv // 2 for lv in q.levels], dtype=torch.float32)
    return (codes.movedim(1, -1) * half).round()


@pytest.mark.parametrize("levels", [(8, 5, 5, 5), (4, 3), (2, 2, 2, 2, 2)])
def test_every_code_is_reachable_and_indices_round_trip(levels) -> None:
    q = FSQuantizer(3, levels)
    k = math.prod(levels)
    assert q.num_embeddings == k and q.embedding_dim == len(levels)
    assert not list(q.parameters()) and not list(q.buffers())
    every = torch.arange(k).view(1, k, 1, 1)
    vectors = q.embed(every)  # (1, D, k, 1, 1)
    assert vectors.shape == (1, len(levels), k, 1, 1)
    assert float(vectors.abs().max()) <= 1.0
    # distinct codes are distinct vectors, and the bins of each vector give back its index
    assert torch.unique(vectors.reshape(len(levels), -1).T, dim=0).shape[0] == k
    assert torch.equal(q._to_index(_bins(q, vectors)), every)
    # the bounded encoder output reaches every bin of every channel (from large negative to large positive)
    z = torch.linspace(-12, 12, 4001).view(1, 1, -1, 1, 1).expand(1, len(levels), -1, 1, 1)
    reached = _bins(q, q(z.contiguous())[0]).reshape(-1, len(levels))
    for d, lv in enumerate(levels):
        assert reached[:, d].unique().numel() == lv


def test_forward_is_straight_through_and_matches_the_lookup() -> None:
    torch.manual_seed(0)
    q = FSQuantizer(3, (8, 5, 5, 5))
    z = (torch.randn(2, 4, 3, 3, 3) * 2).requires_grad_()
    zq, loss, idx = q(z)
    assert float(loss) == 0.0 and idx.shape == (2, 3, 3, 3) and idx.dtype == torch.int64
    assert int(idx.min()) >= 0 and int(idx.max()) < 1000
    assert torch.equal(q.quantize(z)[2], idx)
    assert torch.allclose(q.embed(idx), zq)  # decoding codes gives exactly the training-time vectors
    zq.sum().backward()
    assert z.grad is not None and float(z.grad.abs().min()) > 0  # rounding passes the gradient through


def _fsq_profile(**vq):
    cfg = {"channels": [8, 8], "num_res_channels": [8, 8], "num_res_layers": 1, "quantiser": "fsq"}
    cfg.update({"fsq_levels": [4, 3, 2], "num_embeddings": 24, "embedding_dim": 3, **vq})
    return profile_from_dict(
        {"name": "tiny", "data": {"shape": [16, 16, 16], "spacing": [3, 3, 3]}, "vqvae": cfg}
    )


def test_profile_must_agree_with_the_levels() -> None:
    assert _fsq_profile().vqvae.num_embeddings == 24
    with pytest.raises(ConfigError, match="num_embeddings 24"):
        _fsq_profile(num_embeddings=256)
    with pytest.raises(ConfigError, match="embedding_dim 3"):
        _fsq_profile(embedding_dim=8)


def test_fsq_vqvae_encodes_decodes_and_reloads(tmp_path) -> None:
    torch.manual_seed(0)
    p = _fsq_profile()
    model = build_vqvae(p).eval()
    image = torch.rand(2, 1, 16, 16, 16)
    label = torch.randint(0, 4, (2, 16, 16, 16))
    codes = encode(model, image, label)
    assert codes.shape == (2, 4, 4, 4) and int(codes.max()) < 24
    rec, logits = decode(model, codes)
    assert rec.shape == image.shape and logits.shape == (2, 4, 16, 16, 16)
    path = save_vqvae(model, p, tmp_path / "fsq.pt")
    again, prof = load_vqvae(path)
    assert again.quantiser == "fsq" and prof.vqvae.fsq_levels == (4, 3, 2)
    assert torch.equal(encode(again, image, label), codes)

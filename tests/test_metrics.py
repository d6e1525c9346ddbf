"""Metrics against known values."""

from __future__ import annotations

import math

import pytest
import torch

from fl_app.config import load_profile
from fl_app.evaluate import metrics as M


def test_psnr_of_known_noise_level() -> None:
    target = torch.full((2, 1, 16, 16, 16), 0.5)
    sign = torch.ones(16, 16, 16)
    sign[::2] = -1.0  # ±sigma everywhere: MSE is exactly sigma²
    pred = target.clone()
    pred[0, 0] += 0.01 * sign
    pred[1, 0] += 0.1 * sign
    val = M.psnr(pred, target)
    assert val.shape == (2,)
    assert val[0].item() == pytest.approx(40.0, abs=1e-3)  # 10 log10(1 / 1e-4)
    assert val[1].item() == pytest.approx(20.0, abs=1e-3)
    # data range matters: range 2 adds 20 log10(2) dB
    assert M.psnr(pred, target, data_range=2.0)[0].item() == pytest.approx(
        40.0 + 20 * math.log10(2), abs=1e-3
    )


def test_ssim_and_ms_ssim_identity_and_degradation() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 1, 64, 64, 64, generator=g)
    assert M.ssim(x, x).item() == pytest.approx(1.0, abs=1e-4)
    assert M.ms_ssim(x, x).item() == pytest.approx(1.0, abs=1e-4)
    noisy = (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    assert M.ms_ssim(noisy, x).item() < 0.9
    assert (
        M.ssim(noisy, x).item() < M.ssim((x + 0.05 * torch.randn(x.shape, generator=g)).clamp(0, 1), x).item()
    )


def test_ms_ssim_scales_fit_volume() -> None:
    assert M.ms_ssim_scales((64, 64, 64)) == 4
    assert M.ms_ssim_scales((160, 224, 160)) == 5
    assert M.ms_ssim_scales((32, 32, 32)) == 3
    with pytest.raises(ValueError):
        M.ms_ssim_scales((4, 4, 4))


def test_dice_of_known_overlaps() -> None:
    true = torch.zeros(1, 10, 10, 10, dtype=torch.long)
    pred = torch.zeros_like(true)
    true[0, :4] = 1  # 400 voxels of CSF
    pred[0, 2:6] = 1  # 400 voxels, 200 overlapping -> Dice 0.5
    true[0, 6:] = 2  # GM: perfect
    pred[0, 6:] = 2
    pred[0, 0, 0, 0] = 3  # WM: 1 false positive, absent from the truth -> 0
    d = M.dice_per_class(pred, true)
    assert d.shape == (1, 3)
    assert d[0, 0].item() == pytest.approx(0.5)
    assert d[0, 1].item() == pytest.approx(1.0)
    assert d[0, 2].item() == pytest.approx(0.0)
    # a class absent from both maps is NaN, not 1
    assert math.isnan(
        M.dice_per_class(torch.zeros(4, 4, 4, dtype=torch.long), torch.zeros(4, 4, 4, dtype=torch.long))[0, 0]
    )


def test_codebook_perplexity() -> None:
    assert M.codebook_perplexity(torch.arange(16), 16) == pytest.approx(16.0)
    assert M.codebook_perplexity(torch.zeros(100, dtype=torch.long), 16) == pytest.approx(1.0)
    # two codes, 3:1 -> exp(H) with H = -(.75 ln .75 + .25 ln .25)
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert M.codebook_perplexity(torch.tensor([0, 0, 0, 1]), 8) == pytest.approx(math.exp(h))
    assert M.codebook_usage_fraction(torch.tensor([0, 0, 3]), 8) == pytest.approx(0.25)


def test_compression_ratio() -> None:
    p = load_profile("cpu-demo")
    k = p.vqvae.num_embeddings
    r16 = M.compression_ratio(p.code_shape, k, p.data.shape)
    bits = 512 * math.ceil(math.log2(k))
    assert r16 == pytest.approx(bits / (64**3 * 16))
    assert r16 < 0.01
    assert M.compression_ratio_float32(p.code_shape, k, p.data.shape) == pytest.approx(r16 / 2)
    full = load_profile("full-1mm")
    assert full.code_shape == (10, 14, 10)
    assert M.compression_ratio(full.code_shape, 2048, full.data.shape) == pytest.approx(
        1400 * 11 / (160 * 224 * 160 * 16)
    )
    # non-power-of-two codebooks round the bits up
    assert M.code_bits((2, 2, 2), 300) == 8 * 9

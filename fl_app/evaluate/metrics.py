"""Reconstruction and code metrics for 3D volumes.

All image metrics take tensors (B, 1, X, Y, Z) (a (B, X, Y, Z) or (X, Y, Z) tensor is promoted) and
return one value per volume, shape (B,). They use MONAI's metrics: :class:`monai.metrics.PSNRMetric`,
:class:`monai.metrics.SSIMMetric`, :class:`monai.metrics.MultiScaleSSIMMetric` and
:class:`monai.metrics.DiceMetric`.

MS-SSIM in 3D: MONAI's default (5 scales, Gaussian kernel 11) needs every side larger than
``(11 - 1) · 2⁴ = 160`` voxels, which a 64³ volume is not. :func:`ms_ssim` therefore uses a Gaussian
kernel of 7 (σ 1.5) and the largest number of scales ≤ 5 the volume allows
(``side // 2**(scales-1) > kernel - 1``): 4 scales at 64³ (coarsest 8³), 5 at 160×224×160. The
scale weights are the first ``scales`` of Wang et al.'s (0.0448, 0.2856, 0.3001, 0.2363, 0.1333),
renormalised to sum to 1.

Compression ratio: the bits of a code grid (cells × ceil(log2 K)) over the bits of the volume at
16 bits per voxel (scanners' native depth; :func:`compression_ratio`) or float32
(:func:`compression_ratio_float32`). cpu-demo: 512 · 8 / (64³ · 16) = 0.098 %.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from monai.metrics import DiceMetric, MultiScaleSSIMMetric, PSNRMetric, SSIMMetric

__all__ = [
    "MS_SSIM_WEIGHTS",
    "code_bits",
    "code_mode_agreement",
    "codebook_perplexity",
    "codebook_usage_fraction",
    "compression_ratio",
    "compression_ratio_float32",
    "dice_per_class",
    "ms_ssim",
    "ms_ssim_scales",
    "psnr",
    "ssim",
]

MS_SSIM_WEIGHTS: tuple[float, ...] = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def _as5d(x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 3:
        x = x[None, None]
    elif x.dim() == 4:
        x = x[:, None]
    if x.dim() != 5:
        raise ValueError(f"expected (B, 1, X, Y, Z), (B, X, Y, Z) or (X, Y, Z), got {tuple(x.shape)}")
    return x.float()


def psnr(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB, ``10 log10(range² / MSE)``, per volume (B,)."""
    p, t = _as5d(pred), _as5d(target)
    return PSNRMetric(max_val=data_range, reduction="none")(p, t).reshape(-1)


def ssim(
    pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0, kernel_size: int = 7
) -> torch.Tensor:
    """3D SSIM with a Gaussian window (σ 1.5), per volume (B,)."""
    p, t = _as5d(pred), _as5d(target)
    metric = SSIMMetric(spatial_dims=3, data_range=data_range, win_size=kernel_size, reduction="none")
    return metric(p, t).reshape(-1)


def ms_ssim_scales(shape: Sequence[int], kernel_size: int = 7, max_scales: int = 5) -> int:
    """Largest number of MS-SSIM scales (≤ ``max_scales``) a volume of ``shape`` supports."""
    scales = max_scales
    while scales > 1 and any(s // 2 ** (scales - 1) <= kernel_size - 1 for s in shape):
        scales -= 1
    if any(s <= kernel_size - 1 for s in shape):
        raise ValueError(f"volume {tuple(shape)} is too small for kernel {kernel_size}")
    return scales


def ms_ssim(
    pred: torch.Tensor,
    target: torch.Tensor,
    data_range: float = 1.0,
    kernel_size: int = 7,
    scales: int | None = None,
) -> torch.Tensor:
    """3D multi-scale SSIM per volume (B,); see the module docstring for the scale choice."""
    p, t = _as5d(pred), _as5d(target)
    n = scales or ms_ssim_scales(p.shape[2:], kernel_size)
    w = MS_SSIM_WEIGHTS[:n]
    weights = tuple(v / sum(w) for v in w)
    metric = MultiScaleSSIMMetric(
        spatial_dims=3, data_range=data_range, kernel_size=kernel_size, weights=weights, reduction="none"
    )
    return metric(p, t).reshape(-1)


def dice_per_class(
    pred_labels: torch.Tensor,
    true_labels: torch.Tensor,
    num_classes: int = 4,
    include_background: bool = False,
) -> torch.Tensor:
    """Dice of each tissue class per volume.

    Args:
        pred_labels, true_labels: integer label maps (B, X, Y, Z) (or (X, Y, Z)).
        num_classes: number of labels incl. background (0 background, 1 CSF, 2 GM, 3 WM).
        include_background: also return class 0.

    Returns:
        (B, C) with C = num_classes - 1 (or num_classes); 0 where a class is predicted but absent from
        the truth; NaN where a class is absent from both maps.
    """
    p, t = pred_labels.long(), true_labels.long()
    if p.dim() == 3:
        p, t = p[None], t[None]
    if p.shape != t.shape:
        raise ValueError(f"label maps differ in shape: {tuple(p.shape)} vs {tuple(t.shape)}")
    ph = torch.nn.functional.one_hot(p, num_classes).permute(0, 4, 1, 2, 3).float()
    th = torch.nn.functional.one_hot(t, num_classes).permute(0, 4, 1, 2, 3).float()
    # ignore_empty=False scores a class predicted but absent from the truth as 0 (a false positive);
    # a class absent from both maps is set to NaN below (nothing to score).
    metric = DiceMetric(include_background=include_background, reduction="none", ignore_empty=False)
    dice = metric(ph, th)
    first = 0 if include_background else 1
    absent = (ph[:, first:].sum((2, 3, 4)) == 0) & (th[:, first:].sum((2, 3, 4)) == 0)
    return dice.masked_fill(absent, float("nan"))


def codebook_perplexity(indices_or_counts: torch.Tensor, num_embeddings: int | None = None) -> float:
    """``exp(entropy)`` of code usage: 1 = one code used, K = all codes used equally.

    Args:
        indices_or_counts: code indices (any shape, int) or usage counts (K,) float.
        num_embeddings: K (needed for indices).
    """
    x = indices_or_counts
    counts = (
        x.double()
        if x.is_floating_point()
        else torch.bincount(x.reshape(-1).long(), minlength=num_embeddings or 0).double()
    )
    total = counts.sum()
    if total <= 0:
        return float("nan")
    p = counts / total
    ent = -(p * torch.log(p.clamp_min(1e-300))).sum()
    return float(torch.exp(ent))


def codebook_usage_fraction(indices_or_counts: torch.Tensor, num_embeddings: int) -> float:
    """Fraction of the K codes used at least once."""
    x = indices_or_counts
    counts = x if x.is_floating_point() else torch.bincount(x.reshape(-1).long(), minlength=num_embeddings)
    return float((counts > 0).sum()) / num_embeddings


def code_bits(code_shape: Sequence[int], num_embeddings: int) -> int:
    """Bits of one code grid: cells × ceil(log2 K)."""
    return math.prod(code_shape) * max(1, math.ceil(math.log2(num_embeddings)))


def compression_ratio(
    code_shape: Sequence[int], num_embeddings: int, volume_shape: Sequence[int], bits_per_voxel: int = 16
) -> float:
    """Code bits over volume bits at ``bits_per_voxel`` (16 = scanners' native depth); a fraction."""
    return code_bits(code_shape, num_embeddings) / (math.prod(volume_shape) * bits_per_voxel)


def compression_ratio_float32(
    code_shape: Sequence[int], num_embeddings: int, volume_shape: Sequence[int]
) -> float:
    """Code bits over the bits of the volume stored as float32."""
    return compression_ratio(code_shape, num_embeddings, volume_shape, bits_per_voxel=32)


def code_mode_agreement(
    train_codes: torch.Tensor, test_codes: torch.Tensor, where: torch.Tensor | None = None
) -> float:
    """Fraction of held-out codes equal to the training set's most frequent code at their grid position.

    Near 1, the code grid hardly depends on the subject (a *positional* code): a prior then has almost
    nothing left to learn from age, sex or diagnosis.

    Args:
        train_codes: (N, *grid) integer codes of the training subjects.
        test_codes: (M, *grid) codes of held-out subjects.
        where: optional (M, *grid) bool mask of the held-out positions to count (e.g. mostly-brain cells).

    Returns:
        The fraction (NaN if ``where`` selects nothing).
    """
    tr = train_codes.reshape(train_codes.shape[0], -1).long()
    te = test_codes.reshape(test_codes.shape[0], -1).long()
    if tr.shape[1] != te.shape[1]:
        raise ValueError(f"grids differ: {tuple(train_codes.shape[1:])} vs {tuple(test_codes.shape[1:])}")
    vocab = int(max(tr.max(), te.max())) + 1
    counts = torch.zeros(tr.shape[1], vocab, dtype=torch.int64)
    counts.scatter_add_(1, tr.T, torch.ones_like(tr.T))
    same = te == counts.argmax(1)[None]
    if where is not None:
        sel = where.reshape(te.shape).bool()
        return float(same[sel].double().mean()) if sel.any() else math.nan
    return float(same.double().mean())

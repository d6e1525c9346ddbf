"""Vector quantisers for the VQ-VAE, including a codebook that differential privacy can cover.

MONAI's :class:`~monai.networks.layers.vector_quantizer.EMAQuantizer` learns its codebook by an
exponential moving average of raw batch statistics (``ema_cluster_size``, ``ema_w`` buffers and an
in-place copy into ``embedding.weight``), all outside the optimiser. Under DP-SGD that update is neither
clipped nor noised, yet the codebook is part of the state that leaves a site. :class:`LossQuantizer`
instead learns the codebook through the loss (van den Oord et al. 2017, eq. 3): a codebook term
``||sg[z_e] - e||²`` plus a commitment term ``β ||z_e - sg[e]||²``, with the straight-through
estimator for the encoder. Its only state is one parameter (``embedding.weight``, an ``nn.Embedding`` so
Opacus computes per-sample gradients with its registered embedding grad sampler); it has no buffers and
changes nothing in ``forward``.

Both quantisers share the interface MONAI's ``VectorQuantizer`` wrapper and ``VQVAE`` expect:
``quantize(z) -> (flat, one_hot, indices)``, ``embed(indices) -> z_q`` and
``forward(z) -> (z_q_straight_through, loss, indices)``.

:func:`restart_dead_codes` re-seeds unused codes from encoder outputs of the local data; it mutates
parameters outside the optimiser and is therefore refused for DP training (see ``fl_app.train``).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from monai.networks.layers.vector_quantizer import EMAQuantizer
from torch import nn

__all__ = ["FSQuantizer", "LossQuantizer", "codebook_usage", "restart_dead_codes"]


def _no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Disable autocast (the lookup runs in float32); a no-op on devices without autocast (meta)."""
    if device.type in ("cuda", "cpu", "xpu"):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


class LossQuantizer(nn.Module):
    """Codebook learned by gradient descent (codebook + commitment loss, straight-through estimator).

    Args:
        spatial_dims: 2 or 3.
        num_embeddings: codebook size K.
        embedding_dim: code vector dimension D (= encoder output channels).
        commitment_cost: β, weight of the commitment term ``||z_e - sg[e]||²``.
        init_scale: codes are initialised uniformly in ``[-init_scale, init_scale]``
            (data-independent, so safe for DP).
        normalize: l2-normalise encoder outputs and codes before the lookup (cosine-similarity VQ,
            Yu et al. 2022, "ViT-VQGAN"): the decoder receives unit code vectors. Random codes on the
            unit sphere are spread over the directions encoder outputs take, which keeps far more
            codes in use than a small-norm init without any data-dependent initialisation or restart
            (so it also works under DP). Before normalising, each volume's encoder output is centred
            (its mean over the code grid is subtracted per channel): at initialisation the outputs of
            a ReLU encoder share one dominant direction that would map every position to the same
            code. Centring uses only the volume's own statistics, so the loss still decomposes per
            sample as DP-SGD needs.
        entropy_weight: weight of a per-volume code-usage term against collapse that needs no restart
            (so it is available under DP): with soft assignments ``p = softmax(-dist / T)`` of each
            grid position, ``mean_n H(p_n) - H(mean_n p_n)`` -- confident assignments, but spread over
            the codebook within each volume. It is computed per volume (decomposes per sample) and
            reaches only the encoder (the codebook enters detached, so its gradient still flows only
            through the ``nn.Embedding`` lookup that Opacus' per-sample gradients cover).
        entropy_temperature: T of the soft assignments (distances of unit vectors lie in [0, 4]).
    """

    def __init__(
        self,
        spatial_dims: int,
        num_embeddings: int,
        embedding_dim: int,
        commitment_cost: float = 0.25,
        init_scale: float | None = None,
        normalize: bool = False,
        entropy_weight: float = 0.0,
        entropy_temperature: float = 0.1,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        self.spatial_dims = spatial_dims
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.commitment_cost = float(commitment_cost)
        self.normalize = bool(normalize)
        self.entropy_weight = float(entropy_weight)
        self.entropy_temperature = float(entropy_temperature)
        self.embedding = nn.Embedding(num_embeddings, embedding_dim)
        scale = init_scale if init_scale is not None else 1.0 / num_embeddings
        nn.init.uniform_(self.embedding.weight, -scale, scale)
        # channel-last permutation (B, C, *S) -> (B, *S, C) and back
        self._to_last = [0, *range(2, spatial_dims + 2), 1]
        self._to_first = [0, spatial_dims + 1, *range(1, spatial_dims + 1)]

    def prepare(self, z: torch.Tensor) -> torch.Tensor:
        """Encoder output (B, D, *S) -> the vectors looked up: centred per volume and l2-normalised per
        position when ``normalize``, else unchanged."""
        if not self.normalize:
            return z
        z = z - z.mean(dim=tuple(range(2, z.dim())), keepdim=True)
        return F.normalize(z, dim=1)

    def quantize(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Nearest-code assignment (no gradient).

        Args:
            inputs: encoder output (B, D, *S).

        Returns:
            flat inputs (B·prod(S), D), one-hot assignments (B·prod(S), K) and indices (B, *S) int64.
        """
        with torch.no_grad(), _no_autocast(inputs.device):
            idx_shape = [inputs.shape[0], *inputs.shape[2:]]
            flat = self.prepare(inputs.float()).permute(self._to_last).reshape(-1, self.embedding_dim)
            w = self.embedding.weight.detach().float()
            if self.normalize:
                w = F.normalize(w, dim=1)
            dist = (flat**2).sum(1, keepdim=True) + (w**2).sum(1)[None, :] - 2.0 * flat @ w.t()
            indices = dist.argmin(dim=1)
            one_hot = F.one_hot(indices, self.num_embeddings).float()
            return flat, one_hot, indices.view(idx_shape)

    def embed(self, embedding_indices: torch.Tensor) -> torch.Tensor:
        """Codes (B, *S) int64 -> code vectors (B, D, *S), channel first, float32."""
        with _no_autocast(embedding_indices.device):
            e = self.embedding(embedding_indices)
            if self.normalize:
                e = F.normalize(e, dim=-1)
            return e.permute(self._to_first).contiguous()

    def usage_entropy_loss(self, z: torch.Tensor) -> torch.Tensor:
        """``mean_b [mean_n H(p_bn) - H(mean_n p_bn)]`` for prepared encoder outputs z (B, D, *S)."""
        b = z.shape[0]
        flat = z.permute(self._to_last).reshape(b, -1, self.embedding_dim)  # (B, N, D)
        w = self.embedding.weight.detach().float()
        if self.normalize:
            w = F.normalize(w, dim=1)
        dist = (flat**2).sum(-1, keepdim=True) + (w**2).sum(1) - 2.0 * flat @ w.t()  # (B, N, K)
        p = torch.softmax(-dist / self.entropy_temperature, dim=-1)
        per_position = _entropy(p).mean(1)  # (B,)
        per_volume = _entropy(p.mean(1))  # (B,)
        return (per_position - per_volume).mean()

    def forward(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Quantise ``inputs`` (B, D, *S).

        Returns:
            ``(z_q, loss, indices)``: straight-through quantised tensor (B, D, *S) whose gradient flows
            to ``inputs`` (through the normalisation when ``normalize``); scalar loss ``mse(e, sg[z]) + β·mse(z, sg[e])`` whose gradient reaches the
            codebook; indices (B, *S) int64.
        """
        _, _, indices = self.quantize(inputs)
        quantized = self.embed(indices)  # the one place the codebook enters the graph
        z = self.prepare(inputs.float())
        codebook_loss = F.mse_loss(quantized, z.detach())
        commitment_loss = F.mse_loss(z, quantized.detach())
        loss = codebook_loss + self.commitment_cost * commitment_loss
        if self.entropy_weight > 0:
            loss = loss + self.entropy_weight * self.usage_entropy_loss(z)
        quantized_st = z + (quantized - z).detach()
        return quantized_st, loss, indices


class FSQuantizer(nn.Module):
    """Finite scalar quantisation (Mentzer et al. 2023): each of the D encoder channels is bounded and
    rounded to one of ``levels[d]`` values; a code is the tuple of rounded values, so the implicit codebook
    has ``prod(levels)`` entries and every one of them is reachable by construction.

    It has no parameters and no data-dependent state: nothing is learned outside the optimiser, there is no
    codebook or commitment loss, no entropy term and no dead-code restart. Under DP-SGD every exported
    tensor is therefore an encoder or decoder parameter updated only by the (noised) optimiser step.

    Channel d is mapped by ``tanh`` into ``levels[d]`` integer bins (even level counts are shifted by half a
    bin so the bins are symmetric after rounding), rounded with a straight-through gradient and scaled to
    [-1, 1]. Index of a code: mixed-radix number of its per-channel bins (channel 0 is the fastest digit).

    Args:
        spatial_dims: 2 or 3.
        levels: number of values per channel, e.g. ``(8, 5, 5, 5)`` for 1,000 codes.
    """

    def __init__(self, spatial_dims: int, levels: tuple[int, ...] | list[int]) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        levels = tuple(int(v) for v in levels)
        if not levels or min(levels) < 2:
            raise ValueError(f"every FSQ level count must be >= 2, got {levels}")
        self.spatial_dims = spatial_dims
        self.levels = levels
        self.embedding_dim = len(levels)
        self.num_embeddings = math.prod(levels)
        self._to_last = [0, *range(2, spatial_dims + 2), 1]
        self._to_first = [0, spatial_dims + 1, *range(1, spatial_dims + 1)]

    def _constants(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        lv = torch.tensor(self.levels, dtype=torch.float32, device=device)
        half_width = torch.floor(lv / 2)  # integer bins run from -half_width (+1 if even) to half_width
        basis = torch.tensor([math.prod(self.levels[:d]) for d in range(len(self.levels))], device=device)
        return lv, half_width, basis

    def _bins(self, z: torch.Tensor) -> torch.Tensor:
        """Channel-last z (..., D) -> bounded values whose rounding is the integer bin of each channel."""
        lv, _, _ = self._constants(z.device)
        half = (lv - 1) * (1 + 1e-3) / 2  # a hair wider than the bins, so the outermost ones are reached
        offset = (1 - lv % 2) * 0.5  # even counts: bins -L/2 .. L/2 - 1
        shift = torch.atanh(offset / half)
        return torch.tanh(z + shift) * half - offset

    def _to_index(self, bins: torch.Tensor) -> torch.Tensor:
        _, half_width, basis = self._constants(bins.device)
        return ((bins.round() + half_width).long() * basis).sum(-1)

    def quantize(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Codes of ``inputs`` (B, D, *S), no gradient: ``(flat (N, D), one_hot (N, K) or empty, indices
        (B, *S))``; the one-hot matrix is left empty (K may be large and no caller needs it)."""
        with torch.no_grad(), _no_autocast(inputs.device):
            flat = inputs.float().permute(self._to_last).reshape(-1, self.embedding_dim)
            idx = self._to_index(self._bins(flat))
            return flat, flat.new_zeros(0, self.num_embeddings), idx.view(inputs.shape[0], *inputs.shape[2:])

    def embed(self, embedding_indices: torch.Tensor) -> torch.Tensor:
        """Codes (B, *S) int64 -> code vectors (B, D, *S) in [-1, 1], float32."""
        _, half_width, basis = self._constants(embedding_indices.device)
        lv = basis.new_tensor(self.levels)
        bins = (embedding_indices.long()[..., None] // basis) % lv - half_width.long()
        return (bins.float() / half_width).permute(self._to_first).contiguous()

    def forward(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(z_q, loss, indices)``: z_q (B, D, *S) with a straight-through gradient to ``inputs``, a zero
        loss (FSQ needs none) and indices (B, *S) int64."""
        with _no_autocast(inputs.device):
            z = inputs.float().permute(self._to_last)
            bins = self._bins(z)
            rounded = bins + (bins.round() - bins).detach()
            _, half_width, _ = self._constants(inputs.device)
            zq = (rounded / half_width).permute(self._to_first).contiguous()
            idx = self._to_index(bins.detach())
        return zq, inputs.new_zeros((), dtype=torch.float32), idx


def _entropy(p: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return -(p * torch.log(p.clamp_min(1e-12))).sum(dim)


def codebook_usage(indices: torch.Tensor, num_embeddings: int) -> torch.Tensor:
    """Counts of each code in ``indices`` (any shape, int64) -> float tensor (K,)."""
    return torch.bincount(indices.reshape(-1).long(), minlength=num_embeddings).float()


@torch.no_grad()
def restart_dead_codes(
    quantizer: nn.Module,
    counts: torch.Tensor,
    encoder_outputs: torch.Tensor,
    generator: torch.Generator | None = None,
    noise_std: float = 1e-3,
) -> int:
    """Re-seed codes that were never used with random local encoder outputs (non-DP training only).

    Args:
        quantizer: a :class:`LossQuantizer` or MONAI ``EMAQuantizer``.
        counts: usage counts (K,) accumulated since the last restart.
        encoder_outputs: encoder outputs (B, D, *S) (passed through ``LossQuantizer.prepare``) or
            already prepared flat vectors (N, D) to sample from.
        generator: optional RNG for reproducible choices.
        noise_std: small jitter added so restarted codes do not coincide.

    Returns:
        Number of codes restarted.
    """
    dead = torch.nonzero(counts.to(torch.device("cpu")) == 0).flatten()
    if dead.numel() == 0:
        return 0
    d = quantizer.embedding_dim
    flat = encoder_outputs
    if isinstance(quantizer, LossQuantizer) and flat.dim() != 2:
        flat = quantizer.prepare(flat)
    if flat.dim() != 2:
        perm = [0, *range(2, flat.dim()), 1]
        flat = flat.permute(perm).reshape(-1, d)
    flat = flat.detach().float()
    weight = quantizer.embedding.weight
    pick = torch.randint(0, flat.shape[0], (dead.numel(),), generator=generator).to(flat.device)
    jitter = torch.randn(dead.numel(), d, generator=generator).to(flat.device) * noise_std
    new = (flat[pick] + jitter).to(weight.device, weight.dtype)
    dead = dead.to(weight.device)
    weight.data[dead] = new
    if isinstance(quantizer, EMAQuantizer):
        # keep the EMA statistics consistent: embedding = ema_w / smoothed cluster size
        quantizer.ema_cluster_size.data[dead] = 1.0
        n = quantizer.ema_cluster_size.sum()
        k = quantizer.num_embeddings
        eps = quantizer.epsilon
        weights = (quantizer.ema_cluster_size + eps) / (n + k * eps) * n
        quantizer.ema_w.data[dead] = new * weights[dead].unsqueeze(1)
    return int(dead.numel())

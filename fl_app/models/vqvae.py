"""3D VQ-VAE (MONAI ``VQVAE``) built from a profile, with joint tissue labels and a DP-safe codebook.

Volumes (B, 1, X, Y, Z) become integer code grids (B, X/f, Y/f, Z/f) with ``f = 2 ** levels``
(``cpu-demo``: 64³ → 8³; ``full-1mm``: 160×224×160 → 10×14×10) and back.

*Joint* mode (profile ``vqvae.joint_labels``): the encoder sees the image plus a one-hot tissue map
(4 channels: background, CSF, GM, WM; a subject without labels gets all-zero label channels) and the
decoder outputs the image plus 4 label logits. *Image-only* mode: 1 channel in, 1 out.

Quantiser modes: ``"ema"`` is MONAI's EMA codebook (buffers updated in ``forward`` from raw batch
statistics); ``"loss"`` is :class:`fl_app.models.quantizer.LossQuantizer` (codebook learned through
the loss); ``"fsq"`` is :class:`fl_app.models.quantizer.FSQuantizer` (finite scalar quantisation: no
codebook, no state). The profile's ``vqvae.quantiser`` chooses; ``build_vqvae(..., dp=True)`` (a model for
DP-SGD) refuses a quantiser with data-dependent state (``"ema"``), so that every exported tensor is a parameter
updated only by the (DP) optimiser.

Public API::

    model = build_vqvae(profile, joint=None, dp=False)
    codes = encode(model, image, label=None)          # (B, cx, cy, cz) int64
    image, label_logits = decode(model, codes)        # (B,1,X,Y,Z), (B,4,X,Y,Z) | None
    save_vqvae(model, profile, path, extra=None); model, profile = load_vqvae(path)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.layers.vector_quantizer import EMAQuantizer, VectorQuantizer
from monai.networks.nets import VQVAE
from torch import nn

from fl_app.config import TISSUE_LABELS, ConfigError, Profile, profile_from_dict
from fl_app.models.quantizer import FSQuantizer, LossQuantizer
from fl_app.train.common import autocast

__all__ = [
    "NUM_TISSUE_CLASSES",
    "SynthVQVAE",
    "activation_memory_bytes",
    "build_vqvae",
    "decode",
    "encode",
    "load_vqvae",
    "make_input",
    "save_vqvae",
    "unwrap",
]

NUM_TISSUE_CLASSES = len(TISSUE_LABELS)
CHECKPOINT_FORMAT = "synthbrain-vqvae/1"


class SynthVQVAE(nn.Module):
    """A MONAI :class:`~monai.networks.nets.VQVAE` plus the mode flags synthbrain needs.

    Attributes:
        net: the MONAI VQVAE (``net.encoder``, ``net.quantizer.quantizer``, ``net.decoder``).
        joint: input = image + one-hot labels, output = image + label logits.
        quantiser: ``"ema"``, ``"loss"`` or ``"fsq"``.
        dp: built for differentially private training (its quantiser has no data-dependent state).
        num_embeddings, embedding_dim, downsample_factor: codebook size K, code dimension D, f.
    """

    def __init__(self, net: VQVAE, *, joint: bool, quantiser: str, dp: bool, downsample_factor: int) -> None:
        super().__init__()
        self.net = net
        self.joint = joint
        self.quantiser = quantiser
        self.dp = dp
        self.num_classes = NUM_TISSUE_CLASSES if joint else 0
        self.num_embeddings = net.num_embeddings
        self.embedding_dim = net.embedding_dim
        self.downsample_factor = downsample_factor

    @property
    def in_channels(self) -> int:
        return 1 + self.num_classes

    @property
    def codebook(self) -> nn.Module:
        """The inner quantiser (``LossQuantizer``, ``EMAQuantizer`` or ``FSQuantizer``)."""
        return self.net.quantizer.quantizer

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encode, quantise, decode.

        Args:
            x: network input (B, 1 + C, X, Y, Z), see :func:`make_input`.

        Returns:
            ``(out, quant_loss, indices)``: out (B, 1 + C, X, Y, Z) = image channel then C label logits;
            scalar quantisation loss; code indices (B, X/f, Y/f, Z/f) int64.
        """
        z = self.net.encode(x)
        zq, qloss, indices = self.codebook(z)
        out = self.net.decode(zq)
        return out, qloss, indices

    def encode_indices(self, x: torch.Tensor) -> torch.Tensor:
        """Network input (B, 1 + C, X, Y, Z) -> codes (B, X/f, Y/f, Z/f) int64, no state change."""
        return self.codebook.quantize(self.net.encode(x))[2]

    def decode_indices(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, cx, cy, cz) int64 -> network output (B, 1 + C, X, Y, Z)."""
        return self.net.decode(self.codebook.embed(codes))

    def encoder_output(self, x: torch.Tensor) -> torch.Tensor:
        """Continuous encoder output (B, D, cx, cy, cz)."""
        return self.net.encode(x)


def unwrap(model: nn.Module) -> SynthVQVAE:
    """Return the :class:`SynthVQVAE` inside an Opacus ``GradSampleModule`` / DDP wrapper."""
    m = model
    for _ in range(4):
        if isinstance(m, SynthVQVAE):
            return m
        m = getattr(m, "_module", None) or getattr(m, "module", None)
        if m is None:
            break
    raise TypeError(f"not a SynthVQVAE (or a wrapper of one): {type(model).__name__}")


def build_vqvae(profile: Profile, joint: bool | None = None, dp: bool = False) -> SynthVQVAE:
    """Build the VQ-VAE of ``profile``.

    Args:
        profile: the consortium profile (``profile.vqvae`` fixes channels, levels, codebook).
        joint: image + tissue labels (default: ``profile.vqvae.joint_labels``); False = image only.
        dp: build for DP-SGD: refuse (:class:`~fl_app.config.ConfigError`) a quantiser with data-dependent
            buffers, e.g. MONAI's EMA codebook; the quantiser itself is always ``profile.vqvae.quantiser``.

    Returns:
        :class:`SynthVQVAE` whose code grid is ``profile.code_shape``.
    """
    cfg = profile.vqvae
    joint = cfg.joint_labels if joint is None else bool(joint)
    quantiser = cfg.quantiser
    n_levels = len(cfg.channels)
    channels_io = 1 + (NUM_TISSUE_CLASSES if joint else 0)
    net = VQVAE(
        spatial_dims=3,
        in_channels=channels_io,
        out_channels=channels_io,
        channels=tuple(cfg.channels),
        num_res_layers=cfg.num_res_layers,
        num_res_channels=tuple(cfg.num_res_channels),
        downsample_parameters=tuple((2, 4, 1, 1) for _ in range(n_levels)),
        upsample_parameters=tuple((2, 4, 1, 1, 0) for _ in range(n_levels)),
        num_embeddings=cfg.num_embeddings,
        embedding_dim=cfg.embedding_dim,
        commitment_cost=cfg.commitment_cost,
        decay=cfg.ema_decay,
        dropout=cfg.dropout,
        ddp_sync=False,
        use_checkpointing=cfg.checkpointing,
    )
    if quantiser == "loss":
        net.quantizer = VectorQuantizer(
            quantizer=LossQuantizer(  # type: ignore[arg-type]
                spatial_dims=3,
                num_embeddings=cfg.num_embeddings,
                embedding_dim=cfg.embedding_dim,
                commitment_cost=cfg.commitment_cost,
                init_scale=cfg.codebook_init_scale,
                normalize=cfg.codebook_normalize,
                entropy_weight=cfg.entropy_weight,
                entropy_temperature=cfg.entropy_temperature,
            )
        )
    elif quantiser == "fsq":
        net.quantizer = VectorQuantizer(quantizer=FSQuantizer(3, cfg.fsq_levels))  # type: ignore[arg-type]
    else:
        assert isinstance(net.quantizer.quantizer, EMAQuantizer)
    if dp and any(True for _ in net.quantizer.buffers()):
        raise ConfigError(
            f"vqvae.quantiser: {quantiser!r} is not DP-safe (its codebook moves with batch statistics, outside "
            "the DP optimiser); a site running DP-SGD needs a DP-safe quantiser, e.g. vqvae.quantiser: loss"
        )
    return SynthVQVAE(net, joint=joint, quantiser=quantiser, dp=dp, downsample_factor=cfg.downsample_factor)


def make_input(image: torch.Tensor, label: torch.Tensor | None, joint: bool) -> torch.Tensor:
    """Build the network input.

    Args:
        image: (B, 1, X, Y, Z) float.
        label: (B, X, Y, Z) int64 in 0..3, or -1 where unknown (a subject without labels); None = unknown.
        joint: append 4 one-hot label channels (all zero where the label is unknown).

    Returns:
        (B, 1, X, Y, Z) if not joint else (B, 5, X, Y, Z), dtype of ``image``.
    """
    if image.dim() != 5 or image.shape[1] != 1:
        raise ValueError(f"image must be (B, 1, X, Y, Z), got {tuple(image.shape)}")
    if not joint:
        return image
    if label is None:
        onehot = image.new_zeros((image.shape[0], NUM_TISSUE_CLASSES, *image.shape[2:]))
    else:
        if label.shape != (image.shape[0], *image.shape[2:]):
            raise ValueError(f"label must be (B, X, Y, Z) matching image, got {tuple(label.shape)}")
        lab = label.to(image.device).long()
        known = (lab >= 0).unsqueeze(1)
        onehot = F.one_hot(lab.clamp(min=0), NUM_TISSUE_CLASSES).permute(0, 4, 1, 2, 3).to(image.dtype)
        onehot = onehot * known.to(image.dtype)
    return torch.cat([image, onehot], dim=1)


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def encode(
    model: nn.Module,
    image: torch.Tensor,
    label: torch.Tensor | None = None,
    batch_size: int = 4,
    amp: bool = False,
) -> torch.Tensor:
    """Volumes -> code grids, in eval mode (no EMA update), in chunks of ``batch_size``.

    Args:
        model: a :class:`SynthVQVAE` (or a wrapper of one).
        image: (B, 1, X, Y, Z) float in about [0, 1], on any device.
        label: (B, X, Y, Z) int64 tissue labels (-1 = unknown) for a joint model; ignored otherwise.
        batch_size: volumes per forward pass.
        amp: bf16 autocast (CUDA only).

    Returns:
        LongTensor (B, cx, cy, cz) on ``image``'s device.
    """
    m = unwrap(model)
    dev = _device_of(m)
    was_training = m.training
    m.eval()
    try:
        out = []
        for s in range(0, image.shape[0], batch_size):
            img = image[s : s + batch_size].to(dev, torch.float32)
            lab = None if label is None else label[s : s + batch_size].to(dev)
            with autocast(dev, amp):
                out.append(m.encode_indices(make_input(img, lab, m.joint)))
        codes = torch.cat(out) if out else torch.empty(0, dtype=torch.long)
    finally:
        m.train(was_training)
    return codes.to(image.device)


@torch.no_grad()
def decode(
    model: nn.Module, codes: torch.Tensor, batch_size: int = 4, amp: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Code grids -> volumes (and tissue label logits for a joint model).

    Args:
        model: a :class:`SynthVQVAE` (or a wrapper of one).
        codes: (B, cx, cy, cz) int64 in ``[0, K)``.
        batch_size: grids per forward pass.
        amp: bf16 autocast (CUDA only).

    Returns:
        ``(image, label_logits)``: image (B, 1, X, Y, Z) float32; label logits (B, 4, X, Y, Z) float32
        for a joint model (``argmax(1)`` gives the label map), else None. On ``codes``' device.
    """
    m = unwrap(model)
    dev = _device_of(m)
    if codes.dim() != 4:
        raise ValueError(f"codes must be (B, cx, cy, cz), got {tuple(codes.shape)}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= m.num_embeddings):
        raise ValueError(f"codes must lie in [0, {m.num_embeddings})")
    was_training = m.training
    m.eval()
    try:
        outs = []
        for s in range(0, codes.shape[0], batch_size):
            with autocast(dev, amp):
                outs.append(m.decode_indices(codes[s : s + batch_size].to(dev).long()).float())
        out = torch.cat(outs).to(codes.device)
    finally:
        m.train(was_training)
    image = out[:, :1]
    logits = out[:, 1:] if m.joint else None
    return image, logits


def save_vqvae(
    model: nn.Module, profile: Profile, path: str | Path, extra: dict[str, Any] | None = None
) -> Path:
    """Write one ``.pt`` file: state_dict + profile dict + mode flags (+ ``extra``, e.g. metrics)."""
    m = unwrap(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "state_dict": {k: v.detach().cpu() for k, v in m.state_dict().items()},
        "profile": profile.model_dump(mode="json"),
        "joint": m.joint,
        "quantiser": m.quantiser,
        "dp": m.dp,
        "extra": dict(extra or {}),
    }
    torch.save(payload, path)
    return path


def load_vqvae(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[SynthVQVAE, Profile]:
    """Read a file written by :func:`save_vqvae`; returns the model (eval mode) and its profile.

    The checkpoint's ``extra`` dict is attached as ``model.checkpoint_extra``.
    """
    payload = torch.load(Path(path), map_location=map_location, weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a synthbrain VQ-VAE checkpoint")
    profile = profile_from_dict(payload["profile"], source=str(path))
    if payload["quantiser"] != profile.vqvae.quantiser:  # older DP checkpoints: the profile named another
        vq = profile.vqvae.model_copy(update={"quantiser": payload["quantiser"]})
        profile = profile.model_copy(update={"vqvae": vq})
    model = build_vqvae(profile, joint=payload["joint"], dp=payload["dp"])
    if model.quantiser != payload["quantiser"]:
        raise ValueError(f"{path}: quantiser {payload['quantiser']!r} does not match the rebuilt model")
    model.load_state_dict(payload["state_dict"])
    model.to(map_location)
    model.eval()
    model.checkpoint_extra = payload.get("extra", {})
    return model, profile


def activation_memory_bytes(
    profile: Profile, batch_size: int = 1, joint: bool | None = None, dp: bool = False
) -> dict[str, int]:
    """Estimate training memory of the VQ-VAE at ``profile``'s full grid without allocating it.

    Runs the forward pass on PyTorch's ``meta`` device and sums the bytes of every tensor autograd
    saves for the backward pass (float32; bf16 autocast roughly halves the convolution activations).
    An upper bound on saved activations: a tensor saved by two ops is counted twice.

    Returns:
        ``{"params": bytes of parameters, "saved_activations": bytes, "output_shape": ...}``.
    """
    m = build_vqvae(profile, joint=joint, dp=dp).to("meta").train()
    shape = tuple(profile.data.shape)
    image = torch.empty(batch_size, 1, *shape, device="meta")
    label = torch.zeros(batch_size, *shape, dtype=torch.long, device="meta")
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out, _, codes = m(make_input(image, label, m.joint))
    return {
        "params": sum(q.numel() * q.element_size() for q in m.parameters()),
        "saved_activations": sum(saved),
        "output_shape": tuple(out.shape),
        "code_shape": tuple(codes.shape),
    }

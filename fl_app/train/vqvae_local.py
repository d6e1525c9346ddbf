"""Local VQ-VAE training: one function for the centralised baseline and the NVFlare client.

:func:`train_vqvae_local` is plain PyTorch. Give it a model (fresh, or carrying the received global
weights), a loader of :class:`fl_app.data.dataset.SiteDataset` batches and an optimiser; it returns a
metrics dict. With an Opacus ``DPOptimizer`` (``PrivacyEngine.make_private``) it runs DP-SGD:

* the model's quantiser must be DP-safe (``build_vqvae(..., dp=True)`` checks it), so every exported
  tensor is a parameter changed only by the clipped, noised optimiser step;
* dead-code restarts (which copy local encoder outputs into the codebook) and the adversarial term
  (whose discriminator would see raw data outside DP) are refused;
* Poisson sampling's empty batches still take an optimiser step -- zero clipped gradient plus noise,
  counted by the accountant -- because skipping them would make the number of released steps depend
  on the sampled data. Use :func:`vqvae_collate` in DP loaders: Opacus rebuilds empty batches from the
  first batch's structure and cannot do so for string fields such as ``participant_id``.

Loss (per volume, averaged over the batch so that it decomposes per sample as DP-SGD requires):
image L1 / L2 + ``label_weight`` · cross-entropy of the label logits (over labelled volumes; 0 for a
volume without labels) + quantisation loss (+ ``adv_weight`` · patch-adversarial generator loss).
The learning rate warms up linearly over the first ``vqvae.warmup_steps`` steps of the *optimiser's*
life, counted across calls (``WARMUP_KEY`` in its first param group; the learning rate is restored on
return): a federated client keeps its optimiser between rounds, so it warms up once, in its first
rounds, instead of at the start of every short round, which starved rounds of a few steps. Outside DP
the batch gradient norm is clipped to ``vqvae.grad_clip_norm``.

Under ``torchrun`` (a site with ``compute.nproc`` > 1, see :mod:`fl_app.train.distributed`) the same
function trains data-parallel: rank 0's weights are broadcast first, each rank takes its shard of the
subjects (:func:`make_vqvae_loader`), gradients are averaged over ranks after every backward pass, the
EMA codebook's statistics and the code-usage counts are summed over ranks (dead codes are restarted from
rank 0's encoder outputs and broadcast), and losses and volume counts are reduced, so every rank ends
with the same weights and the returned metrics are the site's. The batch size is per process.

``synthbrain train-local vqvae --bids DIR [--bids DIR2 ...] --profile cpu-demo --out RUN`` trains
centrally and writes ``RUN/vqvae.pt``, ``RUN/profile.yaml`` and ``RUN/metrics.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.data._utils.collate import default_collate

from fl_app.config import (
    Profile,
    VQVAESection,
    add_set_args,
    load_profile,
    overrides_from_args,
    profile_to_yaml,
)
from fl_app.evaluate import metrics as M
from fl_app.models.quantizer import codebook_usage, restart_dead_codes
from fl_app.models.vqvae import (
    SynthVQVAE,
    build_vqvae,
    load_vqvae,
    make_input,
    save_vqvae,
    unwrap,
)
from fl_app.train import distributed as D
from fl_app.train.common import (
    LocalStep,
    autocast,
    is_dp_optimizer,
    peak_rss_mb,
    resolve_device,
    seed_everything,
    train_loop,
)

log = logging.getLogger(__name__)

__all__ = [
    "VQVAE_BATCH_KEYS",
    "add_train_local_vqvae_parser",
    "build_discriminator",
    "evaluate_vqvae",
    "make_optimizer",
    "make_vqvae_loader",
    "train_vqvae_local",
    "vqvae_collate",
    "vqvae_loss",
]

VQVAE_BATCH_KEYS = ("image", "label", "has_label")


def vqvae_collate(items: list[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    """Collate dataset items keeping only the tensors the VQ-VAE needs (image, label, has_label).

    Safe for Opacus' Poisson-sampling loader, which re-creates empty batches from the first batch's
    structure and cannot do so for non-tensor fields. ``None`` items (subjects whose files stopped
    reading mid-job, :attr:`fl_app.data.dataset.SiteDataset.skip_unreadable`) are dropped; a batch of
    only those is empty (``{}``), which the training loop treats like an empty Poisson batch.
    """
    kept = [{k: it[k] for k in VQVAE_BATCH_KEYS if k in it} for it in items if it is not None]
    return default_collate(kept) if kept else {}


def _unpack(
    batch: Any, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor] | None:
    """Batch dict -> (image (B,1,X,Y,Z), label (B,X,Y,Z) | None, has_label (B,)); None if empty."""
    if not isinstance(batch, Mapping) or "image" not in batch:
        return None  # Opacus' placeholder for a first-empty batch (a list) or an empty list
    image = batch["image"]
    if image.shape[0] == 0:
        return None
    image = image.to(device, torch.float32, non_blocking=True)
    label = batch.get("label")
    if label is not None:
        label = label.to(device, torch.long, non_blocking=True)
        has = batch.get("has_label")
        has_label = (
            has.to(device).bool().reshape(-1)
            if has is not None
            else (label.reshape(label.shape[0], -1) >= 0).any(1)
        )
        # a subject without labels has label == -1 everywhere; trust the voxels too
        label = torch.where(has_label.view(-1, 1, 1, 1), label, torch.full_like(label, -1))
    else:
        has_label = torch.zeros(image.shape[0], dtype=torch.bool, device=device)
    return image, label, has_label


def _vq_cfg(cfg: Profile | VQVAESection) -> VQVAESection:
    return cfg.vqvae if isinstance(cfg, Profile) else cfg


def vqvae_loss(
    model: nn.Module,
    image: torch.Tensor,
    label: torch.Tensor | None,
    has_label: torch.Tensor,
    cfg: Profile | VQVAESection,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Forward pass and loss.

    Args:
        model: SynthVQVAE or a wrapper (Opacus GradSampleModule).
        image: (B, 1, X, Y, Z); label: (B, X, Y, Z) int64, -1 = unknown; has_label: (B,) bool.
        cfg: profile or its ``vqvae`` section (recon_loss, label_weight).

    Returns:
        ``(loss, parts, indices, recon_image)``: scalar loss; detached parts (image, label, quant);
        codes (B, cx, cy, cz); reconstructed image (B, 1, X, Y, Z).
    """
    vq = _vq_cfg(cfg)
    m = unwrap(model)
    x = make_input(image, label, m.joint)
    out, qloss, indices = model(x)
    out = out.float()
    rec = out[:, :1]
    b = image.shape[0]
    per_vox = image.new_zeros(())
    if vq.recon_loss in ("l1", "l1+l2"):
        per_vox = per_vox + F.l1_loss(rec, image)
    if vq.recon_loss in ("l2", "l1+l2"):
        per_vox = per_vox + F.mse_loss(rec, image)
    loss = per_vox + qloss
    label_loss = image.new_zeros(())
    if m.joint and label is not None and vq.label_weight > 0 and bool(has_label.any()):
        ce = F.cross_entropy(out[:, 1:], label.clamp(min=0), reduction="none")  # (B, X, Y, Z)
        ce = ce * (label >= 0)
        # mean over voxels of each volume, then sum / B: 0 for unlabelled volumes, per-sample decomposable
        label_loss = ce.reshape(b, -1).mean(1).sum() / b
        loss = loss + vq.label_weight * label_loss
    parts = {"image": per_vox.detach(), "label": label_loss.detach(), "quant": qloss.detach()}
    return loss, parts, indices, rec


def make_optimizer(model: nn.Module, profile: Profile, lr: float | None = None) -> torch.optim.Optimizer:
    """Adam at ``lr``, else ``vqvae.lr``, else ``train.lr``, over the trainable parameters (those with
    ``requires_grad``; see :mod:`fl_app.models.finetune`); Opacus wraps it in a DPOptimizer for DP."""
    if lr is None:
        lr = profile.vqvae.lr if profile.vqvae.lr is not None else profile.train.lr
    return torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)


def build_discriminator(profile: Profile, channels: int = 32, num_layers: int = 3) -> nn.Module:
    """MONAI 3D PatchDiscriminator on the image channel (for the optional adversarial term, non-DP)."""
    from monai.networks.nets import PatchDiscriminator

    return PatchDiscriminator(
        spatial_dims=3, channels=channels, in_channels=1, num_layers_d=num_layers, norm="INSTANCE"
    )


def train_vqvae_local(
    model: nn.Module,
    train_loader: Iterable,
    cfg: Profile | VQVAESection,
    *,
    optimizer: torch.optim.Optimizer,
    device: str | torch.device = "cpu",
    epochs: int | None = None,
    max_steps: int | None = None,
    max_seconds: float | None = None,
    val_loader: Iterable | None = None,
    val_max_batches: int | None = None,
    amp: str | bool = "none",
    discriminator: nn.Module | None = None,
    disc_optimizer: torch.optim.Optimizer | None = None,
    dead_code_restart: bool | None = None,
    seed: int | None = None,
    on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
    decay_steps: int | None = None,
) -> dict[str, Any]:
    """Train the VQ-VAE on local data.

    Args:
        model: :class:`SynthVQVAE`, or the Opacus ``GradSampleModule`` returned by ``make_private``.
        train_loader: batches of SiteDataset dicts (``image`` (B,1,X,Y,Z), ``label`` (B,X,Y,Z),
            ``has_label`` (B,)); empty batches are allowed.
        cfg: the profile (or its ``vqvae`` section): loss weights, dead-code restart settings.
        optimizer: e.g. :func:`make_optimizer`; an Opacus ``DPOptimizer`` switches DP mode on.
        device: where to train.
        epochs: passes over ``train_loader`` (default: 1 if ``max_steps``/``max_seconds`` given, else
            ``cfg.train.epochs`` for a Profile).
        max_steps, max_seconds: stop after this many optimiser steps / seconds of training.
        val_loader: evaluated (:func:`evaluate_vqvae`) after every epoch when given.
        val_max_batches: cap on validation batches.
        amp: ``"bf16"`` for bf16 autocast on CUDA.
        discriminator, disc_optimizer: optional patch discriminator (``vqvae.adv_weight`` > 0; non-DP).
        dead_code_restart: override ``vqvae.dead_code_restart`` (always off under DP).
        seed: seeds the dead-code restart RNG.
        on_epoch_end: callback receiving each epoch's metrics dict.
        decay_steps: a central run's whole step budget, over which ``vqvae.lr_schedule: cosine`` lowers the
            rate; None (a federated round, whose ``max_steps`` is one round's) keeps it constant.

    Returns:
        ``{"epochs": [per-epoch dicts], "steps", "train_seconds", "train_volumes",
        "train_volumes_per_s", "empty_batches", "dp", "final": last epoch dict}``; an epoch dict has
        ``loss``, ``image_loss``, ``label_loss``, ``quant_loss``, ``codebook_perplexity``,
        ``codebook_usage``, ``dead_codes_restarted`` and ``val`` (if ``val_loader``).
    """
    vq = _vq_cfg(cfg)
    dev = resolve_device(device)
    m: SynthVQVAE = unwrap(model)
    dp = is_dp_optimizer(optimizer)
    ddp = D.is_distributed()
    if dp and any(True for _ in m.codebook.buffers()):
        raise ValueError(
            "DP training needs a DP-safe quantiser (e.g. the loss-learned codebook, vqvae.quantiser: loss), "
            f"not {m.quantiser!r}: build the model with build_vqvae(profile, dp=True)"
        )
    use_adv = discriminator is not None and vq.adv_weight > 0
    if use_adv and dp:
        raise ValueError("the adversarial term is not available under DP (its discriminator sees raw data)")
    if use_adv and disc_optimizer is None:
        raise ValueError("discriminator given without disc_optimizer")
    restart = (vq.dead_code_restart if dead_code_restart is None else dead_code_restart) and not dp
    restart = restart and m.quantiser != "fsq"  # every FSQ code is reachable: there is no codebook to re-seed
    if epochs is None:
        if max_steps is not None or max_seconds is not None:
            epochs = 10**9  # until the step / time budget is spent
        else:
            epochs = cfg.train.epochs if isinstance(cfg, Profile) else 1
    model.to(dev)
    model.train()
    step = _VQVAEStep(model, m, vq, dev, amp, restart, seed, val_loader, val_max_batches)
    if use_adv:
        step.add_adversary(discriminator, disc_optimizer)
    ema_sync = getattr(m.codebook, "ddp_sync", None)
    if ddp:
        D.broadcast_module_state(m)  # every rank starts from rank 0's weights
        if use_adv:
            D.broadcast_module_state(discriminator)
        if ema_sync is not None:
            m.codebook.ddp_sync = True  # MONAI's EMA codebook sums its statistics over ranks
    try:
        res = train_loop(
            model, train_loader, optimizer, step, device=dev, epochs=epochs, max_steps=max_steps,
            max_seconds=max_seconds, amp=amp, grad_clip=vq.grad_clip_norm, warmup_steps=vq.warmup_steps,
            decay_steps=decay_steps if vq.lr_schedule == "cosine" else None, name="vqvae",
            on_epoch_end=on_epoch_end,
        )  # fmt: skip
    finally:
        if ema_sync is not None:
            m.codebook.ddp_sync = ema_sync
    n_vol, t = res.pop("samples"), res["train_seconds"]
    return {
        **res,
        "train_volumes": n_vol,
        "train_volumes_per_s": n_vol / t if t > 0 else math.nan,
    }


class _VQVAEStep(LocalStep):
    """The VQ-VAE's part of :func:`~fl_app.train.common.train_loop`: its loss, the optional adversarial
    term, code-usage counts and dead-code restarts, the epoch's loss parts."""

    def __init__(self, model, m, vq, dev, amp, restart, seed, val_loader, val_max_batches) -> None:
        self.model, self.m, self.vq, self.dev, self.amp, self.restart = model, m, vq, dev, amp, restart
        self.val_loader, self.val_max_batches = val_loader, val_max_batches
        self.gen = torch.Generator().manual_seed(seed if seed is not None else 0)
        self.k = m.num_embeddings
        self.restart_counts = torch.zeros(self.k)
        self.disc = self.disc_opt = self.adv_loss_fn = None
        self.ddp = D.is_distributed()

    def add_adversary(self, discriminator: nn.Module, disc_optimizer: torch.optim.Optimizer) -> None:
        from monai.losses import PatchAdversarialLoss

        self.adv_loss_fn = PatchAdversarialLoss(criterion="least_squares")
        self.disc, self.disc_opt = discriminator, disc_optimizer
        discriminator.to(self.dev).train()

    def unpack(self, batch: Any) -> Any:
        return _unpack(batch, self.dev)

    def start_epoch(self) -> None:
        self.sums = {"loss": 0.0, "image": 0.0, "label": 0.0, "quant": 0.0}
        self.counts = torch.zeros(self.k)
        self.restarted = 0

    def loss(self, unpacked: Any) -> torch.Tensor:
        image, label, has_label = unpacked
        loss, self.parts, self.indices, self.rec = vqvae_loss(self.model, image, label, has_label, self.vq)
        if self.disc is not None:
            g_adv = self.adv_loss_fn(self.disc(self.rec)[-1], target_is_real=True, for_discriminator=False)
            loss = loss + self.vq.adv_weight * g_adv
        return loss

    def after_step(self, unpacked: Any, loss: torch.Tensor, steps: int) -> int:
        image, label, _ = unpacked
        if self.disc is not None:
            self.disc_opt.zero_grad(set_to_none=True)
            with autocast(self.dev, self.amp):
                d_fake = self.adv_loss_fn(
                    self.disc(self.rec.detach())[-1], target_is_real=False, for_discriminator=True
                )
                d_real = self.adv_loss_fn(self.disc(image)[-1], target_is_real=True, for_discriminator=True)
                d_loss = 0.5 * (d_fake + d_real)
            d_loss.backward()
            D.average_gradients(self.disc.parameters())
            self.disc_opt.step()
        self.sums["loss"] += float(loss.detach())
        for key in ("image", "label", "quant"):
            self.sums[key] += float(self.parts[key])
        c = codebook_usage(self.indices.detach().cpu(), self.k)
        if self.ddp:
            c = D.all_reduce_sum(c)  # the site's usage: every rank decides the same restarts
        self.counts += c
        self.restart_counts += c
        # dead-code restart every `dead_code_every` steps, and at once if the first batch shows a
        # collapsed codebook (< 10 % of codes used), as MONAI's N(0, 1) EMA init tends to give
        collapsed = steps == 1 and float((self.restart_counts > 0).float().mean()) < 0.1
        if self.restart and (collapsed or steps % self.vq.dead_code_every == 0):
            m = self.m
            with torch.no_grad():
                z = m.encoder_output(make_input(image, label, m.joint))
            self.restarted += restart_dead_codes(m.codebook, self.restart_counts, z, generator=self.gen)
            if self.ddp:
                D.broadcast_module_state(m.codebook)  # rank 0's restarted codes everywhere
            self.restart_counts.zero_()
        return image.shape[0]

    def epoch_metrics(self, n_batches: int) -> dict[str, Any]:
        sums = self.sums
        if self.ddp:  # the site's means: over every rank's batches
            sums = D.sum_over_ranks({**sums, "_batches": float(n_batches)})
            n_batches = int(sums.pop("_batches"))
        nb = max(n_batches, 1)
        return {
            "loss": sums["loss"] / nb if n_batches else math.nan,
            "image_loss": sums["image"] / nb if n_batches else math.nan,
            "label_loss": sums["label"] / nb if n_batches else math.nan,
            "quant_loss": sums["quant"] / nb if n_batches else math.nan,
            "codebook_perplexity": M.codebook_perplexity(self.counts),
            "codebook_usage": M.codebook_usage_fraction(self.counts, self.k),
            "dead_codes_restarted": self.restarted,
        }

    def validate(self) -> dict[str, Any] | None:
        if self.val_loader is None:
            return None
        return evaluate_vqvae(
            self.model, self.val_loader, self.dev, max_batches=self.val_max_batches, amp=self.amp
        )


@torch.no_grad()
def evaluate_vqvae(
    model: nn.Module,
    loader: Iterable,
    device: str | torch.device = "cpu",
    max_batches: int | None = None,
    amp: str | bool = "none",
    per_volume: bool = False,
) -> dict[str, Any]:
    """Reconstruction quality on held-out volumes (eval mode: no EMA update).

    The reconstruction is clamped to [0, 1] (the data range) before PSNR/SSIM/MS-SSIM. Dice is over the
    argmax of the decoded label logits, per tissue (CSF, GM, WM), on volumes that have labels.

    Returns:
        ``psnr_db``, ``ssim``, ``ms_ssim``, ``dice_csf``, ``dice_gm``, ``dice_wm``, ``dice_mean`` (NaN
        without labels or for an image-only model), ``codebook_perplexity``, ``codebook_usage``,
        ``n_volumes``; with ``per_volume`` also ``psnr_db_per_volume`` (loader order; for paired comparisons
        of two models in a bench, never sent by a site).
    """
    dev = resolve_device(device)
    m = unwrap(model)
    was_training = m.training
    m.to(dev).eval()
    psnrs, ssims, msssims, dices = [], [], [], []
    counts = torch.zeros(m.num_embeddings)
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        unpacked = _unpack(batch, dev)
        if unpacked is None:
            continue
        image, label, has_label = unpacked
        with autocast(dev, amp):
            out, _, indices = m(make_input(image, label, m.joint))
        out = out.float()
        rec = out[:, :1].clamp(0.0, 1.0)
        tgt = image.clamp(0.0, 1.0)
        psnrs.append(M.psnr(rec, tgt).cpu())
        ssims.append(M.ssim(rec, tgt).cpu())
        msssims.append(M.ms_ssim(rec, tgt).cpu())
        counts += codebook_usage(indices.cpu(), m.num_embeddings)
        if m.joint and label is not None and bool(has_label.any()):
            pred = out[:, 1:].argmax(1)
            sel = has_label
            dices.append(M.dice_per_class(pred[sel], label[sel]).cpu())
    m.train(was_training)
    res: dict[str, Any] = {"n_volumes": int(sum(len(p) for p in psnrs))}
    if not psnrs:
        return res | {k: math.nan for k in ("psnr_db", "ssim", "ms_ssim", "dice_mean")}
    psnr = torch.cat(psnrs)
    res["psnr_db"] = float(psnr.mean())
    if per_volume:
        res["psnr_db_per_volume"] = psnr.tolist()
    res["ssim"] = float(torch.cat(ssims).mean())
    res["ms_ssim"] = float(torch.cat(msssims).mean())
    if dices:
        d = torch.cat(dices)
        per = torch.nanmean(d, dim=0)
        for name, v in zip(("dice_csf", "dice_gm", "dice_wm"), per.tolist(), strict=True):
            res[name] = v
        res["dice_mean"] = float(torch.nanmean(per))
    else:
        res["dice_mean"] = math.nan
    res["codebook_perplexity"] = M.codebook_perplexity(counts)
    res["codebook_usage"] = M.codebook_usage_fraction(counts, m.num_embeddings)
    return res


# --------------------------------------------------------------------------- CLI: train-local vqvae


def run_train_local_vqvae(args: argparse.Namespace) -> int:
    """``synthbrain train-local vqvae``: centralised (non-federated) VQ-VAE baseline."""
    from torch.utils.data import ConcatDataset

    from fl_app.data.cohort import read_bids
    from fl_app.data.dataset import SiteDataset, make_loaders

    profile = load_profile(args.profile, overrides_from_args(args))
    seed = profile.train.seed if args.seed is None else args.seed
    seed_everything(seed)
    dev = resolve_device(args.device)
    sites = []
    for bids in args.bids:
        cohort = read_bids(bids)
        ds = SiteDataset(cohort.valid(), profile, cache_dir=args.cache_dir)
        log.info("%s: %d subjects usable (%d skipped)", bids, len(ds), ds.n_skipped)
        if len(ds):
            sites.append(ds)
    if not sites:
        log.error("no usable subjects in %s", ", ".join(map(str, args.bids)))
        return 2
    dataset = ConcatDataset(sites)
    batch_size = args.batch_size or profile.train.batch_size
    train_loader, val_loader = make_loaders(
        dataset, batch_size, profile.train.val_fraction, seed, num_workers=profile.train.num_workers
    )
    model = build_vqvae(profile, joint=False if args.image_only else None)
    if args.init is not None:  # start from these weights (the architecture must match the profile's)
        model.load_state_dict(load_vqvae(args.init)[0].state_dict())
    optimizer = make_optimizer(model, profile, args.lr)
    disc = disc_opt = None
    if profile.vqvae.adv_weight > 0:
        disc = build_discriminator(profile)
        disc_opt = torch.optim.Adam(disc.parameters(), lr=optimizer.param_groups[0]["lr"], betas=(0.5, 0.9))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile.yaml").write_text(profile_to_yaml(profile))

    def _log_epoch(rec: dict[str, Any]) -> None:
        val = rec.get("val", {})
        # the latest weights after every epoch: a long run that is stopped keeps its progress
        save_vqvae(
            model, profile, out / "vqvae.pt", extra={"steps": rec["steps"], "seed": seed, "partial": True}
        )
        print(
            f"epoch {rec['epoch']} step {rec['steps']}: loss {rec['loss']:.4f} "
            f"perplexity {rec['codebook_perplexity']:.1f}"
            + (
                f" | val PSNR {val.get('psnr_db', math.nan):.2f} dB Dice {val.get('dice_mean', math.nan):.3f}"
                if val
                else ""
            ),
            flush=True,
        )

    result = train_vqvae_local(
        model,
        train_loader,
        profile,
        optimizer=optimizer,
        device=dev,
        epochs=args.epochs or (None if (args.max_steps or args.max_minutes) else profile.train.epochs),
        max_steps=args.max_steps,
        max_seconds=args.max_minutes * 60 if args.max_minutes else None,
        val_loader=val_loader if len(val_loader.dataset) else None,
        amp=profile.train.amp,
        discriminator=disc,
        disc_optimizer=disc_opt,
        seed=seed,
        on_epoch_end=_log_epoch,
        decay_steps=args.max_steps,
    )
    metrics = {
        "profile": profile.name,
        "bids": [str(b) for b in args.bids],
        "n_train": len(train_loader.dataset),
        "n_val": len(val_loader.dataset),
        "joint": model.joint,
        "quantiser": model.quantiser,
        "compression_ratio": M.compression_ratio(
            profile.code_shape, profile.vqvae.num_embeddings, profile.data.shape
        ),
        "peak_rss_mb": peak_rss_mb(),
        **result,
    }
    save_vqvae(model, profile, out / "vqvae.pt", extra={"metrics": metrics["final"], "seed": seed})
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
    print(f"wrote {out / 'vqvae.pt'}, {out / 'metrics.json'}")
    return 0


def add_train_local_vqvae_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``vqvae`` to the ``train-local`` sub-command group."""
    p = subparsers.add_parser(
        "vqvae",
        help="train the VQ-VAE centrally on one or more BIDS folders (non-federated baseline)",
        description="Train the 3D VQ-VAE on the pooled subjects of the given BIDS folders.",
    )
    p.add_argument("--bids", action="append", required=True, type=Path, help="BIDS folder (repeatable)")
    p.add_argument("--profile", default="cpu-demo", help="profile name or YAML path")
    p.add_argument("--out", required=True, type=Path, help="run folder to write")
    p.add_argument("--epochs", type=int, default=None, help="default: profile train.epochs")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--max-minutes", type=float, default=None, help="wall-clock training budget")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--cache-dir", type=Path, default=None, help="preprocessing cache")
    p.add_argument("--image-only", action="store_true", help="ignore tissue labels")
    p.add_argument("--init", type=Path, default=None, help="start from this VQ-VAE checkpoint (.pt)")
    add_set_args(p, help="profile override, e.g. vqvae.lr=...")
    p.set_defaults(func=run_train_local_vqvae)
    return p


def make_vqvae_loader(dataset, batch_size: int, shuffle: bool, seed: int = 0) -> DataLoader:
    """A DataLoader with :func:`vqvae_collate` (the batch structure Opacus' DP loader can rebuild).

    Under torchrun (an initialised process group) each rank loads its own shard of ``dataset``
    (``DistributedSampler``; ``batch_size`` is per rank).
    """
    sampler = D.distributed_sampler(dataset, shuffle, seed)
    if sampler is not None:
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=vqvae_collate)
    g = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=g, collate_fn=vqvae_collate)

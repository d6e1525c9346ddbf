"""VQ-VAE benchmark: train on simulated sites for a fixed budget, evaluate on held-out subjects.

    python bench/vqvae.py --profile cpu-demo --json OUT.json [--train-minutes 15]

Simulates ``--sites`` BIDS sites (``fl_app.data.simulate.simulate_sites``, seed ``--seed``) for
training and one more site with a different seed for held-out evaluation, preprocesses them to the
profile grid (``SiteDataset``), trains the joint image + label VQ-VAE centrally with
``fl_app.train.vqvae_local.train_vqvae_local`` for a wall-clock budget, and prints / writes JSON with
``psnr_db``, ``ssim``, ``ms_ssim``, ``dice_mean`` (+ per tissue), ``compression_ratio`` (16-bit),
``compression_ratio_float32``, ``codebook_perplexity``, ``codebook_usage``, ``train_volumes_per_s``,
``encode_volumes_per_s``, ``decode_volumes_per_s``, ``peak_rss_mb``, the settings used and
reference points from plain down/up-sampling (:func:`downsample_baseline`) and from the training mean
image, which carries no information about the subject (:func:`mean_image_baseline`).

Targets for cpu-demo (issue 13; the shipped checkpoint, ``--checkpoint pretrained``, on held-out subjects
from unseen seeds): PSNR ≥ 27 dB, MS-SSIM ≥ 0.95, mean tissue Dice ≥ 0.80, ≥ 4 dB above the mean-training-image
baseline, compression ratio < 1 %, and ``mode_agreement_brain`` ≤ 0.5 (at grid cells that are at least half
brain, the share of held-out codes equal to their position's most common training code).

``--checkpoint PATH|pretrained`` evaluates a saved VQ-VAE without training (its profile is used).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from fl_app.config import add_set_args, load_profile, overrides_from_args
from fl_app.data.cohort import read_bids
from fl_app.data.dataset import SiteDataset
from fl_app.data.simulate import simulate_sites
from fl_app.evaluate import metrics as M
from fl_app.models.pretrained import pretrained_vqvae_path
from fl_app.models.vqvae import build_vqvae, decode, encode, load_vqvae, save_vqvae
from fl_app.train.common import peak_rss_mb, resolve_device, seed_everything
from fl_app.train.vqvae_local import (
    VQVAE_BATCH_KEYS,
    evaluate_vqvae,
    make_optimizer,
    make_vqvae_loader,
    train_vqvae_local,
)


def _load(paths: list[Path], profile, cache: Path, limit: int | None = None) -> list[dict[str, torch.Tensor]]:
    """Preprocess every subject (the first ``limit`` of each site) once and keep the tensors the VQ-VAE needs
    in memory."""
    items = []
    for p in paths:
        ds = SiteDataset(read_bids(p).valid()[:limit], profile, cache_dir=cache)
        for i in range(len(ds)):
            it = ds[i]
            items.append({k: it[k] for k in VQVAE_BATCH_KEYS})
    return items


def downsample_baseline(images: torch.Tensor, labels: torch.Tensor, factor: int) -> dict[str, float]:
    """Reference points for the held-out metrics: average-pool by ``factor`` (and factor/2, factor/4),
    trilinear up-sampling back; labels by pooled one-hot + argmax. These keep a *continuous* value per
    cell (32 bits; a whole intensity + 4 tissue fractions), far more than one 8-bit code per cell, so a
    VQ-VAE at the same grid should be compared with, not expected to beat by much, the ``factor`` row.

    Returns ``baseline_down{f}_psnr_db``, ``..._ms_ssim`` and ``..._dice_mean`` for each f.
    """
    import torch.nn.functional as F

    out: dict[str, float] = {}
    x = images.float()
    onehot = F.one_hot(labels.clamp(min=0), 4).permute(0, 4, 1, 2, 3).float()
    for f in sorted({factor, max(factor // 2, 1), max(factor // 4, 1)}):
        if f == 1:
            continue
        rec = F.interpolate(F.avg_pool3d(x, f), scale_factor=f, mode="trilinear", align_corners=False)
        lab = F.interpolate(F.avg_pool3d(onehot, f), scale_factor=f, mode="trilinear").argmax(1)
        out[f"baseline_down{f}_psnr_db"] = float(M.psnr(rec.clamp(0, 1), x).mean())
        out[f"baseline_down{f}_ms_ssim"] = float(M.ms_ssim(rec.clamp(0, 1), x).mean())
        out[f"baseline_down{f}_dice_mean"] = float(torch.nanmean(M.dice_per_class(lab, labels)))
    return out


def mean_image_baseline(
    train_images: torch.Tensor, train_labels: torch.Tensor, images: torch.Tensor, labels: torch.Tensor
) -> dict[str, float]:
    """What zero bits per subject give: every held-out volume "reconstructed" as the training mean image
    (and the voxel-wise most frequent training label). A VQ-VAE's codes are worth what it adds to this.

    Returns ``baseline_mean_image_psnr_db``, ``..._ms_ssim`` and ``..._dice_mean``.
    """
    import torch.nn.functional as F

    mean = train_images.float().mean(0, keepdim=True).expand_as(images).contiguous()
    mode = F.one_hot(train_labels.clamp(min=0), 4).sum(0).argmax(-1)
    lab = mode.unsqueeze(0).expand_as(labels)
    return {
        "baseline_mean_image_psnr_db": float(M.psnr(mean, images.float()).mean()),
        "baseline_mean_image_ms_ssim": float(M.ms_ssim(mean, images.float()).mean()),
        "baseline_mean_image_dice_mean": float(torch.nanmean(M.dice_per_class(lab, labels))),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="cpu-demo")
    ap.add_argument("--json", type=Path, default=None, help="write the result here")
    ap.add_argument("--train-minutes", type=float, default=15.0)
    ap.add_argument("--max-steps", type=int, default=None, help="also stop after this many steps")
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument("--subjects-per-site", type=int, default=16)
    ap.add_argument("--test-subjects", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for this run")
    ap.add_argument("--workdir", type=Path, default=None, help="keep simulated data here (default: temp)")
    ap.add_argument(
        "--reuse-data",
        action="store_true",
        help="reuse the sites already simulated in --workdir (the first --subjects-per-site of each training "
        "site and the first --test-subjects held out: e.g. 16 / 67 / 200 of the same 200 for a scaling run)",
    )
    add_set_args(ap, help="profile override")  # and --set-file, e.g. a tune study's best.yaml
    ap.add_argument(
        "--save-model", type=Path, default=None, help="write the trained VQ-VAE here (.pt), after every epoch"
    )
    ap.add_argument(
        "--checkpoint",
        default=None,
        help="evaluate this VQ-VAE (.pt, or 'pretrained' for the shipped one) without training; its profile "
        "replaces --profile",
    )
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    checkpoint_model = None
    if args.checkpoint is not None:
        path = pretrained_vqvae_path() if args.checkpoint == "pretrained" else Path(args.checkpoint)
        checkpoint_model, profile = load_vqvae(path)
    else:
        profile = load_profile(args.profile, overrides_from_args(args))
    seed_everything(args.seed)
    dev = resolve_device(args.device)
    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench-vqvae-")
        work = Path(tmp.name)
    else:
        work = args.workdir
    t0 = time.perf_counter()
    if args.reuse_data and (work / "train").is_dir() and (work / "test").is_dir():
        train_sites = sorted(p for p in (work / "train").iterdir() if p.is_dir())
        test_sites = sorted(p for p in (work / "test").iterdir() if p.is_dir())
    else:
        train_sites = simulate_sites(
            work / "train", args.sites, args.subjects_per_site, profile, seed=args.seed
        )
        test_sites = simulate_sites(work / "test", 1, args.test_subjects, profile, seed=args.seed + 1000)
    # reused sites: the first --subjects-per-site / --test-subjects of each (nested subsets for scaling runs)
    train_items = _load(train_sites, profile, work / "cache", args.subjects_per_site)
    test_items = _load(test_sites, profile, work / "cache", args.test_subjects)
    data_seconds = time.perf_counter() - t0
    print(
        f"data: {len(train_items)} train / {len(test_items)} held-out subjects in {data_seconds:.0f} s",
        file=sys.stderr,
    )

    batch_size = args.batch_size or profile.train.batch_size
    model = checkpoint_model if checkpoint_model is not None else build_vqvae(profile)
    optimizer = make_optimizer(model, profile, args.lr)
    loader = make_vqvae_loader(train_items, batch_size, shuffle=True, seed=args.seed)

    def _progress(rec):
        print(
            f"epoch {rec['epoch']} step {rec['steps']}: loss {rec['loss']:.4f} image {rec['image_loss']:.4f} "
            f"label {rec['label_loss']:.4f} perplexity {rec['codebook_perplexity']:.1f}",
            file=sys.stderr,
            flush=True,
        )
        if args.save_model is not None:  # a long run keeps its latest weights
            save_vqvae(
                model, profile, args.save_model, extra={"bench": "bench/vqvae.py", "steps": rec["steps"]}
            )

    if checkpoint_model is not None:
        result = {
            "train_seconds": 0.0,
            "steps": 0,
            "epochs": [],
            "final": {},
            "train_volumes_per_s": math.nan,
        }
    else:
        result = train_vqvae_local(
            model,
            loader,
            profile,
            optimizer=optimizer,
            device=dev,
            max_seconds=args.train_minutes * 60,
            max_steps=args.max_steps,
            amp=profile.train.amp,
            seed=args.seed,
            on_epoch_end=_progress,
            decay_steps=args.max_steps,  # a central run: a cosine profile decays over --max-steps
        )
    if args.save_model is not None and checkpoint_model is None:
        save_vqvae(
            model, profile, args.save_model, extra={"bench": "bench/vqvae.py", "steps": result["steps"]}
        )
    test_loader = make_vqvae_loader(test_items, batch_size, shuffle=False)
    ev = evaluate_vqvae(model, test_loader, dev, amp=profile.train.amp)

    images = torch.stack([it["image"] for it in test_items])
    labels = torch.stack([it["label"] for it in test_items])
    t = time.perf_counter()
    codes = encode(model, images, labels, batch_size=batch_size)
    enc_s = time.perf_counter() - t
    t = time.perf_counter()
    decode(model, codes, batch_size=batch_size)
    dec_s = time.perf_counter() - t

    base = downsample_baseline(images, labels, profile.vqvae.downsample_factor)
    base |= mean_image_baseline(
        torch.stack([it["image"] for it in train_items]),
        torch.stack([it["label"] for it in train_items]),
        images,
        labels,
    )

    k = profile.vqvae.num_embeddings
    train_codes = encode(
        model,
        torch.stack([it["image"] for it in train_items]),
        torch.stack([it["label"] for it in train_items]),
        batch_size=batch_size,
    )
    f = profile.vqvae.downsample_factor
    brain_cells = torch.nn.functional.avg_pool3d((labels > 0).float()[:, None], f)[:, 0] >= 0.5
    out = {
        "profile": profile.name,
        "device": str(dev),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "n_train": len(train_items),
        "n_test": len(test_items),
        "train_minutes_budget": args.train_minutes,
        "train_seconds": result["train_seconds"],
        "steps": result["steps"],
        "epochs": len(result["epochs"]),
        "batch_size": batch_size,
        "lr": optimizer.param_groups[0]["lr"],
        "quantiser": model.quantiser,
        "joint": model.joint,
        "vqvae": profile.vqvae.model_dump(mode="json"),
        "code_shape": list(profile.code_shape),
        "psnr_db": ev["psnr_db"],
        "ssim": ev["ssim"],
        "ms_ssim": ev["ms_ssim"],
        "dice_csf": ev.get("dice_csf", math.nan),
        "dice_gm": ev.get("dice_gm", math.nan),
        "dice_wm": ev.get("dice_wm", math.nan),
        "dice_mean": ev["dice_mean"],
        "compression_ratio": M.compression_ratio(profile.code_shape, k, profile.data.shape),
        "compression_ratio_float32": M.compression_ratio_float32(profile.code_shape, k, profile.data.shape),
        "codebook_perplexity": M.codebook_perplexity(codes, k),
        "codebook_usage": M.codebook_usage_fraction(codes, k),
        "mode_agreement": M.code_mode_agreement(train_codes, codes),
        "mode_agreement_brain": M.code_mode_agreement(train_codes, codes, where=brain_cells),
        "checkpoint": args.checkpoint,
        "train_codebook_perplexity": result["final"].get("codebook_perplexity", math.nan),
        "train_loss_final": result["final"].get("loss", math.nan),
        "train_volumes_per_s": result["train_volumes_per_s"],
        "encode_volumes_per_s": len(test_items) / enc_s,
        "decode_volumes_per_s": len(test_items) / dec_s,
        **base,
        "data_seconds": data_seconds,
        "peak_rss_mb": peak_rss_mb(),
        "loss_curve": [round(e["loss"], 5) for e in result["epochs"]],
    }
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

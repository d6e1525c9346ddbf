"""Local prior training: one function for the centralised baseline and the NVFlare client.

:func:`train_prior_local` is plain PyTorch: next-code cross-entropy of a
:class:`~fl_app.models.prior.ConditionalPrior` over batches of code grids with their covariates::

    {"codes": LongTensor (B, cx, cy, cz), "age": float (B,) (NaN = unknown),
     "sex": long (B,), "diagnosis": long (B,)}

With an Opacus ``DPOptimizer`` (``PrivacyEngine.make_private``) it runs DP-SGD: the loss is a mean
over the batch of per-sequence mean cross-entropies (Opacus' ``loss_reduction="mean"``), and an
empty Poisson batch takes a noise-only optimiser step (zero clipped gradient plus noise, counted by
the accountant) so that the number of released steps does not depend on the sampled data -- the
same rule as the VQ-VAE's local training. Without DP, empty batches are skipped.

Under ``torchrun`` (a site with ``compute.nproc`` > 1) it trains data-parallel like the VQ-VAE
(:mod:`fl_app.train.distributed`): rank 0's weights broadcast first, a shard of the sequences per rank
(:func:`make_prior_loader`), gradients averaged over ranks, losses and sequence counts summed. ``amp``
(``train.amp: bf16``) runs the forward pass under bf16 autocast on CUDA (a no-op on CPU).

:func:`evaluate_prior` gives held-out bits per code (``log2`` perplexity per code).

``synthbrain train-local prior --vqvae RUN --bids DIR [--bids DIR2 ...] --out RUN2`` encodes every
site's volumes with the trained VQ-VAE (code grids cached per subject), trains the prior centrally
and writes ``RUN2/prior.pt``, ``RUN2/profile.yaml`` and ``RUN2/metrics.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.data._utils.collate import default_collate

from fl_app.config import Profile, TrainSection, add_set_args, profile_to_yaml
from fl_app.data.covariates import UNKNOWN_DIAGNOSIS, UNKNOWN_SEX
from fl_app.data.nifti import file_sha256
from fl_app.models.prior import (
    ConditionalPrior,
    build_prior,
    load_prior_weights,
    save_prior,
    unwrap_prior,
)
from fl_app.train import distributed as D
from fl_app.train.common import (
    LocalStep,
    peak_rss_mb,
    resolve_device,
    seed_everything,
    train_loop,
)

log = logging.getLogger(__name__)

__all__ = [
    "PRIOR_BATCH_KEYS",
    "CodeDataset",
    "add_train_local_prior_parser",
    "encode_codes",
    "evaluate_prior",
    "make_prior_loader",
    "make_prior_optimizer",
    "prior_collate",
    "train_prior_local",
]

PRIOR_BATCH_KEYS = ("codes", "age", "sex", "diagnosis")
LN2 = math.log(2.0)


class CodeDataset(Dataset):
    """Code grids with covariates; items are dicts with the :data:`PRIOR_BATCH_KEYS`.

    Args:
        codes: (S, cx, cy, cz) long.
        age: (S,) float (NaN = unknown); sex, diagnosis: (S,) long (unknown = len(vocabulary)).
    """

    def __init__(
        self, codes: torch.Tensor, age: torch.Tensor, sex: torch.Tensor, diagnosis: torch.Tensor
    ) -> None:
        n = codes.shape[0]
        if not (age.shape == sex.shape == diagnosis.shape == (n,)):
            raise ValueError("codes, age, sex and diagnosis must have the same length")
        self.codes = codes.long()
        self.age = age.float()
        self.sex = sex.long()
        self.diagnosis = diagnosis.long()

    def __len__(self) -> int:
        return self.codes.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "codes": self.codes[i],
            "age": self.age[i],
            "sex": self.sex[i],
            "diagnosis": self.diagnosis[i],
        }

    def subset(self, idx: Sequence[int]) -> CodeDataset:
        idx_t = torch.as_tensor(list(idx), dtype=torch.long)
        return CodeDataset(self.codes[idx_t], self.age[idx_t], self.sex[idx_t], self.diagnosis[idx_t])


def prior_collate(items: list[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    """Collate keeping only the prior's tensors (a structure Opacus' Poisson loader can rebuild empty)."""
    return default_collate([{k: it[k] for k in PRIOR_BATCH_KEYS} for it in items])


def make_prior_loader(dataset: Dataset, batch_size: int, shuffle: bool, seed: int = 0) -> DataLoader:
    """DataLoader with :func:`prior_collate`; seeded shuffling (a shard per rank under torchrun)."""
    sampler = D.distributed_sampler(dataset, shuffle, seed)
    if sampler is not None:
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=prior_collate)
    g = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=g, collate_fn=prior_collate)


def make_prior_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters (``requires_grad``; see :mod:`fl_app.models.finetune`); no decay
    by default: keeps every parameter's update DP-clean."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95))


def _unpack(
    batch: Any, model: ConditionalPrior, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Batch dict -> (seq (B, N) in model order, age (B,), sex (B,), diagnosis (B,)); None if empty."""
    if not isinstance(batch, Mapping) or "codes" not in batch:
        return None  # Opacus' placeholder for an empty first batch
    codes = batch["codes"]
    if codes.shape[0] == 0:
        return None
    b = codes.shape[0]
    seq = model.grid_to_sequence(codes.to(device).long())

    def _get(key: str, fill: float) -> torch.Tensor:
        v = batch.get(key)
        return torch.full((b,), fill, device=device) if v is None else v.to(device).reshape(b)

    age = _get("age", math.nan).float()
    sex = _get("sex", UNKNOWN_SEX).long()
    dx = _get("diagnosis", UNKNOWN_DIAGNOSIS).long()
    return seq, age, sex, dx


def _loss(model: nn.Module, seq: torch.Tensor, age, sex, dx) -> torch.Tensor:
    """Mean next-code cross-entropy (nats) over the batch: a mean of per-sequence means."""
    logits = model(seq[:, :-1], age, sex, dx)  # (B, N, V)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), seq.reshape(-1))


def train_prior_local(
    model: nn.Module,
    train_loader: Iterable,
    cfg: Profile | TrainSection | None = None,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    device: str | torch.device = "cpu",
    epochs: int | None = None,
    max_steps: int | None = None,
    max_seconds: float | None = None,
    val_loader: Iterable | None = None,
    dp_engine: Any | None = None,
    dp_delta: float = 1e-5,
    grad_clip: float | None = 1.0,
    on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
    amp: str | bool = "none",
    decay_steps: int | None = None,
) -> dict[str, Any]:
    """Train the prior on local code grids.

    Args:
        model: :class:`ConditionalPrior`, or the Opacus ``GradSampleModule`` wrapping one.
        train_loader: batches as in the module docstring (empty batches allowed).
        cfg: the profile or its ``train`` section (learning rate and default epochs); may be None when
            ``optimizer`` and ``epochs``/``max_steps`` are given.
        optimizer: default AdamW at ``cfg.lr``; an Opacus ``DPOptimizer`` switches DP mode on.
        device: where to train.
        epochs: passes over ``train_loader`` (default: unlimited if ``max_steps``/``max_seconds`` is
            given, else ``cfg.epochs``).
        max_steps, max_seconds: stop after this many optimiser steps / seconds of training.
        val_loader: evaluated with :func:`evaluate_prior` after every epoch.
        dp_engine: the Opacus ``PrivacyEngine`` (its ε at ``dp_delta`` is reported as ``epsilon``).
        dp_delta: δ for the reported ε.
        grad_clip: global gradient-norm clipping outside DP (DP clips per sample itself).
        on_epoch_end: callback receiving each epoch's metrics dict.
        amp: ``"bf16"`` for bf16 autocast of the forward pass on CUDA (``train.amp``).
        decay_steps: a central run's whole step budget, over which ``prior.lr_schedule: cosine`` lowers the
            rate; None (a federated round) keeps it constant. ``prior.warmup_steps`` applies either way.

    Returns:
        ``{"epochs": [...], "final": last epoch dict, "steps", "train_seconds", "train_sequences",
        "empty_batches", "dp", "world_size", "epsilon" (DP only)}``; an epoch dict has ``loss`` (nats/code),
        ``bits_per_code`` (train), ``seconds`` and ``val`` (if ``val_loader``).
    """
    train_cfg = cfg.train if isinstance(cfg, Profile) else cfg
    dev = resolve_device(device)
    m = unwrap_prior(model)
    model.to(dev)
    if optimizer is None:
        if train_cfg is None:
            raise ValueError("give an optimizer or a cfg with a learning rate")
        optimizer = make_prior_optimizer(model, train_cfg.lr)
    if D.is_distributed():
        D.broadcast_module_state(m)  # every rank starts from rank 0's weights
    if epochs is None:
        if max_steps is not None or max_seconds is not None:
            epochs = 10**9
        elif train_cfg is not None:
            epochs = train_cfg.epochs
        else:
            epochs = 1
    model.train()
    res = train_loop(
        model, train_loader, optimizer, _PriorStep(model, m, dev, val_loader), device=dev, epochs=epochs,
        max_steps=max_steps, max_seconds=max_seconds, amp=amp, grad_clip=grad_clip, name="prior",
        on_epoch_end=on_epoch_end, warmup_steps=m.cfg.warmup_steps or None,
        decay_steps=decay_steps if m.cfg.lr_schedule == "cosine" else None,
    )  # fmt: skip
    result = {**res, "train_sequences": res.pop("samples")}
    if dp_engine is not None:
        result["epsilon"] = float(dp_engine.get_epsilon(dp_delta))
        result["delta"] = dp_delta
    return result


class _PriorStep(LocalStep):
    """The prior's part of :func:`~fl_app.train.common.train_loop`: next-code cross-entropy, mean loss."""

    def __init__(self, model: nn.Module, m: ConditionalPrior, dev: torch.device, val_loader: Any) -> None:
        self.model, self.m, self.dev, self.val_loader = model, m, dev, val_loader

    def unpack(self, batch: Any) -> Any:
        return _unpack(batch, self.m, self.dev)

    def start_epoch(self) -> None:
        self.loss_sum = 0.0

    def loss(self, unpacked: Any) -> torch.Tensor:
        return _loss(self.model, *unpacked)

    def after_step(self, unpacked: Any, loss: torch.Tensor, steps: int) -> int:
        self.loss_sum += float(loss.detach())
        return unpacked[0].shape[0]

    def epoch_metrics(self, n_batches: int) -> dict[str, Any]:
        loss_sum = self.loss_sum
        if D.is_distributed():  # the site's mean: over every rank's batches
            tot = D.sum_over_ranks({"loss": loss_sum, "n": float(n_batches)})
            loss_sum, n_batches = tot["loss"], int(tot["n"])
        mean_loss = loss_sum / n_batches if n_batches else math.nan
        return {"loss": mean_loss, "bits_per_code": mean_loss / LN2}

    def validate(self) -> dict[str, Any] | None:
        return None if self.val_loader is None else evaluate_prior(self.model, self.val_loader, self.dev)


@torch.no_grad()
def evaluate_prior(
    model: nn.Module,
    loader: Iterable,
    device: str | torch.device | None = None,
    max_batches: int | None = None,
    drop_conditions: bool = False,
) -> dict[str, Any]:
    """Held-out negative log-likelihood of the code grids (eval mode: no condition dropout).

    Args:
        model: :class:`ConditionalPrior` (or an Opacus wrapper of one).
        loader: batches as in the module docstring.
        device: default the model's device.
        max_batches: cap on batches.
        drop_conditions: evaluate with every covariate set to "unknown" (the model's own
            unconditional mode).

    Returns:
        ``{"bits_per_code", "nll_nats_per_code", "n_sequences"}`` (NaN without data).
    """
    m = unwrap_prior(model)
    dev = m.head.weight.device if device is None else resolve_device(device)
    was_training = m.training
    m.to(dev).eval()
    total, count, n_seq = 0.0, 0, 0
    try:
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            unpacked = _unpack(batch, m, dev)
            if unpacked is None:
                continue
            seq, age, sex, dx = unpacked
            if drop_conditions:
                age = torch.full_like(age, math.nan)
                sex = torch.full_like(sex, UNKNOWN_SEX)
                dx = torch.full_like(dx, UNKNOWN_DIAGNOSIS)
            nll = m.nll(seq, age, sex, dx)  # (B,) nats per code
            total += float(nll.sum()) * seq.shape[1]
            count += seq.numel()
            n_seq += seq.shape[0]
    finally:
        m.train(was_training)
    nats = total / count if count else math.nan
    return {"bits_per_code": nats / LN2, "nll_nats_per_code": nats, "n_sequences": n_seq}


# --------------------------------------------------------------------------- encoding a site


def _stamp(path: Path | None) -> list[Any]:
    if path is None:
        return [None]
    st = Path(path).stat()
    return [str(Path(path).resolve()), st.st_size, st.st_mtime_ns]


@torch.no_grad()
def encode_codes(
    vqvae: nn.Module,
    dataset: Any,
    cache_dir: str | Path | None = None,
    vqvae_key: str = "vqvae",
    batch_size: int = 4,
    progress: bool = False,
) -> CodeDataset:
    """Encode every subject of a :class:`~fl_app.data.dataset.SiteDataset` into a :class:`CodeDataset`.

    Code grids are cached per subject in ``cache_dir/<vqvae_key>/<participant_id>.pt`` together with the
    size and mtime of the subject's image and label files; a cached grid is reused only when those
    still match (``vqvae_key`` should identify the VQ-VAE weights, e.g. a digest of ``vqvae.pt``).
    """
    from fl_app.models.vqvae import encode

    root = Path(cache_dir) / vqvae_key if cache_dir is not None else None
    if root is not None:
        root.mkdir(parents=True, exist_ok=True)
    n = len(dataset)
    codes: list[torch.Tensor | None] = [None] * n
    ages, sexes, dxs = torch.empty(n), torch.empty(n, dtype=torch.long), torch.empty(n, dtype=torch.long)
    todo: list[int] = []
    subjects = getattr(dataset, "subjects", None)
    for i in range(n):
        stamp = None
        if subjects is not None:
            s = subjects[i]
            stamp = [_stamp(s.image), _stamp(s.label)]
        pid = subjects[i].participant_id if subjects is not None else None
        cached = None
        if root is not None and pid is not None:
            f = root / f"{pid}.pt"
            if f.exists():
                payload = torch.load(f, weights_only=True)
                if payload.get("stamp") == json.dumps(stamp):
                    cached = payload
        if cached is not None:
            codes[i] = cached["codes"]
            ages[i], sexes[i], dxs[i] = cached["age"], cached["sex"], cached["diagnosis"]
        else:
            todo.append(i)
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        batch = [dataset[i] for i in chunk]
        image = torch.stack([b["image"] for b in batch])
        label = torch.stack([b["label"] for b in batch])
        grids = encode(vqvae, image, label, batch_size=batch_size)
        for j, i in enumerate(chunk):
            item = batch[j]
            codes[i] = grids[j].cpu()
            ages[i], sexes[i], dxs[i] = item["age"], item["sex"], item["diagnosis"]
            if root is not None and subjects is not None:
                s = subjects[i]
                torch.save(
                    {
                        "codes": codes[i],
                        "age": item["age"],
                        "sex": item["sex"],
                        "diagnosis": item["diagnosis"],
                        "stamp": json.dumps([_stamp(s.image), _stamp(s.label)]),
                    },
                    root / f"{s.participant_id}.pt",
                )
        if progress:
            log.info("encoded %d / %d subjects", min(start + batch_size, len(todo)), len(todo))
    log.info("code grids: %d from cache, %d encoded", n - len(todo), len(todo))
    return CodeDataset(torch.stack(codes) if n else torch.empty(0, 0, 0, 0), ages, sexes, dxs)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- CLI: train-local prior


def _vqvae_file(path: Path) -> Path:
    return path / "vqvae.pt" if path.is_dir() else path


def run_train_local_prior(args: argparse.Namespace) -> int:
    """``synthbrain train-local prior``: encode the sites with a VQ-VAE and train the prior centrally."""
    from fl_app.config import overrides_from_args, profile_from_dict
    from fl_app.data.cohort import read_bids
    from fl_app.data.dataset import SiteDataset, split_indices
    from fl_app.models.vqvae import load_vqvae

    vq_path = _vqvae_file(Path(args.vqvae))
    if not vq_path.exists():
        log.error("no VQ-VAE checkpoint at %s", vq_path)
        return 2
    dev = resolve_device(args.device)
    vqvae, vq_profile = load_vqvae(vq_path, map_location=dev)
    overrides = overrides_from_args(args, sections=("prior", "train"))  # the VQ-VAE fixes the rest
    if args.unconditional:
        overrides.setdefault("prior", {})["cond_dropout"] = 1.0
    base = vq_profile.model_dump(mode="json")
    for section, values in overrides.items():
        base[section] = {**base.get(section, {}), **values}
    profile = profile_from_dict(base, source="--set")
    seed = profile.train.seed if args.seed is None else args.seed
    seed_everything(seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache_root = Path(args.code_cache) if args.code_cache else out / "code_cache"
    vq_key = file_sha256(vq_path)[:16]

    parts: list[CodeDataset] = []
    for bids in args.bids:
        cohort = read_bids(bids)
        ds = SiteDataset(cohort.valid(), profile, cache_dir=args.cache_dir)
        log.info("%s: %d subjects usable (%d skipped)", bids, len(ds), ds.n_skipped)
        if len(ds) == 0:
            continue
        site_key = hashlib.sha256(str(Path(bids).resolve()).encode()).hexdigest()[:8]
        parts.append(encode_codes(vqvae, ds, cache_root / site_key, vq_key, progress=True))
    if not parts:
        log.error("no usable subjects in %s", ", ".join(map(str, args.bids)))
        return 2
    data = CodeDataset(
        torch.cat([p.codes for p in parts]),
        torch.cat([p.age for p in parts]),
        torch.cat([p.sex for p in parts]),
        torch.cat([p.diagnosis for p in parts]),
    )
    del vqvae
    train_idx, val_idx = split_indices(len(data), profile.train.val_fraction, seed)
    train_ds, val_ds = data.subset(train_idx), data.subset(val_idx)
    batch_size = args.batch_size or profile.train.batch_size
    train_loader = make_prior_loader(train_ds, batch_size, shuffle=True, seed=seed)
    val_loader = make_prior_loader(val_ds, batch_size, shuffle=False) if len(val_ds) else None

    model = build_prior(profile)
    if args.init:
        init_path = args.init / "prior.pt" if args.init.is_dir() else args.init
        try:
            added = load_prior_weights(model, init_path)
        except (OSError, ValueError) as e:
            log.error("--init %s: %s", args.init, e)
            return 2
        log.info("started from %s%s", init_path, f" (new, zero-initialised: {added})" if added else "")
    optimizer = make_prior_optimizer(model, args.lr or profile.train.lr)
    (out / "profile.yaml").write_text(profile_to_yaml(profile))

    def _log_epoch(rec: dict[str, Any]) -> None:
        val = rec.get("val", {})
        print(
            f"epoch {rec['epoch']}: train {rec['bits_per_code']:.3f} bits/code"
            + (f" | val {val['bits_per_code']:.3f} bits/code" if val else ""),
            flush=True,
        )

    result = train_prior_local(
        model,
        train_loader,
        profile,
        optimizer=optimizer,
        device=dev,
        epochs=args.epochs or (None if (args.max_steps or args.max_minutes) else profile.train.epochs),
        max_steps=args.max_steps,
        max_seconds=args.max_minutes * 60 if args.max_minutes else None,
        val_loader=val_loader,
        on_epoch_end=_log_epoch,
        amp=profile.train.amp,
        decay_steps=args.max_steps,
    )
    metrics: dict[str, Any] = {
        "profile": profile.name,
        "vqvae": str(vq_path),
        "bids": [str(b) for b in args.bids],
        "n_train": len(train_ds),
        "n_val": len(val_ds),
        "attention": profile.prior.attention,
        "cond_dropout": profile.prior.cond_dropout,
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "peak_rss_mb": peak_rss_mb(),
        **result,
    }
    if val_loader is not None:
        metrics["val"] = evaluate_prior(model, val_loader, dev)
        metrics["val_conditions_dropped"] = evaluate_prior(model, val_loader, dev, drop_conditions=True)
    save_prior(model, profile, out / "prior.pt", extra={"metrics": metrics.get("val", {}), "seed": seed})
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
    print(f"wrote {out / 'prior.pt'}, {out / 'metrics.json'}")
    return 0


def add_train_local_prior_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``prior`` to the ``train-local`` sub-command group."""
    p = subparsers.add_parser(
        "prior",
        help="encode BIDS folders with a trained VQ-VAE and train the transformer prior centrally",
        description="Encode every usable subject with the VQ-VAE (code grids cached per subject) and train "
        "the conditional transformer prior on the pooled code grids (non-federated baseline).",
    )
    p.add_argument("--vqvae", required=True, type=Path, help="VQ-VAE run folder (holding vqvae.pt) or file")
    p.add_argument("--bids", action="append", required=True, type=Path, help="BIDS folder (repeatable)")
    p.add_argument("--out", required=True, type=Path, help="run folder to write")
    p.add_argument("--epochs", type=int, default=None, help="default: profile train.epochs")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--max-minutes", type=float, default=None, help="wall-clock training budget")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--cache-dir", type=Path, default=None, help="preprocessing cache")
    p.add_argument("--code-cache", type=Path, default=None, help="code-grid cache (default RUN/code_cache)")
    p.add_argument(
        "--init",
        type=Path,
        default=None,
        help="continue training a prior checkpoint (prior.pt or its run folder); it may lack the "
        "cond_every_position projection, which then starts at zero",
    )
    p.add_argument(
        "--unconditional", action="store_true", help="ignore covariates (cond_dropout = 1), a baseline"
    )
    add_set_args(p, help="prior/train override, e.g. prior.attention=linear")
    p.set_defaults(func=run_train_local_prior)
    return p

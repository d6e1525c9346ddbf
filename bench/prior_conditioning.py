"""Does conditioning help the prior? Held-out bits per code of the conditional prior vs an unconditional one.

    python bench/prior_conditioning.py --vqvae VQVAE.pt --json OUT.json
        [--sites 3] [--subjects 16] [--test-subjects 16] [--steps 300] [--seed 0] [--repeats 1]
    python bench/prior_conditioning.py --prior pretrained|GLOBAL_MODEL_DIR|PRIOR.pt --json OUT.json
        [--vqvae VQVAE.pt] [--test-subjects 16] [--shuffles 5] [--seed 0] [--batch-size 4]

1. Simulates ``--sites`` training sites (``fl_app.data.simulate.simulate_sites``, seed ``--seed``) and one
   held-out site (seed ``--seed + 1000``, the held-out seed of ``bench/vqvae.py``) with the profile stored in
   the VQ-VAE checkpoint (``load_vqvae``), and encodes every subject into a code grid (``encode_codes``).
   Without ``--vqvae`` a VQ-VAE is first trained centrally on the training sites for ``--vqvae-minutes``
   (``train_vqvae_local``; profile ``--profile`` with ``--set`` overrides) and the JSON says so.
2. Trains the same architecture twice, from the same initial weights, on the same batches in the same
   order, for ``--steps`` optimiser steps:

   * ``conditional``: the profile's prior (``cond_dropout`` as configured);
   * ``unconditional``: the same prior section with ``cond_dropout = 1.0``, so every training sequence sees
     the "unknown" prefix (the ``train-local prior --unconditional`` model). This is the cleanest control:
     the training code path, the parameters, the initialisation and even the random-number stream (condition
     dropout draws the same ``torch.rand`` calls for any ``cond_dropout`` > 0) are identical; only whether the
     covariates reach the model differs. It is evaluated with every covariate unknown, the prefix it was
     trained with (its untrained "known" embeddings would otherwise only add noise). Evaluating the
     conditional model with conditions dropped (``drop_conditions``) is reported too, but it is not a clean
     control: that model spent at most ``cond_dropout`` of its training on unconditional prefixes.

3. Reports held-out bits per code of the conditional prior with true covariates, with all covariates
   dropped, with only age / only sex / only diagnosis known, and with *shuffled* covariates (each held-out
   subject given another held-out subject's age, sex and diagnosis; mean over ``--shuffles`` seeded
   permutations); the unconditional prior's; the same on the
   training subjects (overfitting check); a unigram (code-frequency) reference; and per-subject paired
   differences ``conditional(true) - unconditional`` (and the other contrasts) with their mean, a 95 %
   percentile-bootstrap CI over held-out subjects and a 95 % t interval.

``conditioning_helps`` (issue #4's target) is true when the bootstrap CI of ``conditional(true) -
unconditional`` lies below zero, *and* so does that of ``conditional(true) - conditional(shuffled)``, *and*
every repeat's mean difference is negative. The second condition is there because the subject-level CI
does not include training noise: two priors trained on different prefixes end at slightly different
losses even when the covariates carry nothing (a smoke run with an untrained VQ-VAE showed a "significant"
-0.02 bits that the conditional model also had with its covariates dropped). Shuffled covariates have the
same distribution as the true ones but no link to the subject's codes, so the same model doing better with
the true ones than with shuffled ones is evidence that it uses what the covariates say about the subject
(dropping them is a weaker control: "known" and "unknown" prefixes differ in more than information).
With ``--repeats R`` the pair is
trained R times (initialisation, batch-order and condition-dropout seeds ``--seed`` .. ``--seed + R - 1``);
the paired statistics then use each subject's difference averaged over repeats, and ``repeat_mean_diffs``
lists each repeat's mean difference (its spread is the training-seed noise).

Checkpoint mode (``--prior``, ``"mode": "checkpoint"`` in the JSON) evaluates an existing trained prior
instead of training a pair: ``--prior`` is a ``prior.pt``, a global-model directory holding ``prior.pt`` and
``vqvae.pt``, or ``pretrained`` (the shipped ``fl_app/pretrained/cpu-demo/``); ``--vqvae`` defaults to the
``vqvae.pt`` beside the prior, and the profile is the checkpoint's. Only the held-out site is simulated
(seed ``--seed + 1000``, ``--test-subjects``) and encoded; the prior is evaluated on it with the conditions
above (true, dropped, one covariate known, shuffled). There is no separately trained unconditional prior
here: the control is the *same model with every covariate dropped*, which is a classifier-free-guidance-style
unconditional model because the prior was trained with condition dropout (``prior.cond_dropout``). So
``conditioning_helps`` is true when the bootstrap CIs of ``conditional(true) - conditional(dropped)`` and of
``conditional(true) - conditional(shuffled)`` both lie below zero. Keys that only a trained pair or the
training subjects give (``unconditional``, ``train_bits_per_code``, the unigram and positional references,
``steps``, ``per_repeat``, ...) are null.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fl_app.config import Profile, load_profile, profile_from_dict
from fl_app.data.covariates import UNKNOWN_DIAGNOSIS, UNKNOWN_SEX
from fl_app.evaluate import metrics as M
from fl_app.models.prior import build_prior, unwrap_prior
from fl_app.train.prior_local import (
    CodeDataset,
    encode_codes,
    evaluate_prior,
    make_prior_loader,
    make_prior_optimizer,
    train_prior_local,
)

LN2 = math.log(2.0)

CONDITIONS: dict[str, tuple[bool, bool, bool]] = {
    "true": (True, True, True),
    "dropped": (False, False, False),
    "age_only": (True, False, False),
    "sex_only": (False, True, False),
    "diagnosis_only": (False, False, True),
}
"""Which covariates (age, sex, diagnosis) stay known when the conditional prior is evaluated."""

CONTRASTS: tuple[tuple[str, str], ...] = (
    ("conditional_true", "unconditional"),
    ("conditional_true", "conditional_shuffled"),
    ("conditional_true", "conditional_dropped"),
    ("conditional_dropped", "unconditional"),
    ("conditional_age_only", "conditional_dropped"),
    ("conditional_sex_only", "conditional_dropped"),
    ("conditional_diagnosis_only", "conditional_dropped"),
)
"""The paired per-subject differences reported, as (minuend, subtrahend) keys of the held-out bits."""


# --------------------------------------------------------------------------- statistics


def shuffle_covariates(data: CodeDataset, seed: int) -> CodeDataset:
    """A copy of ``data`` whose (age, sex, diagnosis) triples are permuted across subjects (seeded).

    The covariates keep their joint distribution but lose their link to each subject's code grid.
    """
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    return CodeDataset(data.codes, data.age[perm], data.sex[perm], data.diagnosis[perm])


def mask_covariates(data: CodeDataset, known: tuple[bool, bool, bool]) -> CodeDataset:
    """A copy of ``data`` with the covariates not marked known set to "unknown" (NaN age, unknown index)."""
    age_k, sex_k, dx_k = known
    return CodeDataset(
        data.codes,
        data.age.clone() if age_k else torch.full_like(data.age, math.nan),
        data.sex.clone() if sex_k else torch.full_like(data.sex, UNKNOWN_SEX),
        data.diagnosis.clone() if dx_k else torch.full_like(data.diagnosis, UNKNOWN_DIAGNOSIS),
    )


@torch.no_grad()
def per_subject_bits(
    model: nn.Module,
    data: CodeDataset,
    known: tuple[bool, bool, bool] = (True, True, True),
    batch_size: int = 8,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """Bits per code of every subject's code grid under ``model`` (eval mode, no condition dropout).

    Args:
        model: a :class:`~fl_app.models.prior.ConditionalPrior` (or an Opacus wrapper of one).
        data: the subjects' code grids and covariates.
        known: (age, sex, diagnosis) flags; covariates not known are set to "unknown".
        batch_size: sequences per forward pass.
        device: where to evaluate.

    Returns:
        float64 array (S,): mean negative log2-likelihood per code of each subject, in ``data``'s order.
        Every grid has the same number of codes, so its mean equals :func:`evaluate_prior`'s bits per code.
    """
    m = unwrap_prior(model)
    was_training = m.training
    m.to(device).eval()
    masked = mask_covariates(data, known)
    out: list[torch.Tensor] = []
    try:
        for start in range(0, len(masked), batch_size):
            idx = range(start, min(start + batch_size, len(masked)))
            b = masked.subset(idx)
            seq = m.grid_to_sequence(b.codes.to(device))
            nll = m.nll(seq, b.age.to(device), b.sex.to(device), b.diagnosis.to(device))
            out.append(nll.double().cpu() / LN2)
    finally:
        m.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros(0)


def paired_summary(diff: Sequence[float] | np.ndarray, n_boot: int = 10_000, seed: int = 0) -> dict[str, Any]:
    """Mean of per-subject paired differences with a 95 % percentile-bootstrap CI and a 95 % t interval.

    Args:
        diff: one difference per held-out subject (e.g. conditional minus unconditional bits per code).
        n_boot: bootstrap resamples of the subjects.
        seed: seed of the bootstrap.

    Returns:
        ``{"n", "mean", "sd", "ci95_bootstrap": [lo, hi], "ci95_t": [lo, hi], "fraction_negative"}``
        (the intervals are NaN with fewer than two subjects).
    """
    from scipy import stats

    d = np.asarray(diff, dtype=np.float64)
    n = int(d.size)
    if n == 0:
        raise ValueError("no paired differences")
    mean = float(d.mean())
    nan_ci = [math.nan, math.nan]
    if n < 2:
        return {"n": n, "mean": mean, "sd": math.nan, "ci95_bootstrap": nan_ci, "ci95_t": nan_ci,
                "fraction_negative": float((d < 0).mean())}  # fmt: skip
    sd = float(d.std(ddof=1))
    rng = np.random.default_rng(seed)
    boot = d[rng.integers(0, n, size=(n_boot, n))].mean(axis=1)
    half = float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
    return {
        "n": n,
        "mean": mean,
        "sd": sd,
        "ci95_bootstrap": [float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))],
        "ci95_t": [mean - half, mean + half],
        "fraction_negative": float((d < 0).mean()),
    }


def paired_contrasts(bits: dict[str, np.ndarray], seed: int) -> dict[str, dict[str, Any] | None]:
    """:func:`paired_summary` of every :data:`CONTRASTS` difference ``a - b`` of per-subject bits, keyed
    ``"<a>_minus_<b>"``; None where ``bits`` lacks a side (no ``unconditional`` prior in checkpoint mode)."""
    return {
        f"{a}_minus_{b}": paired_summary(bits[a] - bits[b], seed=seed) if a in bits and b in bits else None
        for a, b in CONTRASTS
    }


def unigram_bits(train_codes: torch.Tensor, test_codes: torch.Tensor, vocab: int) -> float:
    """Held-out bits per code of a code-frequency model (add-one smoothed counts of the training codes):
    the reference any prior that uses context should beat."""
    counts = torch.bincount(train_codes.reshape(-1).long(), minlength=vocab).double() + 1.0
    logp = torch.log2(counts / counts.sum())
    return float(-logp[test_codes.reshape(-1).long()].mean())


def positional_reference(train_codes: torch.Tensor, test_codes: torch.Tensor, vocab: int) -> dict[str, float]:
    """How much of a code grid its position alone predicts (codes ``(N, *grid)``, integers < ``vocab``).

    ``mode_agreement``: fraction of held-out codes equal to the training set's most frequent code at their
    grid position. ``bits_per_code``: held-out bits per code of a per-position frequency model with one
    pseudo-count spread over the vocabulary (``1 / vocab`` per code). When these are close to the prior's
    own figures, the code grids are nearly the same for every subject, and covariates have little left to
    explain: a property of the VQ-VAE, not of the prior.
    """
    tr = train_codes.reshape(train_codes.shape[0], -1).long()
    te = test_codes.reshape(test_codes.shape[0], -1).long()
    if tr.shape[1] != te.shape[1]:
        raise ValueError(f"grids differ: {tuple(train_codes.shape[1:])} vs {tuple(test_codes.shape[1:])}")
    counts = torch.zeros(tr.shape[1], vocab, dtype=torch.float64)
    counts.scatter_add_(1, tr.T, torch.ones(tr.T.shape, dtype=torch.float64))
    probs = (counts + 1.0 / vocab) / (tr.shape[0] + 1.0)
    logp = torch.log2(probs.gather(1, te.T))  # (positions, test subjects)
    return {
        "mode_agreement": M.code_mode_agreement(tr, te),
        "bits_per_code": float(-logp.mean()),
    }


# --------------------------------------------------------------------------- data


def _site_datasets(paths: Sequence[Path], profile: Profile, cache: Path) -> list[Any]:
    from fl_app.data.cohort import read_bids
    from fl_app.data.dataset import SiteDataset

    sets = [SiteDataset(read_bids(p).valid(), profile, cache_dir=cache) for p in paths]
    return [s for s in sets if len(s)]


def _concat(parts: Sequence[CodeDataset]) -> CodeDataset:
    return CodeDataset(
        torch.cat([p.codes for p in parts]),
        torch.cat([p.age for p in parts]),
        torch.cat([p.sex for p in parts]),
        torch.cat([p.diagnosis for p in parts]),
    )


def _train_vqvae_here(
    args: argparse.Namespace, profile: Profile, train_sets: Sequence[Any], dev: torch.device
) -> tuple[nn.Module, dict[str, Any]]:
    """Train a VQ-VAE centrally on the training sites for ``--vqvae-minutes`` (no checkpoint given)."""
    from fl_app.models.vqvae import build_vqvae
    from fl_app.train.vqvae_local import (
        VQVAE_BATCH_KEYS,
        make_optimizer,
        make_vqvae_loader,
        train_vqvae_local,
    )

    items = [{k: ds[i][k] for k in VQVAE_BATCH_KEYS} for ds in train_sets for i in range(len(ds))]
    torch.manual_seed(args.seed)
    model = build_vqvae(profile)
    optimizer = make_optimizer(model, profile)
    loader = make_vqvae_loader(items, profile.train.batch_size, shuffle=True, seed=args.seed)
    res = train_vqvae_local(
        model, loader, profile, optimizer=optimizer, device=dev, max_seconds=args.vqvae_minutes * 60,
        max_steps=args.vqvae_max_steps, amp=profile.train.amp, seed=args.seed,
        decay_steps=args.vqvae_max_steps,
    )  # fmt: skip
    model.eval()
    info = {
        "source": f"trained here: train_vqvae_local for at most {args.vqvae_minutes:g} min (no --vqvae given)",
        "steps": res["steps"],
        "train_seconds": res["train_seconds"],
        "final_loss": res["final"].get("loss", math.nan),
        "codebook_perplexity": res["final"].get("codebook_perplexity", math.nan),
    }
    return model, info


def _apply_prior_overrides(profile: Profile, items: list[str] | None) -> Profile:
    """``--set prior.X=V`` / ``train.X=V`` on a checkpoint's profile (the VQ-VAE fixes data and vqvae)."""
    from fl_app.config import parse_overrides

    over = parse_overrides(items)
    bad = [k for k in over if k not in ("prior", "train")]
    if bad:
        raise SystemExit(f"with --vqvae only prior.* and train.* may be overridden, not {bad}")
    base = profile.model_dump(mode="json")
    for section, values in over.items():
        base[section] = {**base.get(section, {}), **values}
    return profile_from_dict(base, source="--set")


# --------------------------------------------------------------------------- training


def train_variant(
    profile: Profile,
    cond_dropout: float,
    init_state: dict[str, torch.Tensor],
    train_ds: CodeDataset,
    steps: int,
    seed: int,
    batch_size: int,
    lr: float,
    device: torch.device,
    curve_ds: CodeDataset | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train one prior from ``init_state`` with the given ``cond_dropout``; everything else fixed by ``seed``.

    ``curve_ds`` (held-out codes, with the covariates this variant is evaluated with) is evaluated after
    every epoch for a learning curve.
    """
    cfg = profile.prior.model_copy(update={"cond_dropout": float(cond_dropout)})
    model = build_prior(profile, cfg)
    model.load_state_dict(init_state)
    optimizer = make_prior_optimizer(model, lr)
    loader = make_prior_loader(train_ds, batch_size, shuffle=True, seed=seed)
    val_loader = make_prior_loader(curve_ds, batch_size, shuffle=False) if curve_ds is not None else None
    torch.manual_seed(seed + 1)  # the condition-dropout stream: identical for both variants
    res = train_prior_local(
        model, train_loader=loader, optimizer=optimizer, device=device, max_steps=steps,
        val_loader=val_loader, amp=profile.train.amp, decay_steps=steps,
    )  # fmt: skip
    model.eval()
    info = {
        "cond_dropout": float(cond_dropout),
        "steps": res["steps"],
        "epochs": len(res["epochs"]),
        "train_seconds": res["train_seconds"],
        "final_train_loss_bits": res["final"].get("bits_per_code", math.nan),
        "curve": [
            {"epoch": e["epoch"], "steps": e["steps"], "train_bits": round(e["bits_per_code"], 5)}
            | ({"heldout_bits": round(e["val"]["bits_per_code"], 5)} if "val" in e else {})
            for e in res["epochs"]
        ],
    }
    return model, info


# --------------------------------------------------------------------------- checkpoint mode


def _load_checkpoint_prior(
    spec: str, vqvae: Path | None, device: torch.device
) -> tuple[nn.Module, Path, Path]:
    """``--prior``'s model (eval mode), its file, and the VQ-VAE file (``--vqvae``, else beside the prior)."""
    from fl_app.models.pretrained import resolve_init
    from fl_app.models.prior import load_prior

    path = resolve_init(spec, "prior", option="--prior")
    if path is None:
        raise SystemExit(f"--prior {spec!r}: give a prior .pt, a global-model directory or 'pretrained'")
    vq_path = vqvae if vqvae is not None else path.parent / "vqvae.pt"
    if not vq_path.is_file():
        raise SystemExit(f"--prior {spec}: no VQ-VAE at {vq_path} (give --vqvae)")
    prior, _ = load_prior(path, map_location=device)
    return prior, path, vq_path


def evaluate_checkpoint(
    args: argparse.Namespace,
    profile: Profile,
    prior: nn.Module,
    prior_path: Path,
    vq_info: dict[str, Any],
    test_codes: CodeDataset,
    dev: torch.device,
    timing: dict[str, float],
) -> dict[str, Any]:
    """Checkpoint mode: the given prior on the held-out subjects; the unconditional control is the same
    model with every covariate dropped. Same JSON keys as the trained pair (null where they need one)."""
    from fl_app.train.common import peak_rss_mb

    t0 = time.perf_counter()
    batch_size = args.batch_size or profile.train.batch_size
    bits = {
        f"conditional_{cname}": per_subject_bits(prior, test_codes, known, batch_size, dev)
        for cname, known in CONDITIONS.items()
    }
    shuffled = [
        per_subject_bits(prior, shuffle_covariates(test_codes, 1000 * args.seed + k), batch_size=batch_size,
                         device=dev)
        for k in range(args.shuffles)
    ]  # fmt: skip
    bits["conditional_shuffled"] = np.mean(np.stack(shuffled), axis=0)
    paired = paired_contrasts(bits, args.seed)
    helps = all(
        paired[k]["ci95_bootstrap"][1] < 0
        for k in ("conditional_true_minus_conditional_dropped", "conditional_true_minus_conditional_shuffled")
    )
    vocab = profile.vqvae.num_embeddings
    return {
        "bench": "bench/prior_conditioning.py",
        "mode": "checkpoint",
        "unconditional_control": "same model, covariates dropped (trained with condition dropout "
        f"{unwrap_prior(prior).cfg.cond_dropout:g}): paired.conditional_true_minus_conditional_dropped",
        "prior_checkpoint": {
            "source": str(prior_path),
            "checkpoint_extra": getattr(prior, "checkpoint_extra", {}),
        },
        **_run_info(profile, vq_info, dev),
        "sites": None,
        "subjects_per_site": None,
        "n_train": None,
        "n_test": len(test_codes),
        "seed": args.seed,
        "repeats": None,
        "shuffles": args.shuffles,
        "steps": None,
        "batch_size": batch_size,
        "lr": None,
        "code_shape": list(profile.code_shape),
        "vocab": vocab,
        "prior": unwrap_prior(prior).cfg.model_dump(mode="json"),
        "n_parameters": sum(p.numel() for p in prior.parameters()),
        "heldout_bits_per_code": {k: float(v.mean()) for k, v in bits.items()},
        "train_bits_per_code": None,
        "unigram_heldout_bits_per_code": None,
        "positional_reference": None,
        "uniform_bits_per_code": math.log2(vocab),
        "paired": paired,
        "conditioning_helps": bool(helps),
        "repeat_mean_diffs": None,
        "per_repeat": None,
        "data_seconds": timing["data_seconds"],
        "encode_seconds": timing["encode_seconds"],
        "eval_seconds": time.perf_counter() - t0,
        "total_seconds": time.perf_counter() - timing["t_start"],
        "peak_rss_mb": peak_rss_mb(),
    }


# --------------------------------------------------------------------------- the bench


def _run_info(profile: Profile, vq_info: dict[str, Any], dev: Any) -> dict[str, Any]:
    """The keys every mode's JSON shares: profile, VQ-VAE source, device, threads, platform, torch."""
    return {
        "profile": profile.name,
        "vqvae": vq_info,
        "device": str(dev),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "torch": torch.__version__,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole benchmark; returns the JSON-able result."""
    from fl_app.config import parse_overrides
    from fl_app.data.simulate import simulate_sites
    from fl_app.models.vqvae import load_vqvae
    from fl_app.train.common import peak_rss_mb, resolve_device

    if args.threads:
        torch.set_num_threads(args.threads)
    dev = resolve_device(args.device)
    t_start = time.perf_counter()
    vq_info: dict[str, Any]
    prior, prior_path, vq_path = None, None, args.vqvae
    if args.prior is not None:
        prior, prior_path, vq_path = _load_checkpoint_prior(args.prior, args.vqvae, dev)
    if vq_path is not None:
        vqvae, profile = load_vqvae(vq_path, map_location=dev)
        profile = _apply_prior_overrides(profile, args.set)
        vq_info = {"source": str(vq_path), "checkpoint_extra": getattr(vqvae, "checkpoint_extra", {})}
        vq_grid = (profile.vqvae.num_embeddings, tuple(profile.code_shape))
        if prior is not None and (prior.num_codes, prior.code_shape) != vq_grid:
            raise SystemExit(
                f"{prior_path}: vocabulary / code grid {prior.num_codes} / {prior.code_shape} do not match "
                f"the VQ-VAE {vq_path}'s {vq_grid[0]} / {vq_grid[1]}"
            )
    else:
        vqvae = None
        profile = load_profile(args.profile, parse_overrides(args.set))

    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench-prior-cond-")
        work = Path(tmp.name)
    else:
        work = Path(args.workdir)
    try:
        t0 = time.perf_counter()
        train_paths: list[Path] = []  # checkpoint mode: held-out subjects only
        if prior is None:
            train_paths = simulate_sites(work / "train", args.sites, args.subjects, profile, seed=args.seed)
        test_paths = simulate_sites(work / "test", 1, args.test_subjects, profile, seed=args.seed + 1000)
        train_sets = _site_datasets(train_paths, profile, work / "cache")
        test_sets = _site_datasets(test_paths, profile, work / "cache")
        if not test_sets or (prior is None and not train_sets):
            raise RuntimeError("no usable simulated subjects (preprocessing refused them all)")
        data_seconds = time.perf_counter() - t0
        if vqvae is None:
            vqvae, vq_info = _train_vqvae_here(args, profile, train_sets, dev)
        t0 = time.perf_counter()
        train_codes = _concat([encode_codes(vqvae, ds) for ds in train_sets]) if train_sets else None
        test_codes = _concat([encode_codes(vqvae, ds) for ds in test_sets])
        encode_seconds = time.perf_counter() - t0
    finally:
        if tmp is not None:
            tmp.cleanup()
    del vqvae
    n_train = 0 if train_codes is None else len(train_codes)
    print(
        f"data: {n_train} train / {len(test_codes)} held-out subjects, code grid "
        f"{list(profile.code_shape)} ({data_seconds:.0f} s simulate + preprocess, {encode_seconds:.0f} s encode)",
        file=sys.stderr,
        flush=True,
    )
    if prior is not None:
        timing = {"data_seconds": data_seconds, "encode_seconds": encode_seconds, "t_start": t_start}
        return evaluate_checkpoint(args, profile, prior, prior_path, vq_info, test_codes, dev, timing)

    vocab = profile.vqvae.num_embeddings
    batch_size = args.batch_size or profile.train.batch_size
    lr = args.lr or profile.train.lr
    held_dropped = mask_covariates(test_codes, CONDITIONS["dropped"])
    repeats: list[dict[str, Any]] = []
    bits: dict[str, list[np.ndarray]] = {}
    train_bits: dict[str, list[float]] = {}
    for r in range(args.repeats):
        seed = args.seed + r
        torch.manual_seed(seed)
        init_state = {k: v.clone() for k, v in build_prior(profile).state_dict().items()}
        rec: dict[str, Any] = {"seed": seed}
        models = {}
        for name, p, curve in (
            ("conditional", profile.prior.cond_dropout, test_codes),
            ("unconditional", 1.0, held_dropped),
        ):
            t0 = time.perf_counter()
            model, info = train_variant(
                profile, p, init_state, train_codes, args.steps, seed, batch_size, lr, dev,
                curve_ds=None if args.no_curve else curve,
            )  # fmt: skip
            models[name] = model
            rec[name] = info
            print(
                f"repeat {r} {name}: {info['steps']} steps in {time.perf_counter() - t0:.0f} s, "
                f"final train {info['final_train_loss_bits']:.3f} bits/code",
                file=sys.stderr,
                flush=True,
            )
        cond, unc = models["conditional"], models["unconditional"]
        for cname, known in CONDITIONS.items():
            bits.setdefault(f"conditional_{cname}", []).append(
                per_subject_bits(cond, test_codes, known, batch_size, dev)
            )
        shuffled = [
            per_subject_bits(cond, shuffle_covariates(test_codes, 1000 * seed + k), batch_size=batch_size,
                             device=dev)
            for k in range(args.shuffles)
        ]  # fmt: skip
        bits.setdefault("conditional_shuffled", []).append(np.mean(np.stack(shuffled), axis=0))
        bits.setdefault("unconditional", []).append(
            per_subject_bits(unc, test_codes, CONDITIONS["dropped"], batch_size, dev)
        )
        for key, model, known in (
            ("conditional_true", cond, CONDITIONS["true"]),
            ("conditional_dropped", cond, CONDITIONS["dropped"]),
            ("unconditional", unc, CONDITIONS["dropped"]),
        ):
            train_bits.setdefault(key, []).append(
                float(per_subject_bits(model, train_codes, known, batch_size, dev).mean())
            )
        # cross-check: the per-subject evaluation agrees with the training code's evaluate_prior
        ev = evaluate_prior(cond, make_prior_loader(test_codes, batch_size, shuffle=False), dev)
        rec["evaluate_prior_check"] = ev["bits_per_code"] - float(bits["conditional_true"][-1].mean())
        rec["heldout_bits"] = {k: float(v[-1].mean()) for k, v in bits.items()}
        rec["mean_diff_conditional_true_minus_unconditional"] = float(
            (bits["conditional_true"][-1] - bits["unconditional"][-1]).mean()
        )
        repeats.append(rec)

    avg = {k: np.mean(np.stack(v), axis=0) for k, v in bits.items()}  # per subject, over repeats
    paired = paired_contrasts(avg, args.seed)
    repeat_diffs = [r["mean_diff_conditional_true_minus_unconditional"] for r in repeats]
    helps = (
        paired["conditional_true_minus_unconditional"]["ci95_bootstrap"][1] < 0
        and paired["conditional_true_minus_conditional_shuffled"]["ci95_bootstrap"][1] < 0
        and all(d < 0 for d in repeat_diffs)
    )
    return {
        "bench": "bench/prior_conditioning.py",
        "mode": "trained pair",
        "unconditional_control": "a second prior trained here with cond_dropout = 1",
        **_run_info(profile, vq_info, dev),
        "sites": args.sites,
        "subjects_per_site": args.subjects,
        "n_train": len(train_codes),
        "n_test": len(test_codes),
        "seed": args.seed,
        "repeats": args.repeats,
        "shuffles": args.shuffles,
        "steps": args.steps,
        "batch_size": batch_size,
        "lr": lr,
        "code_shape": list(profile.code_shape),
        "vocab": vocab,
        "prior": profile.prior.model_dump(mode="json"),
        "n_parameters": sum(p.numel() for p in build_prior(profile).parameters()),
        "heldout_bits_per_code": {k: float(v.mean()) for k, v in avg.items()},
        "train_bits_per_code": {k: float(np.mean(v)) for k, v in train_bits.items()},
        "unigram_heldout_bits_per_code": unigram_bits(train_codes.codes, test_codes.codes, vocab),
        "positional_reference": positional_reference(train_codes.codes, test_codes.codes, vocab),
        "uniform_bits_per_code": math.log2(vocab),
        "paired": paired,
        "conditioning_helps": bool(helps),
        "repeat_mean_diffs": repeat_diffs,
        "per_repeat": repeats,
        "data_seconds": data_seconds,
        "encode_seconds": encode_seconds,
        "total_seconds": time.perf_counter() - t_start,
        "peak_rss_mb": peak_rss_mb(),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--vqvae", type=Path, default=None,
        help="VQ-VAE checkpoint (bench/vqvae.py --save-model); with --prior default: the vqvae.pt beside it",
    )  # fmt: skip
    ap.add_argument(
        "--prior", default=None, metavar="PATH|pretrained",
        help="checkpoint mode: evaluate this trained prior (.pt, global-model directory, or 'pretrained' for "
        "the shipped cpu-demo checkpoint) on held-out subjects, no training (--sites, --subjects, --steps, "
        "--repeats, --lr and the VQ-VAE options are then unused)",
    )  # fmt: skip
    ap.add_argument("--json", type=Path, default=None, help="write the result here")
    ap.add_argument("--sites", type=int, default=3, help="training sites")
    ap.add_argument("--subjects", type=int, default=16, help="subjects per training site")
    ap.add_argument("--test-subjects", type=int, default=16, help="subjects of the held-out site")
    ap.add_argument("--steps", type=int, default=300, help="optimiser steps per prior")
    ap.add_argument("--repeats", type=int, default=1, help="train the pair this many times (seeds seed..)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shuffles", type=int, default=5, help="covariate permutations of the shuffled control")
    ap.add_argument("--batch-size", type=int, default=None,
                    help="training and evaluation batch; default: the profile's train.batch_size")  # fmt: skip
    ap.add_argument("--lr", type=float, default=None, help="default: the profile's train.lr")
    ap.add_argument("--no-curve", action="store_true", help="skip the per-epoch held-out learning curve")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for this run")
    ap.add_argument("--workdir", type=Path, default=None, help="keep simulated data here (default: temp)")
    ap.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="profile override (with --vqvae: prior.* and train.* only)")  # fmt: skip
    ap.add_argument("--profile", default="cpu-demo", help="profile of the VQ-VAE trained without --vqvae")
    ap.add_argument("--vqvae-minutes", type=float, default=5.0, help="VQ-VAE budget without --vqvae")
    ap.add_argument("--vqvae-max-steps", type=int, default=None, help="also stop the VQ-VAE after N steps")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.repeats < 1 or args.shuffles < 1:
        ap.error("--steps, --repeats and --shuffles must be >= 1")
    if args.prior is not None and args.set:
        ap.error("--set does not apply with --prior (the checkpoint fixes the profile)")
    out = run(args)
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

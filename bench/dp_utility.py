"""Utility cost of differential privacy: held-out VQ-VAE PSNR and prior bits per code, same compute budget.

    python bench/dp_utility.py --json OUT.json [--profile cpu-demo] [--sites 3] [--subjects 8]
                               [--rounds 10] [--steps 20] [--prior-rounds 10] [--prior-steps 20] [--tiny]
                               [--batch-size B] [--threads 1] [--settings no_dp dp_sgd_eps8 ...]

Simulates ``--sites`` training sites plus held-out subjects (an unseen site, or with ``--site-val`` each
training site's own validation split; ``fl_app.data.simulate``), then runs federated
averaging in-process (no NVFlare: the same local training functions the clients use, the same
aggregation strategies the server uses) for ``--rounds`` rounds × ``--steps`` local steps per site in each
setting:

* ``no_dp``: sample-weighted FedAvg, DP-compatible VQ-VAE (so only DP differs between settings);
* ``dp_sgd_eps{1,4,8}``: Opacus DP-SGD at each site (Poisson sampling, per-sample clip
  ``--clip``, σ derived from the target ε at δ = 1e-5 for rounds × steps), uniform FedAvg;
* ``dp_fedavg``: server-side DP-FedAvg (σ ``--server-noise``, adaptive clip at the median), no local DP;
* ``dp_sgd_eps{1,4,8}_{arm}`` / ``no_dp_{arm}`` for every ``--arms`` entry other than ``full``: the same,
  fine-tuning only the arm's trainable subset (:data:`ARMS`, ``profile.finetune``) from ``--init``; frozen
  tensors stay the checkpoint's and only the trainable ones are averaged (as the federated jobs do).

``--init pretrained|PATH|scratch``: every setting starts from this checkpoint (a global-model directory or a
VQ-VAE ``.pt``; its profile replaces ``--profile`` / ``--tiny``; a directory with a ``prior.pt`` starts the
prior from it too); ``initial`` is then the checkpoint's own held-out PSNR (what fine-tuning must beat).
``--subjects`` is the records per site (50 / 200 / 1,000 in docs/BENCHMARKS.md).

``--fedavg-sites N ...`` adds the site-level DP-FedAvg measurement (``dp_fedavg_sites`` in the JSON): many
in-process sites of ``--fedavg-subjects`` subjects each (drawn from a pool of ``--fedavg-pool`` simulated
subjects, so sites overlap: the measurement is of the server noise, not of data diversity), ``m`` of them
sampled per round (``--fedavg-per-round``), ``--fedavg-rounds`` rounds × ``--fedavg-steps`` local steps of the
``--fedavg-arm`` subset; σ for site-level ε = ``--fedavg-epsilon`` at δ = 1e-5 with sampling rate q = m / N
(RDP, Poisson approximation), fixed clip C = the median site-update norm of a no-noise pilot round
(``--fedavg-clip`` overrides; the pilot is not private). Its cost is the PSNR drop against the same run
without server noise (same clip, same sampled sites).

VQ-VAE: PSNR on the held-out subjects: one unseen site of ``--held-subjects`` from another seed, or with
``--site-val K`` the last K simulated subjects of every training site (each site's validation split: "on those
sites", where a fine-tune can learn what is particular to them). Prior: trained the same way on one common set of codes, so bits per code
are comparable across settings and measure the prior's own DP cost, evaluated on the held-out site's codes.
``--prior-codes init`` (the default with ``--init``): the codes of the starting VQ-VAE, i.e. the public
checkpoint kept frozen (a consortium that fine-tunes only the prior; fine-tuning the VQ-VAE would move the codes
under the checkpoint prior); ``no_dp`` (the default from scratch, where the starting VQ-VAE is untrained): the
codes of the no-DP fine-tuned VQ-VAE. Prints / writes JSON with each setting's metrics, ε and wall time, plus the
untrained models' held-out PSNR / bits per code (``initial``), so "no DP learned something" can be checked.
DP-SGD's ε is per job (VQ-VAE, prior) and for both jobs composed on one site ledger (``site_epsilon_total``).
Target: ε = 8 within 1 dB PSNR of no DP on cpu-demo. ``--tiny``: 32³ at 5 mm (as ``synthbrain demo --tiny``),
tiny networks. The figures are step-matched, so a busy machine changes the seconds, not the utility.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

DELTA = 1e-5
ARMS: dict[str, tuple[list[str], list[str]]] = {
    "full": (["all"], ["all"]),
    "last": (["decoder_last"], ["prior_last", "cond_embeddings"]),
    "out": (["decoder_out"], ["prior_last", "cond_embeddings"]),
    "biases": (["biases"], ["biases"]),
    "decoder": (["decoder"], ["prior_last", "cond_embeddings", "norms"]),
}
"""Fine-tuning arms: (``finetune.vqvae``, ``finetune.prior``) presets of :data:`fl_app.config.FINETUNE_PRESETS`."""


def _datasets(
    tmp: Path,
    prof,
    n_sites: int,
    n_subjects: int,
    seed: int,
    n_held: int,
    site_val: int = 0,
    first_site: int = 0,
):
    """Simulated training sites (the usable ones) and the held-out subjects: with ``site_val`` > 0, the last
    ``site_val`` subjects simulated at each training site (each site's own validation split, pooled), else one
    unseen site of ``n_held`` subjects drawn from another seed; with site splits, each held-out volume's site."""
    from fl_app.data.cohort import read_bids
    from fl_app.data.dataset import SiteDataset
    from fl_app.data.simulate import simulate_sites

    key = {"sites": n_sites, "subjects": n_subjects + site_val, "seed": seed, "first_site": first_site,
           "shape": list(prof.data.shape), "spacing": list(prof.data.spacing)}  # fmt: skip
    # a --workdir run reuses the sites an earlier run simulated with the same options
    stamp = tmp / "data.json"
    done = json.loads(stamp.read_text()) if stamp.is_file() else {}
    if done.get("key") == key and all(Path(p).is_dir() for p in done["paths"]):
        paths = [Path(p) for p in done["paths"]]
    else:
        paths = simulate_sites(
            tmp / "data", n_sites, n_subjects + site_val, prof, seed, first_site=first_site
        )
        stamp.write_text(json.dumps({"key": key, "paths": [str(p) for p in paths]}))
    subjects = [read_bids(p).valid() for p in paths]
    sets = [SiteDataset(s[:n_subjects], prof, cache_dir=tmp / "cache") for s in subjects]
    empty = [p.name for p, s in zip(paths, sets, strict=True) if len(s) == 0]
    if empty:
        print(
            f"warning: no usable subjects at {empty} (preprocessing refused them); left out", file=sys.stderr
        )
    if site_val:
        held = SiteDataset([x for s in subjects for x in s[n_subjects:]], prof, cache_dir=tmp / "cache")
    else:
        held_path = simulate_sites(tmp / "held", 1, n_held, prof, seed + 1000)[0]  # another draw, unseen
        held = SiteDataset(read_bids(held_path).valid(), prof, cache_dir=tmp / "cache" / "held")
    if len(held) == 0:
        raise RuntimeError("no usable held-out subject")
    # which training site each held-out volume belongs to (site splits only; the loader keeps this order)
    held_sites = (
        [p.name for p, s in zip(paths, subjects, strict=True) for _ in s[n_subjects:]] if site_val else None
    )
    return [s for s in sets if len(s)], held, held_sites


def _fed_train(
    kind: str,
    prof,
    site_data: list,
    setting: dict[str, Any],
    rounds: int,
    steps: int,
    seed: int,
    global_state: dict[str, torch.Tensor],
    trainable: list[str] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """FedAvg / DP-SGD / DP-FedAvg for one model kind (:func:`fl_app.fl.inprocess.federate`); returns
    (final global state, accounting).

    ``trainable``: ``profile.finetune`` items (None / ``["all"]``: the whole model); only those tensors are
    optimised, sent and averaged, the others stay as in ``global_state``. ``setting["lr"]``: learning rate
    (None: the profile's)."""
    from opacus import PrivacyEngine

    from fl_app.fl.inprocess import LocalSite, federate
    from fl_app.models.finetune import apply_trainable, exported_names
    from fl_app.models.prior import build_prior
    from fl_app.models.vqvae import build_vqvae
    from fl_app.privacy.accountant import epsilon_from_history, noise_multiplier_for
    from fl_app.privacy.aggregation import FedAvgStrategy
    from fl_app.privacy.dp_fedavg import DPFedAvgStrategy
    from fl_app.train.prior_local import make_prior_loader, make_prior_optimizer
    from fl_app.train.vqvae_local import make_optimizer, make_vqvae_loader

    bs = prof.train.batch_size
    if setting["kind"] == "dp_fedavg":
        strategy = DPFedAvgStrategy(
            setting["server_noise"], clip=setting["clip0"], target_quantile=0.5, seed=seed
        )
    else:
        strategy = FedAvgStrategy("uniform" if setting["kind"] == "dp_sgd" else "samples")
    items = list(trainable or ["all"])
    lr = setting.get("lr")
    clients = []
    exported: list[str] | None = None
    for i, ds in enumerate(site_data):
        if kind == "vqvae":
            model = build_vqvae(prof, dp=True)
            exported = exported_names(model, items, kind)
            apply_trainable(model, items, kind)
            opt = make_optimizer(model, prof, lr=lr)
            loader = make_vqvae_loader(ds, bs, shuffle=True, seed=seed + i)
        else:
            model = build_prior(prof)
            exported = exported_names(model, items, kind)
            apply_trainable(model, items, kind)
            opt = make_prior_optimizer(model, lr or prof.train.lr)
            loader = make_prior_loader(ds, bs, shuffle=True, seed=seed + i)
        n_trainable = sum(int(p.numel()) for p in model.parameters() if p.requires_grad)
        sigma = None
        if setting["kind"] == "dp_sgd":
            q = 1.0 / len(loader)
            sigma = noise_multiplier_for(setting["epsilon"], DELTA, q, rounds * steps)
            model, opt, loader = PrivacyEngine().make_private(
                module=model, optimizer=opt, data_loader=loader, noise_multiplier=sigma,
                max_grad_norm=setting["clip"], poisson_sampling=True,
            )  # fmt: skip
        clients.append({"model": model, "opt": opt, "loader": loader, "sigma": sigma, "q": 1.0 / len(loader)})
    sites = [
        LocalSite(f"site-{i}", c["model"], c["opt"], c["loader"], seed=seed) for i, c in enumerate(clients)
    ]
    fed = federate(kind, prof, sites, global_state, rounds=rounds, steps=steps, strategy=strategy,
                   exported=exported)  # fmt: skip
    state, steps_taken = fed.state, fed.steps_per_site
    acct: dict[str, Any] = {"steps_per_site": steps_taken, "trainable": items,
                            "trainable_parameters": n_trainable}  # fmt: skip
    if setting["kind"] == "dp_sgd":
        c0 = clients[0]  # every site has the same q (same subject count) and so the same σ
        hist = [(c["sigma"], c["q"], n) for c, n in zip(clients, steps_taken, strict=True)]
        acct |= {"site_epsilon": max(epsilon_from_history([h], DELTA) for h in hist),
                 "history": hist[0], "noise_multiplier": c0["sigma"], "sample_rate": c0["q"],
                 "expected_batch": c0["q"] * len(site_data[0]), "clip": setting["clip"]}  # fmt: skip
    elif setting["kind"] == "dp_fedavg":
        d = strategy.describe()
        acct = {"server_site_level_epsilon": d["epsilon"], "noise_multiplier": d["noise_multiplier"],
                "final_clip": d.get("next_clip")}  # fmt: skip
    return state, acct


def _fedavg_sites(
    args: argparse.Namespace, prof, vq_init: dict[str, torch.Tensor], held_loader, tmp: Path
) -> list[dict[str, Any]]:
    """Site-level DP-FedAvg with many in-process sites: held-out PSNR with and without the server's noise.

    For every total N in ``--fedavg-sites`` and every m ≤ N in ``--fedavg-per-round``: ``--fedavg-rounds``
    rounds, each sampling m sites (the same ones with and without noise), each site training the
    ``--fedavg-arm`` subset from the global model for ``--fedavg-steps`` steps (fresh optimiser each round, as
    a stateless FedAvg client), the server clipping every update to C and adding N(0, (σC)²) to the sum
    (:class:`~fl_app.privacy.dp_fedavg.DPFedAvgStrategy`, fixed C). σ meets site-level ε at δ with q = m / N.
    """
    import numpy as np
    from torch.utils.data import Subset

    from fl_app.data.cohort import read_bids
    from fl_app.data.dataset import SiteDataset
    from fl_app.data.simulate import simulate_sites
    from fl_app.models.finetune import apply_trainable, exported_names
    from fl_app.models.vqvae import build_vqvae
    from fl_app.privacy.accountant import epsilon_from_history, global_norm, noise_multiplier_for
    from fl_app.privacy.aggregation import ClientUpdate
    from fl_app.privacy.dp_fedavg import DPFedAvgStrategy
    from fl_app.train.vqvae_local import evaluate_vqvae, make_optimizer, make_vqvae_loader, train_vqvae_local

    pool_path = simulate_sites(tmp / "pool", 1, args.fedavg_pool, prof, args.seed + 2000)[0]
    pool = SiteDataset(read_bids(pool_path).valid(), prof, cache_dir=tmp / "cache" / "pool")
    rng = np.random.default_rng(args.seed)
    k = min(args.fedavg_subjects, len(pool))
    site_idx = [rng.choice(len(pool), size=k, replace=False).tolist() for _ in range(max(args.fedavg_sites))]
    items = ARMS[args.fedavg_arm][0]
    model = build_vqvae(prof, dp=True)
    keys = exported_names(model, items, "vqvae") or list(vq_init)
    apply_trainable(model, items, "vqvae")
    n_params = sum(int(p.numel()) for p in model.parameters() if p.requires_grad)

    def local_update(state: dict[str, torch.Tensor], i: int, rnd: int) -> dict[str, Any]:
        model.load_state_dict(state)
        opt = make_optimizer(model, prof, lr=args.lr)
        loader = make_vqvae_loader(Subset(pool, site_idx[i]), prof.train.batch_size, shuffle=True,
                                   seed=args.seed + 7919 * rnd + i)  # fmt: skip
        train_vqvae_local(
            model, loader, prof, optimizer=opt, max_steps=args.fedavg_steps, seed=args.seed + rnd
        )
        new = model.state_dict()
        return {key: (new[key].detach().cpu() - state[key]).numpy() for key in keys}

    def run_fed(n_sites: int, m: int, sigma: float, clip: float) -> float:
        strategy = DPFedAvgStrategy(sigma, clip=clip, delta=DELTA, seed=args.seed + 1)
        state = {key: v.clone() for key, v in vq_init.items()}
        pick = np.random.default_rng([args.seed, n_sites, m])  # same sites with and without noise
        for rnd in range(args.fedavg_rounds):
            chosen = pick.choice(n_sites, size=m, replace=False)
            ups = [ClientUpdate(f"site-{i}", local_update(state, int(i), rnd), 1) for i in chosen]
            agg = strategy.aggregate(ups, rnd)
            state = {key: (v + torch.as_tensor(np.asarray(agg[key])).to(v.dtype)) if key in agg else v
                     for key, v in state.items()}  # fmt: skip
        model.load_state_dict(state)
        return float(evaluate_vqvae(model, held_loader)["psnr_db"])

    clip = args.fedavg_clip
    if clip is None:  # a non-private pilot: the median norm of round-0 site updates from the checkpoint
        norms = [global_norm(local_update(vq_init, i, 0)) for i in range(min(10, len(site_idx)))]
        clip = float(np.median(norms))
    rows = []
    for n_sites in args.fedavg_sites:
        for m in args.fedavg_per_round:
            if m > n_sites:
                continue
            t0 = time.perf_counter()
            q = m / n_sites
            sigma = noise_multiplier_for(args.fedavg_epsilon, DELTA, q, args.fedavg_rounds)
            noisy = run_fed(n_sites, m, sigma, clip)
            clean = run_fed(n_sites, m, 0.0, clip)
            row = {"sites": n_sites, "per_round": m, "sample_rate": q, "rounds": args.fedavg_rounds,
                   "noise_multiplier": sigma, "clip": clip, "trainable_parameters": n_params,
                   "site_level_epsilon": epsilon_from_history([(sigma, q, args.fedavg_rounds)], DELTA),
                   "epsilon_without_sampling": epsilon_from_history([(sigma, 1.0, args.fedavg_rounds)], DELTA),
                   "noise_to_clip_ratio": sigma * math.sqrt(n_params) / m,
                   "psnr_db": noisy, "no_noise_psnr_db": clean, "cost_db": clean - noisy,
                   "seconds": time.perf_counter() - t0}  # fmt: skip
            rows.append(row)
            print(json.dumps({"dp_fedavg_sites_row": row}), flush=True)
    return rows


def _paired_gain(
    psnr: list[float], initial: list[float], seed: int, sites: list[str] | None = None, n_boot: int = 2000
) -> dict[str, Any]:
    """A setting's held-out PSNR gain over the starting checkpoint, paired by held-out volume: the 95 %
    percentile-bootstrap interval of the mean gain (volumes resampled with replacement; the paired summary
    ``bench/prior_conditioning.py`` uses), the fraction of volumes the setting reconstructs better and,
    given each volume's site, the mean gain per site. "Above the checkpoint" is only claimed when the
    interval excludes 0."""
    import numpy as np
    from prior_conditioning import paired_summary

    gain = np.asarray(psnr, dtype=np.float64) - np.asarray(initial, dtype=np.float64)
    summary = paired_summary(gain, n_boot=n_boot, seed=seed)
    out = {"psnr_gain_over_initial_ci95": summary["ci95_bootstrap"],
           "psnr_gain_volumes_improved": float((gain > 0).mean()), "psnr_gain_per_site": None}  # fmt: skip
    if sites is not None and len(sites) == gain.size:
        out["psnr_gain_per_site"] = {
            name: float(gain[[i for i, s in enumerate(sites) if s == name]].mean())
            for name in dict.fromkeys(sites)
        }
    return out


def _prior_codes(vq, train_sets: list, held, prof, prior_init: dict[str, torch.Tensor]):
    """The common ground of every prior setting: (training sites' codes, held-out code loader, held-out bits per
    code of the starting prior) under the VQ-VAE ``vq``."""
    from fl_app.models.prior import build_prior
    from fl_app.train.prior_local import encode_codes, evaluate_prior, make_prior_loader

    vq.eval()
    codes = [encode_codes(vq, ds) for ds in train_sets]
    held_codes = make_prior_loader(encode_codes(vq, held), 2, shuffle=False)
    init_prior = build_prior(prof)
    init_prior.load_state_dict(prior_init)
    return codes, held_codes, evaluate_prior(init_prior, held_codes)["bits_per_code"]


def run(args: argparse.Namespace) -> dict[str, Any]:
    from fl_app.config import apply_overrides, load_profile
    from fl_app.models.pretrained import checkpoint_profile_dict, resolve_init
    from fl_app.models.prior import build_prior, load_prior
    from fl_app.models.vqvae import build_vqvae, load_vqvae
    from fl_app.privacy.accountant import epsilon_from_history
    from fl_app.train.prior_local import evaluate_prior
    from fl_app.train.vqvae_local import evaluate_vqvae

    overrides: dict[str, Any] | None = None
    if args.tiny:
        overrides = {
            # 5 mm: every simulated site's voxels (up to 1.05 × the spacing) stay within the 6 mm limit
            "data": {"shape": [32, 32, 32], "spacing": [5.0, 5.0, 5.0]},
            "vqvae": {
                "channels": [8, 16],
                "num_res_channels": [8, 16],
                "num_embeddings": 32,
                "embedding_dim": 8,
            },
            "prior": {"d_model": 32, "n_layers": 1, "n_heads": 2},
            "train": {"batch_size": 2, "lr": 0.003},
        }
    if args.batch_size is not None:
        overrides = overrides or {}
        overrides.setdefault("train", {})["batch_size"] = args.batch_size
    vq_path = resolve_init(args.init, "vqvae", args.profile)
    prior_path = None
    if vq_path is not None:  # the checkpoint's profile (it travels with the weights); --tiny does not apply
        if args.tiny:
            raise SystemExit("--tiny and --init: the checkpoint fixes the architecture; drop --tiny")
        try:
            prior_path = resolve_init(args.init, "prior", args.profile)
        except FileNotFoundError:
            prior_path = None  # a VQ-VAE-only checkpoint: the prior starts from scratch
        # the prior's stored profile is the whole one (the VQ-VAE's sections and the prior's own)
        ck_path = prior_path or vq_path
        prof = apply_overrides(checkpoint_profile_dict(ck_path), overrides, source=str(ck_path))
    else:
        prof = load_profile(args.profile, overrides)
    torch.set_num_threads(args.threads)
    unknown_arms = set(args.arms) - set(ARMS)
    if unknown_arms:
        raise SystemExit(f"unknown arms {sorted(unknown_arms)}; known: {sorted(ARMS)}")
    settings = [{"name": "no_dp", "kind": "none", "arm": "full", "lr": args.lr}]
    for arm in args.arms:
        sfx = "" if arm == "full" else f"_{arm}"
        if arm != "full":
            settings.append({"name": f"no_dp{sfx}", "kind": "none", "arm": arm, "lr": args.lr})
        settings += [
            {"name": f"dp_sgd_eps{e:g}{sfx}", "kind": "dp_sgd", "epsilon": e, "clip": args.clip, "arm": arm,
             "lr": args.dp_lr or args.lr}
            for e in args.epsilons
        ]  # fmt: skip
    settings.append(
        {"name": "dp_fedavg", "kind": "dp_fedavg", "server_noise": args.server_noise, "clip0": 0.5,
         "arm": "full", "lr": args.lr}
    )  # fmt: skip
    if args.settings:
        unknown = set(args.settings) - {s["name"] for s in settings}
        if unknown:
            raise SystemExit(f"unknown settings {sorted(unknown)}; known: {[s['name'] for s in settings]}")
        keep = set(args.settings) | ({"no_dp"} if args.baseline else set())
        settings = [s for s in settings if s["name"] in keep]
    out: dict[str, Any] = {"profile": args.profile, "tiny": args.tiny, "sites": args.sites,
                           "subjects_per_site": args.subjects, "rounds": args.rounds, "steps": args.steps,
                           "prior_rounds": args.prior_rounds, "prior_steps": args.prior_steps, "delta": DELTA,
                           "batch_size": prof.train.batch_size, "clip": args.clip, "threads": args.threads,
                           "shape": list(prof.data.shape), "spacing": list(prof.data.spacing),
                           "brain_mask": prof.data.brain_mask, "init": str(vq_path or "scratch"),
                           "prior_init": str(prior_path or "scratch"), "arms": args.arms,
                           "lr": args.lr, "dp_lr": args.dp_lr, "no_prior": args.no_prior,
                           "platform": platform.platform(), "torch": torch.__version__, "results": {}}  # fmt: skip
    t_all = time.perf_counter()
    with contextlib.ExitStack() as stack:
        tmp = Path(args.workdir) if args.workdir else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        train_sets, held, held_sites = _datasets(
            tmp,
            prof,
            args.sites,
            args.subjects,
            args.seed,
            args.held_subjects,
            args.site_val,
            args.first_site,
        )
        out["first_site"] = args.first_site
        out["held_out"] = f"site_splits ({args.site_val} per site)" if args.site_val else "unseen_site"
        out["usable_subjects_per_site"] = [len(s) for s in train_sets]
        out["held_out_subjects"] = len(held)
        from torch.utils.data import DataLoader

        from fl_app.train.vqvae_local import vqvae_collate

        held_loader = DataLoader(held, batch_size=2, shuffle=False, collate_fn=vqvae_collate)
        torch.manual_seed(args.seed)
        vq_init = build_vqvae(prof, dp=True).state_dict()
        if vq_path is not None:
            vq_init = load_vqvae(vq_path)[0].state_dict()
        torch.manual_seed(args.seed)
        prior_init = build_prior(prof).state_dict()
        if prior_path is not None:
            prior_init = load_prior(prior_path)[0].state_dict()
        init_vq = build_vqvae(prof, dp=True)
        init_vq.load_state_dict(vq_init)
        init_eval = evaluate_vqvae(init_vq, held_loader, per_volume=True)
        out["initial"] = {"vqvae_psnr_db": init_eval["psnr_db"]}
        out["setup_seconds"] = time.perf_counter() - t_all
        print(json.dumps({"initial": out["initial"]}), flush=True)
        codes = held_codes = None
        prior_codes = args.prior_codes or ("no_dp" if vq_path is None else "init")
        out["prior_codes"] = prior_codes
        if not args.no_prior and prior_codes == "init":
            codes, held_codes, out["initial"]["prior_bits_per_code"] = _prior_codes(
                init_vq, train_sets, held, prof, prior_init
            )
        if args.fedavg_sites:
            out["dp_fedavg_sites"] = _fedavg_sites(args, prof, vq_init, held_loader, tmp)
            print(json.dumps({"dp_fedavg_sites": out["dp_fedavg_sites"]}), flush=True)
        for s in settings:
            t0 = time.perf_counter()
            vq_items, prior_items = ARMS[s["arm"]]
            vq_state, acct_vq = _fed_train(
                "vqvae", prof, train_sets, s, args.rounds, args.steps, args.seed, vq_init, vq_items
            )
            vq = build_vqvae(prof, dp=True)
            vq.load_state_dict(vq_state)
            ev = evaluate_vqvae(vq, held_loader, per_volume=True)
            psnr = ev["psnr_db"]
            paired = _paired_gain(
                ev["psnr_db_per_volume"],
                init_eval["psnr_db_per_volume"],
                args.seed,
                held_sites,
            )
            if args.no_prior:
                out["results"][s["name"]] = {"vqvae_psnr_db": psnr, "prior_bits_per_code": None, **paired,
                                             "vqvae_privacy": acct_vq, "prior_privacy": None,
                                             "seconds": time.perf_counter() - t0}  # fmt: skip
                print(json.dumps({s["name"]: out["results"][s["name"]]}), flush=True)
                continue
            if codes is None:  # the no-DP VQ-VAE's codes: the common ground for every prior setting
                codes, held_codes, out["initial"]["prior_bits_per_code"] = _prior_codes(
                    vq, train_sets, held, prof, prior_init
                )
            pr_state, acct_pr = _fed_train("prior", prof, codes, s, args.prior_rounds, args.prior_steps, args.seed,
                                           prior_init, prior_items)  # fmt: skip
            prior = build_prior(prof)
            prior.load_state_dict(pr_state)
            bits = evaluate_prior(prior, held_codes)["bits_per_code"]
            if s["kind"] == "dp_sgd":  # one site ledger composes both jobs
                acct_pr["site_epsilon_total"] = epsilon_from_history(
                    [acct_vq["history"], acct_pr["history"]], DELTA
                )
            out["results"][s["name"]] = {"vqvae_psnr_db": psnr, "prior_bits_per_code": bits, **paired,
                                         "vqvae_privacy": acct_vq, "prior_privacy": acct_pr,
                                         "seconds": time.perf_counter() - t0}  # fmt: skip
            print(json.dumps({s["name"]: out["results"][s["name"]]}), flush=True)
    base = out["results"].get("no_dp")  # absent with --settings ... --no-baseline
    for r in out["results"].values():
        r["psnr_drop_db"] = base["vqvae_psnr_db"] - r["vqvae_psnr_db"] if base else None
        r["psnr_gain_over_initial_db"] = r["vqvae_psnr_db"] - out["initial"]["vqvae_psnr_db"]
        if not args.no_prior:
            r["bits_increase"] = r["prior_bits_per_code"] - base["prior_bits_per_code"] if base else None
    out["total_seconds"] = time.perf_counter() - t_all
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="cpu-demo")
    p.add_argument("--tiny", action="store_true", help="32³ at 5 mm, tiny networks")
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--subjects", type=int, default=8, help="subjects per site")
    p.add_argument("--held-subjects", type=int, default=8, help="subjects of the held-out site")
    p.add_argument(
        "--first-site",
        type=int,
        default=0,
        help="index of the first simulated training site (0-based): the simulator cycles 4 scanner presets by "
        "index, and the shipped checkpoint was pre-trained on presets 0-2 only, so --first-site 3 gives sites "
        "its public data did not have",
    )
    p.add_argument(
        "--site-val",
        type=int,
        default=0,
        help="evaluate on this many held-out subjects of each training site (its validation split) instead of "
        "an unseen site",
    )
    p.add_argument("--batch-size", type=int, default=None, help="override train.batch_size (every setting)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (set OMP_NUM_THREADS to match)")
    p.add_argument("--settings", nargs="+", default=None,
                   help="run only these settings (and no_dp, the baseline, unless --no-baseline)")  # fmt: skip
    p.add_argument("--no-baseline", dest="baseline", action="store_false",
                   help="with --settings: skip no_dp (psnr_drop_db / bits_increase are then null)")  # fmt: skip
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--steps", type=int, default=20, help="local steps per round (VQ-VAE)")
    p.add_argument("--prior-rounds", type=int, default=10)
    p.add_argument("--prior-steps", type=int, default=20)
    p.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 4.0, 8.0])
    p.add_argument("--clip", type=float, default=1.0, help="DP-SGD per-sample clip bound")
    p.add_argument("--server-noise", type=float, default=1.0, help="DP-FedAvg noise multiplier")
    p.add_argument(
        "--init",
        default="scratch",
        metavar="pretrained|PATH|scratch",
        help="start every setting from this checkpoint (its profile replaces --profile)",
    )
    p.add_argument("--arms", nargs="+", default=["full"], help=f"fine-tuning arms ({', '.join(ARMS)})")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: the profile's)")
    p.add_argument(
        "--dp-lr", type=float, default=None, help="learning rate of the DP-SGD settings (default --lr)"
    )
    p.add_argument("--no-prior", action="store_true", help="VQ-VAE only (prior keys are null)")
    p.add_argument(
        "--prior-codes",
        choices=["init", "no_dp"],
        default=None,
        help="codes every prior setting trains on: the starting (frozen checkpoint) VQ-VAE's or the no-DP "
        "fine-tuned one's (default: init with --init, no_dp from scratch)",
    )
    p.add_argument(
        "--fedavg-sites", type=int, nargs="*", default=[], help="site-level DP-FedAvg: total sites N"
    )
    p.add_argument(
        "--fedavg-per-round",
        type=int,
        nargs="+",
        default=[10, 20, 50, 100],
        help="sites sampled per round m (each ≤ N)",
    )
    p.add_argument("--fedavg-subjects", type=int, default=20, help="subjects per simulated site")
    p.add_argument("--fedavg-pool", type=int, default=100, help="simulated subjects the sites are drawn from")
    p.add_argument("--fedavg-rounds", type=int, default=10)
    p.add_argument("--fedavg-steps", type=int, default=5, help="local steps per site and round")
    p.add_argument("--fedavg-epsilon", type=float, default=8.0, help="site-level ε target")
    p.add_argument("--fedavg-clip", type=float, default=None, help="fixed clip C (default: pilot median)")
    p.add_argument("--fedavg-arm", default="full", help="fine-tuning arm of the DP-FedAvg measurement")
    p.add_argument(
        "--workdir",
        default=None,
        help="keep the simulated sites and the preprocessing cache here and reuse them on the next run with "
        "the same data options (default: a temporary folder)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    res = run(args)
    print(json.dumps(res, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

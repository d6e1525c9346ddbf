"""Utility cost of differential privacy: held-out VQ-VAE PSNR and prior bits per code, same compute budget.

    python bench/dp_utility.py --json OUT.json [--profile cpu-demo] [--sites 3] [--subjects 8]
                               [--rounds 10] [--steps 20] [--prior-rounds 10] [--prior-steps 20] [--tiny]
                               [--batch-size B] [--threads 1] [--settings no_dp dp_sgd_eps8 ...]

Simulates ``--sites`` training sites plus one held-out site (``fl_app.data.simulate``), then runs federated
averaging in-process (no NVFlare: the same local training functions the clients use, the same
aggregation strategies the server uses) for ``--rounds`` rounds × ``--steps`` local steps per site in each
setting:

* ``no_dp``: sample-weighted FedAvg, DP-compatible VQ-VAE (so only DP differs between settings);
* ``dp_sgd_eps{1,4,8}``: Opacus DP-SGD at each site (Poisson sampling, per-sample clip
  ``--clip``, σ derived from the target ε at δ = 1e-5 for rounds × steps), uniform FedAvg;
* ``dp_fedavg``: server-side DP-FedAvg (σ ``--server-noise``, adaptive clip at the median), no local DP.

VQ-VAE: PSNR on the held-out site. Prior: trained the same way on the codes of the *no-DP* VQ-VAE (so
bits per code are comparable across settings and measure the prior's own DP cost), evaluated on the
held-out site's codes. Prints / writes JSON with each setting's metrics, ε and wall time, plus the
untrained models' held-out PSNR / bits per code (``initial``), so "no DP learned something" can be checked.
DP-SGD's ε is per job (VQ-VAE, prior) and for both jobs composed on one site ledger (``site_epsilon_total``).
Target: ε = 8 within 1 dB PSNR of no DP on cpu-demo. ``--tiny``: 32³ at 5 mm (as ``synthbrain demo --tiny``),
tiny networks. The figures are step-matched, so a busy machine changes the seconds, not the utility.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

DELTA = 1e-5


def _datasets(tmp: Path, prof, n_sites: int, n_subjects: int, seed: int, n_held: int):
    """Simulated training sites (the usable ones) and one held-out site drawn from another seed."""
    from fl_app.data.cohort import read_bids
    from fl_app.data.dataset import SiteDataset
    from fl_app.data.simulate import simulate_sites

    paths = simulate_sites(tmp / "data", n_sites, n_subjects, prof, seed)
    sets = [SiteDataset(read_bids(p).valid(), prof, cache_dir=tmp / "cache" / p.name) for p in paths]
    empty = [p.name for p, s in zip(paths, sets, strict=True) if len(s) == 0]
    if empty:
        print(
            f"warning: no usable subjects at {empty} (preprocessing refused them); left out", file=sys.stderr
        )
    held_path = simulate_sites(tmp / "held", 1, n_held, prof, seed + 1000)[0]  # another draw, unseen
    held = SiteDataset(read_bids(held_path).valid(), prof, cache_dir=tmp / "cache" / "held")
    if len(held) == 0:
        raise RuntimeError("the held-out site has no usable subjects")
    return [s for s in sets if len(s)], held


def _fed_train(
    kind: str,
    prof,
    site_data: list,
    setting: dict[str, Any],
    rounds: int,
    steps: int,
    seed: int,
    global_state: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """FedAvg / DP-SGD / DP-FedAvg for one model kind (:func:`fl_app.fl.inprocess.federate`); returns
    (final global state, accounting)."""
    from opacus import PrivacyEngine

    from fl_app.fl.inprocess import LocalSite, federate
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
    clients = []
    for i, ds in enumerate(site_data):
        if kind == "vqvae":
            model = build_vqvae(prof, dp=True)
            opt = make_optimizer(model, prof)
            loader = make_vqvae_loader(ds, bs, shuffle=True, seed=seed + i)
        else:
            model = build_prior(prof)
            opt = make_prior_optimizer(model, prof.train.lr)
            loader = make_prior_loader(ds, bs, shuffle=True, seed=seed + i)
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
    fed = federate(kind, prof, sites, global_state, rounds=rounds, steps=steps, strategy=strategy)
    state, steps_taken = fed.state, fed.steps_per_site
    acct: dict[str, Any] = {"steps_per_site": steps_taken}
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


def run(args: argparse.Namespace) -> dict[str, Any]:
    from fl_app.config import load_profile
    from fl_app.models.prior import build_prior
    from fl_app.models.vqvae import build_vqvae
    from fl_app.privacy.accountant import epsilon_from_history
    from fl_app.train.prior_local import encode_codes, evaluate_prior, make_prior_loader
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
    prof = load_profile(args.profile, overrides)
    torch.set_num_threads(args.threads)
    settings = [{"name": "no_dp", "kind": "none"}]
    settings += [
        {"name": f"dp_sgd_eps{e:g}", "kind": "dp_sgd", "epsilon": e, "clip": args.clip} for e in args.epsilons
    ]
    settings.append(
        {"name": "dp_fedavg", "kind": "dp_fedavg", "server_noise": args.server_noise, "clip0": 0.5}
    )
    if args.settings:
        unknown = set(args.settings) - {s["name"] for s in settings}
        if unknown:
            raise SystemExit(f"unknown settings {sorted(unknown)}; known: {[s['name'] for s in settings]}")
        settings = [s for s in settings if s["name"] in args.settings or s["name"] == "no_dp"]
    out: dict[str, Any] = {"profile": args.profile, "tiny": args.tiny, "sites": args.sites,
                           "subjects_per_site": args.subjects, "rounds": args.rounds, "steps": args.steps,
                           "prior_rounds": args.prior_rounds, "prior_steps": args.prior_steps, "delta": DELTA,
                           "batch_size": prof.train.batch_size, "clip": args.clip, "threads": args.threads,
                           "shape": list(prof.data.shape), "spacing": list(prof.data.spacing),
                           "brain_mask": prof.data.brain_mask,
                           "platform": platform.platform(), "torch": torch.__version__, "results": {}}  # fmt: skip
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        train_sets, held = _datasets(tmp, prof, args.sites, args.subjects, args.seed, args.held_subjects)
        out["usable_subjects_per_site"] = [len(s) for s in train_sets]
        out["held_out_subjects"] = len(held)
        from torch.utils.data import DataLoader

        from fl_app.train.vqvae_local import vqvae_collate

        held_loader = DataLoader(held, batch_size=2, shuffle=False, collate_fn=vqvae_collate)
        torch.manual_seed(args.seed)
        vq_init = build_vqvae(prof, dp=True).state_dict()
        torch.manual_seed(args.seed)
        prior_init = build_prior(prof).state_dict()
        init_vq = build_vqvae(prof, dp=True)
        init_vq.load_state_dict(vq_init)
        out["initial"] = {"vqvae_psnr_db": evaluate_vqvae(init_vq, held_loader)["psnr_db"]}
        out["setup_seconds"] = time.perf_counter() - t_all
        codes = held_codes = None
        for s in settings:
            t0 = time.perf_counter()
            vq_state, acct_vq = _fed_train(
                "vqvae", prof, train_sets, s, args.rounds, args.steps, args.seed, vq_init
            )
            vq = build_vqvae(prof, dp=True)
            vq.load_state_dict(vq_state)
            psnr = evaluate_vqvae(vq, held_loader)["psnr_db"]
            if codes is None:  # the no-DP VQ-VAE's codes: the common ground for every prior setting
                codes = [encode_codes(vq.eval(), ds) for ds in train_sets]
                held_codes = make_prior_loader(encode_codes(vq.eval(), held), 2, shuffle=False)
                init_prior = build_prior(prof)
                init_prior.load_state_dict(prior_init)
                init_bits = evaluate_prior(init_prior, held_codes)["bits_per_code"]
                out["initial"]["prior_bits_per_code"] = init_bits
            pr_state, acct_pr = _fed_train("prior", prof, codes, s, args.prior_rounds, args.prior_steps, args.seed,
                                           prior_init)  # fmt: skip
            prior = build_prior(prof)
            prior.load_state_dict(pr_state)
            bits = evaluate_prior(prior, held_codes)["bits_per_code"]
            if s["kind"] == "dp_sgd":  # one site ledger composes both jobs
                acct_pr["site_epsilon_total"] = epsilon_from_history(
                    [acct_vq["history"], acct_pr["history"]], DELTA
                )
            out["results"][s["name"]] = {"vqvae_psnr_db": psnr, "prior_bits_per_code": bits,
                                         "vqvae_privacy": acct_vq, "prior_privacy": acct_pr,
                                         "seconds": time.perf_counter() - t0}  # fmt: skip
            print(json.dumps({s["name"]: out["results"][s["name"]]}), flush=True)
    base = out["results"]["no_dp"]
    for r in out["results"].values():
        r["psnr_drop_db"] = base["vqvae_psnr_db"] - r["vqvae_psnr_db"]
        r["bits_increase"] = r["prior_bits_per_code"] - base["prior_bits_per_code"]
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
    p.add_argument("--batch-size", type=int, default=None, help="override train.batch_size (every setting)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (set OMP_NUM_THREADS to match)")
    p.add_argument("--settings", nargs="+", default=None,
                   help="run only these settings (no_dp always runs: it is the baseline)")  # fmt: skip
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--steps", type=int, default=20, help="local steps per round (VQ-VAE)")
    p.add_argument("--prior-rounds", type=int, default=10)
    p.add_argument("--prior-steps", type=int, default=20)
    p.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 4.0, 8.0])
    p.add_argument("--clip", type=float, default=1.0, help="DP-SGD per-sample clip bound")
    p.add_argument("--server-noise", type=float, default=1.0, help="DP-FedAvg noise multiplier")
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

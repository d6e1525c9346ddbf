"""``synthbrain demo``: the whole product on one machine in a few minutes.

simulate 3 hospital sites (BIDS) → federated VQ-VAE job (NVFlare simulator) → federated prior job
(each site encodes its own volumes with the global VQ-VAE) → global model directory + model card +
MONAI bundle → sample a small synthetic cohort (NIfTI images + tissue labels + participants.tsv) →
``report.md``. Everything goes under ``--out`` (default ``runs/demo``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from fl_app.run_layout import RunLayout

log = logging.getLogger(__name__)

__all__ = ["DP_FINETUNE", "add_demo_parser", "demo_checkpoint", "run_demo", "sample_cohort"]


def sample_cohort(global_dir: Path, out_dir: Path, n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Sample ``n`` subjects (ages 55–85, alternating sex, CN/MCI/AD in turn) with ``synthbrain sample``'s code.

    Writes the BIDS derivative cohort (T1w + tissue labels, participants.tsv, sidecars) and its QC
    montages and HTML report into ``out_dir``; returns the participant rows.
    """
    from fl_app.data.covariates import DIAGNOSES, SEXES
    from fl_app.generate.cohort_folder import CohortRow
    from fl_app.generate.qc import write_qc
    from fl_app.generate.sample_cohort import sample_cohort as write_cohort
    from fl_app.global_model import load_global_model

    gm = load_global_model(global_dir, device="cpu")
    ages = [55.0 + 30.0 * i / (n - 1) for i in range(n)] if n > 1 else [70.0]
    rows = [
        CohortRow(f"sub-synth{i + 1:04d}", round(ages[i], 1), SEXES[i % 2], DIAGNOSES[i % 3])
        for i in range(n)
    ]
    write_cohort(gm, rows, out_dir, seed=seed, progress=False, device="cpu")
    write_qc(out_dir)
    return [
        {"participant_id": r.participant_id, "age": r.age, "sex": r.sex, "diagnosis": r.diagnosis}
        for r in rows
    ]


def _fmt(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, float) and math.isfinite(v) else str(v)


def final_vqvae_on_sites(vqvae_path: Path, cfg_dir: Path, clients: list[str]) -> dict[str, dict[str, float]]:
    """Demo only (the simulated sites' data is on this machine): the *final* global VQ-VAE -- the one the
    round tables never show, as each round reports the model it received -- on every site's own
    validation split (the split its client holds out). A real consortium gets this from a validation
    round at the sites. Returns ``{site: {"psnr_db", "dice_mean", "n_volumes"}}``."""
    from fl_app.config import load_site_config
    from fl_app.data.dataset import make_loaders
    from fl_app.fl.client import open_site_dataset
    from fl_app.models.vqvae import load_vqvae
    from fl_app.train.vqvae_local import evaluate_vqvae

    model, prof = load_vqvae(vqvae_path)
    res: dict[str, dict[str, float]] = {}
    for c in clients:
        ds = open_site_dataset(load_site_config(cfg_dir / f"{c}.yaml"), prof)
        _, val = make_loaders(ds, prof.train.batch_size, prof.train.val_fraction, 0)
        m = evaluate_vqvae(model, val)
        res[c] = {
            "psnr_db": float(m["psnr_db"]),
            "dice_mean": float(m["dice_mean"]),
            "n_volumes": m["n_volumes"],
        }
    return res


def _report(
    out: Path,
    card: dict[str, Any],
    rows: list[dict[str, Any]],
    timings: dict[str, float],
    final_vqvae: dict[str, dict[str, float]] | None = None,
    privacy: dict[str, Any] | None = None,
    start: dict[str, Any] | None = None,
) -> Path:
    lines = ["# synthbrain demo report", ""]
    lines.append(
        f"Sites: {len(card['sites'])}, subjects: {card['num_subjects']} (images never left their site)."
    )
    lines.append("")
    if start:
        lines += [f"Started from: {start['init']}; trained parameters: VQ-VAE {start['trainable']['vqvae']}, "
                  f"prior {start['trainable']['prior']} (the others stay the checkpoint's)"
                  + (f", learning rate {start['trainable']['lr']:g}." if start["trainable"].get("lr") else "."),
                  ""]  # fmt: skip
    if privacy:
        lines += _privacy_lines(privacy, final_vqvae or {}, (start or {}).get("checkpoint_vqvae") or {})
    lines.append("| site | subjects (train / val) |")
    lines.append("| --- | --- |")
    for s, c in card["sites"].items():
        lines.append(f"| {s} | {c['subjects']} ({c['train_subjects']} / {c['val_subjects']}) |")
    for kind, keys in (
        ("vqvae", ("train_loss", "global_val_psnr_db", "local_val_psnr_db", "global_val_dice")),
        ("prior", ("train_loss", "global_val_bits_per_code", "local_val_bits_per_code")),
    ):
        job = card["jobs"].get(kind)
        if not job:
            continue
        lines += [
            "",
            f"## {kind} job: {job['rounds']} rounds, aggregation {job['aggregation'].get('name')}",
            "",
        ]
        lines.append("| round | " + " | ".join(keys) + " |")
        lines.append("| --- " * (len(keys) + 1) + "|")
        for m in job["metrics_by_round"]:
            lines.append(f"| {m['round']} | " + " | ".join(_fmt(m.get(k)) for k in keys) + " |")
    lines += ["", "`global_val_*`: the global model received at the start of the round, on each site's own",
              "validation split (sample-weighted mean); `local_val_*`: after that round's local training.", ""]  # fmt: skip
    if final_vqvae:
        lines += ["Final global VQ-VAE (after the last round) on each site's validation split (demo only: a real",
                  "consortium runs a validation round at the sites):", "",
                  "| site | PSNR (dB) | Dice (mean) |", "| --- | --- | --- |"]  # fmt: skip
        lines += [f"| {s} | {_fmt(m['psnr_db'])} | {_fmt(m['dice_mean'])} |" for s, m in final_vqvae.items()]
        lines.append("")
    lines += [
        "## Synthetic cohort",
        "",
        "| participant | age | sex | diagnosis |",
        "| --- | --- | --- | --- |",
    ]
    lines += [f"| {r['participant_id']} | {r['age']} | {r['sex']} | {r['diagnosis']} |" for r in rows]
    lines += ["", "## Timings (s)", ""] + [f"- {k}: {v:.1f}" for k, v in timings.items()]
    lines += [
        "",
        "Global model: `global/` (model_card.json, MONAI bundle in `global/bundle/`); cohort: `cohort/`.",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _privacy_lines(
    prep: dict[str, Any], final: dict[str, dict[str, float]], reference: dict[str, dict[str, float]]
) -> list[str]:
    """The report's privacy table: each site's ε (both jobs composed) beside the DP model's utility on its
    validation split and the non-DP figure (the public checkpoint the DP fine-tune started from)."""
    lines = ["## Differential privacy", ""]
    head = "| site | ε (both jobs) | δ | VQ-VAE PSNR, DP (dB) | Dice, DP |"
    ref = bool(reference)
    if ref:
        head += " PSNR without DP: public checkpoint (dB) | Dice, checkpoint |"
    lines += [head, "| --- " * (head.count("|") - 1) + "|"]
    for site, s in prep.get("sites", {}).items():
        m, r = final.get(site, {}), reference.get(site, {})
        row = (f"| {site} | {_fmt(s.get('total_epsilon'))} | {s.get('delta')} | {_fmt(m.get('psnr_db'))} | "
               f"{_fmt(m.get('dice_mean'))} |")  # fmt: skip
        if ref:
            row += f" {_fmt(r.get('psnr_db'))} | {_fmt(r.get('dice_mean'))} |"
        lines.append(row)
    servers = {k: v for k, v in prep.get("server", {}).items() if v.get("mechanism") == "dp-fedavg"}
    lines.append("")
    if servers:
        lines.append("Server-side DP-FedAvg (site-level ε): " + ", ".join(
            f"{job} ε = {_fmt(v.get('epsilon'))}" for job, v in servers.items()) + ".")  # fmt: skip
    else:
        lines.append("No server-side noise (record-level DP-SGD at every site only; with a handful of sites "
                     "server noise costs more than 1 dB, see docs/PRIVACY.md).")  # fmt: skip
    return [*lines, ""]


DP_FINETUNE = {"vqvae": ["decoder_out"], "prior": ["prior_last", "cond_embeddings"], "lr": 1e-4}
"""What ``demo --dp`` fine-tunes from a public checkpoint, and at which learning rate (``profile.finetune``;
docs/PRIVACY.md): the decoder's output layer (7,685 weights) and the prior's last block and condition
embeddings. Measured on a site of a scanner preset the checkpoint did not see (200 records, ε = 8,
docs/BENCHMARKS.md "DP fine-tuning from a public checkpoint", A8): with :data:`DP_CLIP`, 1e-4 gains
0.04 dB over the checkpoint where 3e-4 gains 0.02 and 1e-3 loses 0.23 (Adam makes every noisy step about
lr long on every trainable weight)."""

DP_CLIP = 0.3
"""The DP sites' per-sample clip bound (``privacy.max_grad_norm``) in ``demo --dp`` from a checkpoint: the
90th percentile of the per-sample gradient norms of ``decoder_out`` on the checkpoint's public pre-training
data (median 0.25; the prior's ``prior_last`` 0.21; ``bench/dp_clip.py``, never measured on a site's
records). The noise is σ·C whatever C is, so the default C = 1, four times the median norm, added noise that
kept no signal: no gain over the checkpoint at ε = 8, where 0.3 gains 0.04 dB."""


def _dp_site_privacy(epsilon_budget: float, from_checkpoint: bool) -> dict[str, Any]:
    """A demo site's ``privacy`` section under ``--dp``: DP-SGD within ``epsilon_budget``; fine-tuning a
    checkpoint clips at :data:`DP_CLIP` (from scratch the gradients are larger: the default C = 1)."""
    return {"enabled": True, "epsilon_budget": epsilon_budget} | (
        {"max_grad_norm": DP_CLIP} if from_checkpoint else {}
    )


def demo_checkpoint(init: str, profile: str, overrides: dict[str, Any] | None) -> Path | None:
    """The VQ-VAE file the demo starts from: ``auto`` = the package's checkpoint for ``profile`` when it ships
    and no architecture overrides are given (``--tiny``), else none; ``pretrained`` / a path: that one (an
    error names what is missing); ``scratch``: none."""
    from fl_app.models.pretrained import resolve_init

    if init == "auto":
        if overrides:
            return None
        try:
            return resolve_init("pretrained", "vqvae", profile)
        except FileNotFoundError:
            return None
    return resolve_init(init, "vqvae", profile)


def run_demo(
    out: str | Path = "runs/demo",
    n_sites: int = 3,
    subjects_per_site: int = 6,
    vqvae_rounds: int = 3,
    prior_rounds: int = 2,
    vqvae_steps: int = 30,
    prior_steps: int = 15,
    n_samples: int = 4,
    profile: str = "cpu-demo",
    overrides: dict[str, Any] | None = None,
    seed: int = 0,
    dp: bool = False,
    dp_epsilon: float = 4.0,
    epsilon_budget: float = 10.0,
    server_noise: float = 1.0,
    init: str = "auto",
    server_dp: bool | None = None,
) -> dict[str, Any]:
    """Run the demo end to end; returns a summary dict (also written to ``out/demo.json``).

    ``dp``: both DP mechanisms on -- every site runs DP-SGD (target ``dp_epsilon`` per job, its YAML
    budget ``epsilon_budget`` over both jobs, ledger in its cache) and the server aggregates with
    DP-FedAvg (noise multiplier ``server_noise``, adaptive clipping at the median); the per-site ε are
    printed and written to the model card (docs/PRIVACY.md).

    ``init``: ``auto`` (the package's public checkpoint when it ships for ``profile`` and ``overrides`` is
    empty, else scratch), ``pretrained``, a global-model directory / ``.pt`` file, or ``scratch``. From a
    checkpoint the demo uses its profile, and with ``dp`` fine-tunes only :data:`DP_FINETUNE` under DP-SGD;
    the report shows each site's ε beside the DP model's and the checkpoint's (no DP) utility.
    ``server_dp``: DP-FedAvg on the server too (default: from scratch yes, from a checkpoint no).
    """
    from fl_app.config import load_profile, write_site_yaml
    from fl_app.data.simulate import simulate_sites
    from fl_app.fl.run import run_job
    from fl_app.global_model import write_global_model

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    ck = demo_checkpoint(init, profile, overrides)
    # a global-model directory with a prior: both jobs start from it, with its whole profile (the prior's)
    ck_dir = ck.parent if ck is not None and (ck.parent / "prior.pt").is_file() else None
    start: dict[str, Any] | None = None
    if ck is not None:
        from fl_app.config import apply_overrides
        from fl_app.models.pretrained import checkpoint_profile_dict

        prof = apply_overrides(
            checkpoint_profile_dict(ck_dir or ck), {"finetune": DP_FINETUNE} if dp else None, str(ck)
        )
        start = {"init": str(ck.parent), "trainable": prof.finetune.model_dump()}
        print(f"      starting from the public checkpoint {ck.parent}", flush=True)
    else:
        prof = load_profile(profile, overrides)
    server_dp = (ck is None) if server_dp is None else server_dp
    timings: dict[str, float] = {}
    t = time.perf_counter()
    print(f"[1/5] simulating {n_sites} sites × {subjects_per_site} subjects ...", flush=True)
    sites = simulate_sites(out / "data", n_sites, subjects_per_site, prof, seed)
    cfg_dir = out / "site_configs"
    # All simulated sites share this machine's cores: give each one its share instead of letting every
    # site's torch use all of them (oversubscription made each round several times slower).
    threads = max(1, (os.cpu_count() or 1) // n_sites)
    for p in sites:
        write_site_yaml(
            cfg_dir / f"{p.name}.yaml",
            {"name": p.name, "bids_dir": str(p), "profile": profile, "cache_dir": str(out / "cache" / p.name),
             "min_subjects": 2, "compute": {"device": "cpu", "num_threads": threads},
             **({"privacy": _dp_site_privacy(epsilon_budget, ck is not None)} if dp else {})},
        )  # fmt: skip
    timings["simulate"] = time.perf_counter() - t
    clients = [p.name for p in sites]
    common = dict(profile=prof.model_dump(mode="json"), clients=clients, site_config_dir=cfg_dir, seed=seed)
    if dp:
        common.update(dp_epsilon=dp_epsilon)
    if dp and server_dp:
        from fl_app.privacy.dp_fedavg import dp_fedavg_strategy

        strategy, sargs = dp_fedavg_strategy(server_noise, clip=1.0, target_quantile=0.5)
        common.update(strategy_path=strategy, strategy_args=sargs)
    if ck is not None:
        start["checkpoint_vqvae"] = final_vqvae_on_sites(ck, cfg_dir, clients)  # the no-DP starting point
    t = time.perf_counter()
    print(
        f"[2/5] federated VQ-VAE job: {vqvae_rounds} rounds on {len(clients)} sites (NVFlare simulator) ...",
        flush=True,
    )
    run_job("vqvae", "sim", out, num_rounds=vqvae_rounds, max_steps=vqvae_steps, init=str(ck or ""), **common)
    timings["vqvae_job"] = time.perf_counter() - t
    t = time.perf_counter()
    final_vqvae = final_vqvae_on_sites(RunLayout(out).global_file("vqvae"), cfg_dir, clients)
    print(
        "      final global VQ-VAE on the sites' validation splits: "
        + ", ".join(f"{c} {m['psnr_db']:.1f} dB" for c, m in final_vqvae.items()),
        flush=True,
    )
    timings["vqvae_evaluation"] = time.perf_counter() - t
    t = time.perf_counter()
    print(f"[3/5] federated prior job: {prior_rounds} rounds (codes computed at each site) ...", flush=True)
    run_job(
        "prior", "sim", out, num_rounds=prior_rounds, max_steps=prior_steps, init=str(ck_dir or ""), **common
    )
    timings["prior_job"] = time.perf_counter() - t
    t = time.perf_counter()
    print("[4/5] global model, model card, MONAI bundle ...", flush=True)
    gdir = write_global_model(out)
    prep = None
    if dp:
        from fl_app.privacy.report import attach_to_model_card, format_report, privacy_report

        prep = privacy_report(out, site_config_dir=cfg_dir)
        attach_to_model_card(out, prep)
        (out / "privacy_report.json").write_text(json.dumps(prep, indent=2, default=str))
        print(format_report(prep), flush=True)
        for site, s in prep["sites"].items():
            print(
                f"  {site}: ε = {s.get('total_epsilon'):.3f} at δ = {s.get('delta'):g} (both jobs)",
                flush=True,
            )
    timings["global_model"] = time.perf_counter() - t
    t = time.perf_counter()
    print(f"[5/5] sampling a synthetic cohort of {n_samples} ...", flush=True)
    rows = sample_cohort(gdir, out / "cohort", n_samples, seed)
    timings["sample"] = time.perf_counter() - t
    card = json.loads((gdir / "model_card.json").read_text())
    report = _report(out, card, rows, timings, final_vqvae, prep, start)
    summary = {"out": str(out), "global": str(gdir), "bundle": str(gdir / "bundle"), "cohort": str(out / "cohort"),
               "report": str(report), "final_vqvae": final_vqvae, "timings_s": timings,
               "total_s": sum(timings.values())}  # fmt: skip
    (out / "demo.json").write_text(json.dumps(summary, indent=2))
    print(f"done in {summary['total_s']:.0f} s: report {report}")
    return summary


def _cmd_demo(args: argparse.Namespace) -> int:
    overrides = None
    if args.tiny:
        overrides = {
            "data": {"shape": [32, 32, 32], "spacing": [5.0, 5.0, 5.0]},
            "vqvae": {
                "channels": [8, 16],
                "num_res_channels": [8, 16],
                "num_embeddings": 32,
                "embedding_dim": 8,
            },
            "prior": {"d_model": 32, "n_layers": 1, "n_heads": 2},
            "train": {"batch_size": 2},
        }
    run_demo(
        args.out,
        n_sites=args.sites,
        subjects_per_site=args.subjects,
        vqvae_rounds=args.vqvae_rounds,
        prior_rounds=args.prior_rounds,
        vqvae_steps=args.vqvae_steps,
        prior_steps=args.prior_steps,
        n_samples=args.samples,
        overrides=overrides,
        seed=args.seed,
        dp=args.dp,
        dp_epsilon=args.dp_epsilon,
        init=args.init,
        server_dp=args.server_dp,
    )
    return 0


def add_demo_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """``synthbrain demo``."""
    p = subparsers.add_parser(
        "demo",
        help="end-to-end demo: 3 simulated sites → federated VQ-VAE → federated prior → synthetic cohort",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--subjects", type=int, default=6, help="subjects per site")
    p.add_argument("--vqvae-rounds", type=int, default=3)
    p.add_argument("--prior-rounds", type=int, default=2)
    p.add_argument("--vqvae-steps", type=int, default=30, help="local steps per round")
    p.add_argument("--prior-steps", type=int, default=15, help="local steps per round")
    p.add_argument("--samples", type=int, default=4, help="synthetic subjects to sample")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="32³ volumes and tiny networks (tests, smoke runs)")
    p.add_argument(
        "--dp", action="store_true", help="DP-SGD at every site (+ DP-FedAvg on the server, --server-dp)"
    )
    p.add_argument("--dp-epsilon", type=float, default=4.0, help="--dp: target ε per job at each site")
    p.add_argument(
        "--init",
        default="auto",
        metavar="auto|pretrained|PATH|scratch",
        help="initial model (auto: the package's public checkpoint when it ships and --tiny is not given); "
        "with --dp a checkpoint is fine-tuned on a few parameters only",
    )
    p.add_argument(
        "--server-dp",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="--dp: DP-FedAvg on the server as well (default: from scratch yes, from a checkpoint no)",
    )
    p.set_defaults(func=_cmd_demo)
    return p

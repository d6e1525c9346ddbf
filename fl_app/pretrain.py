"""``synthbrain pretrain``: the public checkpoint that federated jobs and DP fine-tuning start from.

Trains the VQ-VAE and then the prior centrally, with the same local training functions as
``synthbrain train-local``, on public data: by default simulated subjects from seeds that no demo, bench or
test site uses (so the checkpoint carries no patient), or any BIDS folders given with ``--bids``. Writes
``OUT/global/``, a global-model directory (``vqvae.pt``, ``prior.pt``, ``profile.yaml``,
``model_card.json``) that ``synthbrain sample --model`` reads, and with ``--ship`` copies it into the package
(``fl_app/pretrained/<profile>/``). The model card records the exact command, the data, steps, wall time,
held-out metrics and the SHA-256 of each weights file, so the checkpoint can be reproduced and verified.

Both stages save their latest weights after every epoch; ``--resume`` continues a stopped VQ-VAE stage from
``OUT/vqvae/vqvae.pt``, ``--prior-resume`` continues the prior from ``OUT/prior/prior.pt`` (e.g. with
``--skip-vqvae`` and a longer schedule, or a prior section that adds ``prior.cond_every_position``). Each
stage keeps its history (``pretrain_stages.json``: every command that trained it, its steps and wall time),
and the model card lists them all.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import shlex
import shutil
import time
from pathlib import Path
from typing import Any

from fl_app import __version__
from fl_app.config import add_set_args
from fl_app.data.nifti import file_sha256

__all__ = ["PRETRAIN_SEED", "add_pretrain_parser", "run_pretrain"]

STAGES_FILE = "pretrain_stages.json"
"""A stage's history in ``OUT/vqvae/`` or ``OUT/prior/``: each pretrain command that trained it and its steps."""

SIMULATED_FILE = "simulated.json"
"""Written into ``OUT/data/`` after simulating: the call's seed and sizes (a later run with the same reuses them)."""

# Simulated-data seed reserved for the public checkpoint: demo, benches and tests use seeds below 2000.
PRETRAIN_SEED = 7000


def _stage_args(add_parser: Any, argv: list[str]) -> argparse.Namespace:
    """Parse ``argv`` with a ``train-local`` sub-command's own parser (one definition of its options)."""
    ap = argparse.ArgumentParser(prog="synthbrain train-local")
    add_parser(ap.add_subparsers(dest="model"))
    return ap.parse_args(argv)


def _set_args(files: list[str] | None, pairs: list[str] | None) -> list[str]:
    """``--set-file``/``--set`` options as a stage's argv (files first, as ``overrides_from_args`` reads them)."""
    return [a for f in files or [] for a in ("--set-file", str(f))] + [
        a for kv in pairs or [] for a in ("--set", kv)
    ]


def _record_stage(
    stage_dir: Path, command: str, metrics: dict[str, Any], resumed: bool, earlier: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Append this command to ``stage_dir``'s history (a fresh run starts it; ``earlier`` seeds a resumed
    stage that has no history file yet) and return the whole history."""
    path = stage_dir / STAGES_FILE
    stages = (json.loads(path.read_text()) if path.is_file() else list(earlier)) if resumed else []
    stages.append(
        {"command": command, "steps": metrics.get("steps"), "wall_seconds": metrics.get("train_seconds")}
    )
    path.write_text(json.dumps(stages, indent=2))
    return stages


def run_pretrain(args: argparse.Namespace) -> int:
    from fl_app.config import load_profile, overrides_from_args, profile_to_yaml
    from fl_app.data.simulate import simulate_sites
    from fl_app.models.prior import load_prior
    from fl_app.train.prior_local import add_train_local_prior_parser, run_train_local_prior
    from fl_app.train.vqvae_local import add_train_local_vqvae_parser, run_train_local_vqvae

    out = Path(args.out or f"runs/pretrain-{args.profile}")
    out.mkdir(parents=True, exist_ok=True)
    profile = load_profile(args.profile, overrides_from_args(args))
    t_start = time.perf_counter()
    if args.bids:
        sites = [Path(b) for b in args.bids]
        data: dict[str, Any] = {"source": "bids", "folders": [str(s) for s in sites]}
    else:
        data = {
            "source": "simulated (fl_app.data.simulate.simulate_sites)",
            "seed": args.seed,
            "sites": args.sites,
            "subjects_per_site": args.subjects_per_site,
        }
        # simulation is deterministic: a resumed run reuses the folders an identical call wrote
        marker = out / "data" / SIMULATED_FILE
        if marker.is_file() and json.loads(marker.read_text()) == data:
            sites = [out / "data" / f"site-{i + 1}" for i in range(args.sites)]
            print(f"reusing the simulated sites in {out / 'data'} ({marker.name} matches)")
        else:
            marker.unlink(missing_ok=True)
            sites = simulate_sites(out / "data", args.sites, args.subjects_per_site, profile, seed=args.seed)
            marker.write_text(json.dumps(data, indent=2))
    bids = [a for s in sites for a in ("--bids", str(s))]
    common = ["--profile", args.profile, "--seed", str(args.train_seed), "--cache-dir", str(out / "cache")]
    sets = _set_args(args.set_file, args.set)
    if args.batch_size:
        common += ["--batch-size", str(args.batch_size)]

    def budget(steps: int | None, minutes: float | None) -> list[str]:
        return (["--max-steps", str(steps)] if steps else []) + (
            ["--max-minutes", str(minutes)] if minutes else []
        )

    t0 = time.perf_counter()
    vq_argv = [
        "vqvae",
        *bids,
        *common,
        *sets,
        "--out",
        str(out / "vqvae"),
        *budget(args.vqvae_steps, args.vqvae_minutes),
    ]
    command = "synthbrain " + " ".join(shlex.quote(a) for a in args.command_line)
    resumed = args.resume and (out / "vqvae" / "vqvae.pt").is_file()
    if resumed:
        vq_argv += ["--init", str(out / "vqvae" / "vqvae.pt")]
    if not args.skip_vqvae:
        rc = run_train_local_vqvae(_stage_args(add_train_local_vqvae_parser, vq_argv))
        if rc:
            return rc
    # this run's VQ-VAE metrics, or those of the run that trained it (--skip-vqvae): read once
    vq_metrics = json.loads((out / "vqvae" / "metrics.json").read_text())
    if not args.skip_vqvae:
        _record_stage(out / "vqvae", command, vq_metrics, resumed, [])
    vq_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    prior_sets = _set_args(args.prior_set_file, args.prior_set)
    prior_resumed = args.prior_resume and (out / "prior" / "prior.pt").is_file()
    # a prior trained before stage histories existed: its history is the card its run wrote
    old_card = out / "global" / "model_card.json"
    earlier_prior: list[dict[str, Any]] = []
    if prior_resumed and old_card.is_file():
        c = json.loads(old_card.read_text())
        pc = c.get("prior", {})
        earlier_prior = pc.get("stages") or [
            {
                "command": c.get("command"),
                "steps": pc.get("steps"),
                "wall_seconds": c["wall_seconds"]["prior"],
            }
        ]
    pr_argv = [
        "prior",
        "--vqvae",
        str(out / "vqvae"),
        *bids,
        *common[2:],
        *prior_sets,
        "--out",
        str(out / "prior"),
    ]
    pr_argv += budget(args.prior_steps, args.prior_minutes)
    if prior_resumed:
        pr_argv += ["--init", str(out / "prior" / "prior.pt")]
    rc = run_train_local_prior(_stage_args(add_train_local_prior_parser, pr_argv))
    if rc:
        return rc
    pr_metrics = json.loads((out / "prior" / "metrics.json").read_text())
    pr_stages = _record_stage(out / "prior", command, pr_metrics, prior_resumed, earlier_prior)
    prior_seconds = time.perf_counter() - t0

    gdir = out / "global"
    gdir.mkdir(parents=True, exist_ok=True)
    shutil.copy2(out / "vqvae" / "vqvae.pt", gdir / "vqvae.pt")
    shutil.copy2(out / "prior" / "prior.pt", gdir / "prior.pt")
    _, prof = load_prior(gdir / "prior.pt")
    (gdir / "profile.yaml").write_text(profile_to_yaml(prof))
    vq_stages_file = out / "vqvae" / STAGES_FILE
    vq_stages = json.loads(vq_stages_file.read_text()) if vq_stages_file.is_file() else []
    card = {
        "name": f"synthbrain/pretrained-{args.profile}",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "synthbrain_version": __version__,
        "kind": "public pretrained checkpoint (central training, no federation, no patient data)",
        "command": command,
        # every command that trained these weights, in order (one unless the VQ-VAE stage was resumed)
        "commands": [*dict.fromkeys(st["command"] for st in [*vq_stages, *pr_stages])],
        "data": data,
        "profile": args.profile,
        "wall_seconds": {"total": time.perf_counter() - t_start, "vqvae": vq_seconds, "prior": prior_seconds},
        "vqvae": {
            "steps": sum(int(st["steps"] or 0) for st in vq_stages) or vq_metrics.get("steps"),
            "stages": vq_stages,
            "n_train": vq_metrics.get("n_train"),
            "n_val": vq_metrics.get("n_val"),
            "quantiser": vq_metrics.get("quantiser"),
            "held_out": (vq_metrics.get("final") or {}).get("val", {}),
        },
        "prior": {
            "steps": sum(int(st["steps"] or 0) for st in pr_stages),
            "stages": pr_stages,
            "n_train": pr_metrics.get("n_train"),
            "n_val": pr_metrics.get("n_val"),
            "held_out": pr_metrics.get("val", {}),
            "held_out_conditions_dropped": pr_metrics.get("val_conditions_dropped", {}),
        },
        "privacy": {
            "differential_privacy": False,
            "patient_data": "none (simulated subjects)" if not args.bids else "the public folders under data",
        },
        "weights_sha256": {name: file_sha256(gdir / name) for name in ("vqvae.pt", "prior.pt")},
    }
    (gdir / "model_card.json").write_text(json.dumps(card, indent=2, default=float))
    print(f"wrote {gdir} (VQ-VAE {card['vqvae']['steps']} steps, prior {card['prior']['steps']} steps)")
    if args.ship:
        from fl_app.models.pretrained import PRETRAINED_ROOT

        dest = PRETRAINED_ROOT / args.profile
        dest.mkdir(parents=True, exist_ok=True)
        for name in ("vqvae.pt", "prior.pt", "profile.yaml", "model_card.json"):
            shutil.copy2(gdir / name, dest / name)
        print(f"shipped to {dest}")
    return 0


def add_pretrain_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "pretrain",
        help="train the public checkpoint (VQ-VAE, then prior) centrally on simulated or public data",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--profile", default="cpu-demo")
    p.add_argument("--out", default=None, help="run folder (default runs/pretrain-<profile>)")
    p.add_argument("--bids", action="append", help="public BIDS folder(s) instead of simulated sites")
    p.add_argument("--sites", type=int, default=3, help="simulated sites")
    p.add_argument("--subjects-per-site", type=int, default=200)
    p.add_argument(
        "--seed", type=int, default=PRETRAIN_SEED, help="simulation seed (reserved for pretraining)"
    )
    p.add_argument("--train-seed", type=int, default=0, help="training seed (initial weights, shuffling)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--vqvae-steps", type=int, default=None)
    p.add_argument("--vqvae-minutes", type=float, default=None)
    p.add_argument("--prior-steps", type=int, default=None)
    p.add_argument("--prior-minutes", type=float, default=None)
    add_set_args(p, help="profile override (the VQ-VAE stage; its profile carries prior.* to the prior)")
    add_set_args(p, help="prior.*/train.* override (the prior stage only)", dest="prior_set")
    p.add_argument("--resume", action="store_true", help="continue the VQ-VAE stage from OUT/vqvae/vqvae.pt")
    p.add_argument("--skip-vqvae", action="store_true", help="reuse OUT/vqvae/vqvae.pt as it is")
    p.add_argument(
        "--prior-resume", action="store_true", help="continue the prior stage from OUT/prior/prior.pt"
    )
    p.add_argument("--ship", action="store_true", help="copy the result into fl_app/pretrained/<profile>/")
    p.set_defaults(func=run_pretrain)
    return p

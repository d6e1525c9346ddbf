"""``synthbrain fl ...``: run the two federated jobs against the simulator, a local POC, or production.

    synthbrain fl run vqvae --env sim  --run NAME --site-config-dir DIR [--rounds R ...]
    synthbrain fl run prior --env sim  --run NAME --site-config-dir DIR          (after vqvae)
    synthbrain fl run vqvae --env poc  --run NAME --site-config-dir DIR          (prepares + starts a POC)
    synthbrain fl run vqvae --env prod --run NAME --startup-kit ADMIN_KIT --clients site-a site-b ...
    synthbrain fl poc prepare|start|stop --workspace DIR --clients ...
    synthbrain fl provision --project site_configs/project.yml --workspace DIR
    synthbrain fl export vqvae --out DIR ...                                     (job folder for `nvflare job submit`)

Simulator and POC keep everything under ``runs/<name>/`` (checkpoints ``runs/<name>/fl/<job>/``,
NVFlare workspaces ``runs/<name>/nvflare/``, the global model ``runs/<name>/global/``) and the POC
workspace under ``workspaces/poc/<name>``. A job whose checkpoint exists resumes from its last
completed round.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from fl_app.config import load_profile

log = logging.getLogger(__name__)

__all__ = ["add_fl_parser", "list_site_configs", "run_job"]


def list_site_configs(site_config_dir: str | Path) -> list[str]:
    """Site names = the ``<site>.yaml`` files in a folder (sorted)."""
    d = Path(site_config_dir)
    names = sorted(p.stem for p in d.glob("*.yaml") if p.stem != "project")
    if not names:
        raise FileNotFoundError(f"no <site>.yaml files in {d}")
    return names


def run_job(
    kind: str,
    env: str,
    run_dir: str | Path,
    *,
    profile: dict[str, Any],
    clients: list[str],
    num_rounds: int,
    min_sites: int | None = None,
    round_timeout: int = 60,
    memory_gc_rounds: int = 0,
    site_config_dir: str | Path | None = None,
    local_epochs: int = 1,
    max_steps: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    seed: int = 0,
    dp: bool = False,
    dp_epsilon: float | None = None,
    strategy_path: str | None = None,
    strategy_args: dict[str, Any] | None = None,
    startup_kit: str | None = None,
    username: str = "admin@nvidia.com",
    checkpoint_dir: str | None = None,
    frozen_vqvae: str | None = None,
    poc_workspace: str | Path | None = None,
    keep_poc: bool = False,
    timeout: float = 3600.0,
    result_filters: list[Any] | None = None,
    data_filters: list[Any] | None = None,
) -> dict[str, Any]:
    """Run one job to completion; returns ``{"job_id", "result", "checkpoint_dir", "seconds"}``.

    ``env``: ``"sim"`` (NVFlare simulator, in this process tree), ``"poc"`` (server + one client per site
    on this machine, each site's client reading its YAML from ``$SYNTHBRAIN_SITE_CONFIG``), or
    ``"prod"`` (submit through an admin startup kit; sites read their own ``$SYNTHBRAIN_SITE_CONFIG``).

    DP: ``dp_epsilon`` is the ε this job asks each site running local DP-SGD to spend (the sites' YAMLs
    turn DP on and cap the total); it implies ``dp`` (DP-compatible VQ-VAE). Server-side DP-FedAvg is the
    strategy ``fl_app.privacy.dp_fedavg.DPFedAvgStrategy``.
    """
    from fl_app.fl.jobs import JobSpec, build_recipe
    from fl_app.privacy.aggregation import DEFAULT_STRATEGY

    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    if checkpoint_dir is None:
        # prod: relative to the server's workspace (the admin's machine is not the server)
        checkpoint_dir = str(run_dir / "fl" / kind) if env != "prod" else f"synthbrain/{run_dir.name}/{kind}"
    if kind == "prior" and frozen_vqvae is None:
        frozen_vqvae = (
            str(run_dir / "fl" / "vqvae" / "global_vqvae.pt")
            if env != "prod"
            else f"synthbrain/{run_dir.name}/vqvae/global_vqvae.pt"
        )
    spec = JobSpec(
        kind=kind,
        profile=profile,
        num_clients=len(clients),
        num_rounds=num_rounds,
        min_sites=min_sites,
        round_timeout=round_timeout,
        memory_gc_rounds=memory_gc_rounds,
        checkpoint_dir=checkpoint_dir,
        frozen_vqvae=frozen_vqvae or "",
        site_config_dir=str(Path(site_config_dir).resolve()) if (site_config_dir and env == "sim") else None,
        local_epochs=local_epochs,
        max_steps=max_steps,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        dp=dp or dp_epsilon is not None,
        dp_epsilon=dp_epsilon,
        run_name=run_dir.name,
        strategy_path=strategy_path or DEFAULT_STRATEGY,
        strategy_args=strategy_args or {},
        name=f"synthbrain-{kind}",
    )
    recipe = build_recipe(spec, result_filters, data_filters)
    (run_dir / f"job_{kind}.json").write_text(
        json.dumps({**spec.__dict__, "env": env}, indent=2, default=str)
    )
    t0 = time.perf_counter()
    if env == "sim":
        from nvflare.recipe.sim_env import SimEnv

        sim = SimEnv(
            clients=clients, num_threads=len(clients), workspace_root=str(run_dir / "nvflare" / "sim")
        )
        run = recipe.run(sim)
        result = run.get_result()
        job_id = run.get_job_id()
    elif env in ("poc", "prod"):
        from nvflare.recipe.prod_env import ProdEnv

        started_here = False
        if env == "poc":
            from fl_app.fl import poc

            ws = Path(poc_workspace or Path("workspaces") / "poc" / run_dir.name).resolve()
            if not poc.is_running(ws):
                poc.prepare(ws, clients)
                site_env = {}
                if site_config_dir:
                    site_env = {
                        c: {"SYNTHBRAIN_SITE_CONFIG": str((Path(site_config_dir) / f"{c}.yaml").resolve())}
                        for c in clients
                    }
                poc.start(ws, clients, site_env)
                started_here = True
            startup_kit = str(poc.admin_kit(ws))
        try:
            if env == "poc":
                poc.wait_ready(ws, clients)
            if not startup_kit:
                raise ValueError("--env prod needs --startup-kit (the admin's startup kit folder)")
            penv = ProdEnv(startup_kit_location=startup_kit, username=username, login_timeout=30.0)
            run = recipe.run(penv)
            job_id = run.get_job_id()
            print(f"submitted job {job_id}; waiting for it to finish", flush=True)
            result = run.get_result(timeout=timeout)
            status = run.get_status()
            print(f"job {job_id} finished: {status}", flush=True)
        finally:
            if env == "poc" and started_here and not keep_poc:
                poc.stop(ws)
    else:
        raise ValueError(f"env must be sim, poc or prod, got {env!r}")
    seconds = time.perf_counter() - t0
    out = {"job_id": job_id, "result": result, "checkpoint_dir": checkpoint_dir, "seconds": seconds}
    if env != "prod":
        from fl_app.fl.server import read_checkpoint

        ck = read_checkpoint(checkpoint_dir)
        if ck is None or ck["round"] != num_rounds - 1:
            raise RuntimeError(
                f"{kind} job did not complete its {num_rounds} rounds (checkpoint: {ck and ck['round']})"
            )
    return out


def _profile_from_args(args: argparse.Namespace) -> dict[str, Any]:
    from fl_app.train.vqvae_local import parse_overrides

    return load_profile(args.profile, parse_overrides(args.set)).model_dump(mode="json")


def _cmd_run(args: argparse.Namespace) -> int:
    clients = args.clients or (list_site_configs(args.site_config_dir) if args.site_config_dir else None)
    if not clients:
        print("error: give --site-config-dir (simulator / POC) or --clients (production)")
        return 2
    if args.env == "prod" and not (args.startup_kit and Path(args.startup_kit).is_dir()):
        given = f"{args.startup_kit} is not a folder" if args.startup_kit else "not given"
        print(
            f"error: --env prod needs --startup-kit, the admin's startup kit folder ({given})",
            file=sys.stderr,
        )
        return 2
    run_dir = Path(args.runs) / args.run
    strategy, strategy_args = args.strategy, json.loads(args.strategy_args) if args.strategy_args else None
    if args.dp_fedavg:
        from fl_app.privacy.dp_fedavg import dp_fedavg_strategy

        strategy, strategy_args = dp_fedavg_strategy(args.dp_noise, args.dp_clip, args.dp_quantile)
    res = run_job(
        args.job,
        args.env,
        run_dir,
        profile=_profile_from_args(args),
        clients=clients,
        num_rounds=args.rounds,
        min_sites=args.min_sites,
        round_timeout=args.round_timeout,
        memory_gc_rounds=args.memory_gc_rounds,
        site_config_dir=args.site_config_dir,
        local_epochs=args.local_epochs,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        dp=args.dp_model,
        dp_epsilon=args.dp_epsilon,
        strategy_path=strategy,
        strategy_args=strategy_args,
        startup_kit=args.startup_kit,
        username=args.username,
        checkpoint_dir=args.checkpoint_dir,
        frozen_vqvae=args.vqvae,
        keep_poc=args.keep_poc,
        timeout=args.timeout,
    )
    print(f"{args.job} job done in {res['seconds']:.0f} s; results: {res['result']}")
    if args.env != "prod":
        from fl_app.global_model import write_global_model

        gdir = write_global_model(run_dir)
        print(f"global model: {gdir}")
        if args.dp_epsilon is not None or args.dp_fedavg:
            from fl_app.privacy.report import attach_to_model_card, format_report, privacy_report

            prep = privacy_report(run_dir, site_config_dir=args.site_config_dir)
            attach_to_model_card(run_dir, prep)
            print(format_report(prep))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from fl_app.fl.jobs import JobSpec, build_recipe

    spec = JobSpec(
        kind=args.job,
        profile=_profile_from_args(args),
        num_clients=args.num_clients,
        num_rounds=args.rounds,
        min_sites=args.min_sites,
        round_timeout=args.round_timeout,
        memory_gc_rounds=args.memory_gc_rounds,
        checkpoint_dir=args.checkpoint_dir or f"synthbrain/{args.run}/{args.job}",
        frozen_vqvae=args.vqvae
        or (f"synthbrain/{args.run}/vqvae/global_vqvae.pt" if args.job == "prior" else ""),
        local_epochs=args.local_epochs,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        dp=args.dp_model or args.dp_epsilon is not None,
        dp_epsilon=args.dp_epsilon,
        run_name=args.run,
        name=f"synthbrain-{args.job}",
    )
    build_recipe(spec).export(str(args.out))
    print(
        f"job folder written to {args.out}/{spec.name} (submit: nvflare job submit -j {args.out}/{spec.name})"
    )
    return 0


def _cmd_poc(args: argparse.Namespace) -> int:
    from fl_app.fl import poc

    ws = Path(args.workspace).resolve()
    clients = args.clients or (
        list_site_configs(args.site_config_dir) if args.site_config_dir else ["site-1", "site-2"]
    )
    if args.action == "prepare":
        print(f"POC prepared: {poc.prepare(ws, clients)}")
    elif args.action == "start":
        site_env = {}
        if args.site_config_dir:
            site_env = {
                c: {"SYNTHBRAIN_SITE_CONFIG": str((Path(args.site_config_dir) / f"{c}.yaml").resolve())}
                for c in clients
            }
        pids = poc.start(ws, clients, site_env)
        poc.wait_ready(ws, clients)
        print(f"POC running: {pids}; admin kit {poc.admin_kit(ws)}")
    elif args.action == "stop":
        print(f"stopped process groups: {poc.stop(ws)}")
    elif args.action == "status":
        print("running" if poc.is_running(ws) else "stopped")
    return 0


def _cmd_provision(args: argparse.Namespace) -> int:
    """Provision startup kits from the project file, then check each kit (mTLS, certificates, policy)."""
    import sys

    from fl_app.fl.security import check_kits, provision

    try:
        prod = provision(args.project, args.workspace)
    except RuntimeError as exc:
        print(exc, file=sys.stderr)
        return 1
    checks = check_kits(args.project, prod)
    bad = 0
    for c in checks:
        status = "ok" if not c.problems else "PROBLEM: " + "; ".join(c.problems)
        cert = f"cert CN={c.subject_cn} O={c.subject_org}"
        print(f"  {c.kind:6s} {c.name:45s} {c.connection_security:5s} {cert} {status}")
        bad += bool(c.problems)
    print(f"startup kits in {prod}: one folder per server, site and admin; send each to its owner securely")
    return 1 if bad else 0


def _add_job_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("job", choices=["vqvae", "prior"])
    p.add_argument("--run", default="fl", help="run name: results under <runs>/<run>/")
    p.add_argument("--runs", default="runs", help="runs folder (default ./runs)")
    p.add_argument("--profile", default="cpu-demo")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="profile override, e.g. train.lr=5e-4")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument(
        "--min-sites",
        type=int,
        default=None,
        help="sites needed to start the job and to close a round (default: all); a round goes on without "
        "the others, which are recorded as missing",
    )
    p.add_argument(
        "--round-timeout",
        type=int,
        default=60,
        help="seconds a round waits for the remaining sites once --min-sites have replied (default 60)",
    )
    p.add_argument(
        "--memory-gc-rounds",
        type=int,
        default=0,
        help="memory clean-up (gc + malloc_trim) every N rounds on the server and the sites (0: never)",
    )
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=None, help="cap on local steps per round")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dp-model", action="store_true", help="DP-compatible VQ-VAE (sites run DP-SGD)")
    p.add_argument(
        "--dp-epsilon",
        type=float,
        default=None,
        help="target ε of this job at each site running DP-SGD (implies --dp-model; sites cap the total)",
    )
    p.add_argument("--checkpoint-dir", default=None, help="server-side checkpoint folder")
    p.add_argument("--vqvae", default=None, help="prior job: server-side path of the global VQ-VAE")


def add_fl_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """``synthbrain fl run|export|poc|provision``."""
    fl = subparsers.add_parser("fl", help="federated jobs on NVFlare (simulator, POC, production)")
    sub = fl.add_subparsers(dest="fl_command", required=True)
    r = sub.add_parser("run", help="run the vqvae or prior job to completion (sim | poc | prod)")
    _add_job_args(r)
    r.add_argument("--env", choices=["sim", "poc", "prod"], default="sim")
    r.add_argument("--site-config-dir", default=None, help="folder of <site>.yaml (sim / poc)")
    r.add_argument("--clients", nargs="+", default=None, help="client names (default: the site YAMLs)")
    r.add_argument("--strategy", default=None, help="aggregation strategy class path")
    r.add_argument("--strategy-args", default=None, help="its keyword arguments as JSON")
    r.add_argument("--dp-fedavg", action="store_true", help="server-side DP-FedAvg (site-level DP)")
    r.add_argument("--dp-noise", type=float, default=1.0, help="DP-FedAvg noise multiplier σ")
    r.add_argument("--dp-clip", type=float, default=1.0, help="DP-FedAvg clip bound C (initial if adaptive)")
    r.add_argument("--dp-quantile", type=float, default=None, help="DP-FedAvg adaptive clipping quantile γ")
    r.add_argument("--startup-kit", default=None, help="prod: the admin's startup kit folder")
    r.add_argument("--username", default="admin@nvidia.com", help="prod: admin user name")
    r.add_argument("--keep-poc", action="store_true", help="poc: leave the POC running afterwards")
    r.add_argument("--timeout", type=float, default=3600.0, help="poc/prod: seconds to wait for the job")
    r.set_defaults(func=_cmd_run)
    e = sub.add_parser("export", help="write a job folder for `nvflare job submit` (production)")
    _add_job_args(e)
    e.add_argument("--num-clients", type=int, required=True)
    e.add_argument("--out", type=Path, required=True)
    e.set_defaults(func=_cmd_export)
    pc = sub.add_parser("poc", help="local proof-of-concept deployment: prepare / start / stop / status")
    pc.add_argument("action", choices=["prepare", "start", "stop", "status"])
    pc.add_argument("--workspace", default="workspaces/poc/default")
    pc.add_argument("--clients", nargs="+", default=None)
    pc.add_argument("--site-config-dir", default=None)
    pc.set_defaults(func=_cmd_poc)
    pv = sub.add_parser("provision", help="startup kits for server, sites and admins from project.yml")
    pv.add_argument("--project", default="site_configs/project.yml")
    pv.add_argument("--workspace", default="workspaces/provision")
    pv.set_defaults(func=_cmd_provision)
    return fl

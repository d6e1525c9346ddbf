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

The jobs themselves (NVFlare 2.9 recipes, :func:`build_recipe` from a :class:`JobSpec`):

* ``vqvae``: FedAvg of the 3D VQ-VAE; client :class:`fl_app.fl.client.VQVAETask`.
* ``prior``: FedAvg of the conditional transformer prior over the codes of the first job's global
  VQ-VAE (shipped frozen inside the global model); client :class:`fl_app.fl.client.PriorTask`.

Server side of both: :class:`fl_app.fl.server.SynthFedAvg` (FedAvg + resume) with
:class:`fl_app.fl.server.SynthPersistor` (per-round checkpoint with the round number) and
:class:`fl_app.fl.server.SynthAggregator` (sample-weighted FedAvg by default; the
``strategy_path`` / ``strategy_args`` pair selects another strategy, e.g. DP-FedAvg). Client metrics go
to TensorBoard on the server (NVFlare tracking).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nvflare.apis.dxo import DataKind
from nvflare.app_opt.pt.recipes.fedavg import FedAvgRecipe as PTFedAvgRecipe
from nvflare.recipe.utils import add_experiment_tracking

from fl_app.config import Profile, add_set_args, load_profile
from fl_app.fl.launcher import recipe_launch_args
from fl_app.fl.server import SynthAggregator, SynthFedAvg, SynthPersistor
from fl_app.privacy.aggregation import DEFAULT_STRATEGY
from fl_app.run_layout import RunLayout

log = logging.getLogger(__name__)

__all__ = [
    "CLIENT_SCRIPT",
    "JobSpec",
    "SynthFedAvgRecipe",
    "add_fl_parser",
    "build_recipe",
    "job_profile",
    "list_site_configs",
    "run_job",
]

CLIENT_SCRIPT = Path(__file__).with_name("client.py")
"""Both jobs' client: the installed module ``fl_app.fl.client`` (``python -m fl_app.fl.client vqvae|prior``)."""


class SynthFedAvgRecipe(PTFedAvgRecipe):
    """NVFlare's PyTorch ``FedAvgRecipe`` with the synthbrain controller (resume, drop-out) in place of FedAvg.

    ``min_clients`` (NVFlare's job ``min_clients``: sites needed to start the job, and below which alive
    sites NVFlare aborts it) is also the replies a round needs (``min_sites``); ``num_clients`` sites are
    asked each round, and a round closes ``round_timeout`` seconds after ``min_sites`` have replied.
    """

    def __init__(
        self, *args: Any, num_clients: int | None = None, round_timeout: int = 0, **kwargs: Any
    ) -> None:
        self._num_clients = num_clients
        self._round_timeout = int(round_timeout)
        super().__init__(*args, **kwargs)

    def _create_controller(self, persistor_id: str, model_params: Any, model_aggregator: Any) -> SynthFedAvg:
        num_clients = max(self._num_clients or self.min_clients, self.min_clients)
        return SynthFedAvg(
            num_clients=num_clients,
            num_rounds=self.num_rounds,
            persistor_id=persistor_id,
            aggregator=model_aggregator,
            task_name="train",
            min_sites=self.min_clients if self.min_clients < num_clients else 0,
            round_timeout=self._round_timeout,
            memory_gc_rounds=self.server_memory_gc_rounds,  # NVFlare's own recipe option, kept
        )


@dataclass
class JobSpec:
    """Everything that defines one job run (what ``synthbrain fl run`` collects from its flags).

    Attributes:
        kind: ``"vqvae"`` or ``"prior"``.
        profile: resolved profile dict (``Profile.model_dump(mode="json")``).
        num_clients: sites asked each round (the job's sites).
        num_rounds: total rounds.
        min_sites: sites needed to start the job and replies needed to close a round (None: all
            ``num_clients``); fewer alive sites than this and NVFlare aborts the job (resubmit to resume).
        round_timeout: seconds a round waits for the remaining sites once ``min_sites`` have replied.
        memory_gc_rounds: memory clean-up (``gc.collect`` + ``malloc_trim``) every N rounds on the server
            and on every client (0: never); for large models over many rounds.
        checkpoint_dir: server-side checkpoint folder (absolute, or relative to the server workspace).
        frozen_vqvae: prior job: server-side path of the first job's ``global_vqvae.pt``.
        site_config_dir: folder of ``<site>.yaml`` visible to the clients (simulator / POC); None =
            every client reads ``$SYNTHBRAIN_SITE_CONFIG`` (production).
        local_epochs, max_steps: local work per round (batch size, learning rate: the profile's ``train``).
        planned_rounds: the rounds the sites plan their DP noise for when a job is run a few rounds at a
            time, each submission resuming the last (``synthbrain tune --env sim``); None: ``num_rounds``.
        dp: the job is for sites running DP-SGD: the server refuses a VQ-VAE quantiser that is not DP-safe.
        dp_epsilon: target ε of this job at each site running local DP-SGD (the site's YAML decides
            whether DP is on, and its ``epsilon_budget`` caps the total; None: the site's ``job_epsilon``).
        init: what the initial global model is: ``"pretrained"`` (the package's checkpoint for the profile),
            a server-side global-model directory or ``.pt`` file, or ``""`` (random: ``scratch``); the
            checkpoint's architecture must equal the profile's.
        run_name: run name recorded in the sites' privacy ledgers.
        strategy_path, strategy_args: the server aggregation strategy.
        name: NVFlare job name.
    """

    kind: str
    profile: dict[str, Any]
    num_clients: int
    num_rounds: int
    checkpoint_dir: str
    min_sites: int | None = None
    round_timeout: int = 60
    memory_gc_rounds: int = 0
    frozen_vqvae: str = ""
    site_config_dir: str | None = None
    local_epochs: int = 1
    max_steps: int | None = None
    planned_rounds: int | None = None
    seed: int = 0
    dp: bool = False
    dp_epsilon: float | None = None
    init: str = ""
    run_name: str = ""
    strategy_path: str = DEFAULT_STRATEGY
    strategy_args: dict[str, Any] = field(default_factory=dict)
    name: str = ""

    @classmethod
    def for_run(cls, kind: str, server: RunLayout, **fields: Any) -> JobSpec:
        """The ``kind`` job of the run whose server-side folders are ``server``: fields given None take their
        default, ``checkpoint_dir`` / ``frozen_vqvae`` the run's; a target ``dp_epsilon`` implies ``dp``."""
        fields = {k: v for k, v in fields.items() if v is not None}
        fields.setdefault("checkpoint_dir", str(server.job_dir(kind)))
        if kind == "prior":
            fields.setdefault("frozen_vqvae", str(server.global_file("vqvae")))
        spec = cls(kind=kind, name=f"synthbrain-{kind}", **fields)
        spec.dp = spec.dp or spec.dp_epsilon is not None
        return spec

    def train_args(self) -> str:
        parts = [self.kind, f"--local-epochs {self.local_epochs}", f"--seed {self.seed}"]
        parts.append(f"--rounds {self.planned_rounds or self.num_rounds}")
        if self.dp_epsilon:
            parts.append(f"--dp-epsilon {self.dp_epsilon}")
        if self.run_name:
            parts.append(f"--run {self.run_name}")
        if self.site_config_dir:
            parts.append(f"--site-config-dir {self.site_config_dir}")
        if self.max_steps:
            parts.append(f"--max-steps {self.max_steps}")
        return " ".join(parts)


def build_recipe(
    spec: JobSpec, result_filters: list[Any] | None = None, data_filters: list[Any] | None = None
) -> SynthFedAvgRecipe:
    """The NVFlare recipe of one synthbrain job (run it with ``recipe.run(env)`` or ``recipe.export``).

    ``result_filters`` / ``data_filters``: NVFlare ``Filter`` objects added to every client for outgoing
    task results / incoming task data of the ``train`` task (e.g. :class:`fl_app.fl.leak_audit.ResultAuditFilter`).
    """
    if spec.kind not in ("vqvae", "prior"):
        raise ValueError(f"job kind must be vqvae or prior, got {spec.kind!r}")
    if spec.kind == "prior" and not spec.frozen_vqvae:
        raise ValueError("the prior job needs the global VQ-VAE of the vqvae job (frozen_vqvae)")
    persistor = SynthPersistor(
        model_kind=spec.kind,
        profile=spec.profile,
        checkpoint_dir=str(spec.checkpoint_dir),
        frozen_vqvae=str(spec.frozen_vqvae),
        dp=spec.dp,
        seed=spec.seed,
        init=spec.init,
    )
    recipe = SynthFedAvgRecipe(
        name=spec.name or f"synthbrain-{spec.kind}",
        min_clients=min(spec.min_sites or spec.num_clients, spec.num_clients),
        num_clients=spec.num_clients,
        round_timeout=spec.round_timeout,
        server_memory_gc_rounds=spec.memory_gc_rounds,
        client_memory_gc_rounds=spec.memory_gc_rounds,
        num_rounds=spec.num_rounds,
        train_script=str(CLIENT_SCRIPT),
        train_args=spec.train_args(),
        model_persistor=persistor,
        aggregator=SynthAggregator(spec.strategy_path, spec.strategy_args or None),
        aggregator_data_kind=DataKind.WEIGHT_DIFF,
        # in-process, or NVFlare's external launch of the synthbrain site launcher, which runs the script
        # with each site's own compute.nproc (torchrun when > 1): see fl_app.fl.launcher
        **recipe_launch_args(spec.site_config_dir),
    )
    # fl_app is installed at every site (the consortium's package): never copy it into the job.
    recipe._job.set_app_packages(["fl_app"])
    add_experiment_tracking(recipe, "tensorboard")
    for f in result_filters or []:
        recipe.add_client_output_filter(f, tasks=["train"])
    for f in data_filters or []:
        recipe.add_client_input_filter(f, tasks=["train"])
    return recipe


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
    clients: list[str],
    site_config_dir: str | Path | None = None,
    startup_kit: str | None = None,
    username: str = "admin@nvidia.com",
    poc_workspace: str | Path | None = None,
    keep_poc: bool = False,
    timeout: float = 3600.0,
    result_filters: list[Any] | None = None,
    data_filters: list[Any] | None = None,
    **job: Any,
) -> dict[str, Any]:
    """Run one job to completion; returns ``{"job_id", "result", "checkpoint_dir", "seconds"}``.

    ``job``: the :class:`JobSpec` fields (``profile``, ``num_rounds``, ``max_steps``, ...; see
    :meth:`JobSpec.for_run`); the run, the sites and how to reach them are the other arguments.

    ``env``: ``"sim"`` (NVFlare simulator, in this process tree), ``"poc"`` (server + one client per site
    on this machine, each site's client reading its YAML from ``$SYNTHBRAIN_SITE_CONFIG``), or
    ``"prod"`` (submit through an admin startup kit; sites read their own ``$SYNTHBRAIN_SITE_CONFIG``).

    DP: ``dp_epsilon`` is the ε this job asks each site running local DP-SGD to spend (the sites' YAMLs
    turn DP on and cap the total). Server-side DP-FedAvg is the strategy ``fl_app.privacy.dp_fedavg.DPFedAvgStrategy``.
    """

    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    # prod: relative to the server's workspace (the admin's machine is not the server)
    server = RunLayout(run_dir) if env != "prod" else RunLayout.server(run_dir.name)
    sim_configs = str(Path(site_config_dir).resolve()) if (site_config_dir and env == "sim") else None
    spec = JobSpec.for_run(
        kind, server, num_clients=len(clients), site_config_dir=sim_configs, run_name=run_dir.name, **job
    )
    recipe = build_recipe(spec, result_filters, data_filters)
    (RunLayout(run_dir).job_settings(kind)).write_text(
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
    out = {"job_id": job_id, "result": result, "checkpoint_dir": spec.checkpoint_dir, "seconds": seconds}
    if env != "prod":
        from fl_app.fl.server import read_checkpoint

        ck = read_checkpoint(spec.checkpoint_dir)
        if ck is None or ck["round"] != spec.num_rounds - 1:
            raise RuntimeError(
                f"{kind} job did not complete its {spec.num_rounds} rounds (checkpoint: {ck and ck['round']})"
            )
    return out


def job_profile(
    kind: str, profile: str | None, overrides: dict[str, Any] | list[str], init: str = ""
) -> Profile:
    """The profile of a job: ``profile`` (name or YAML) with the overrides (nested, as
    :func:`fl_app.config.overrides_from_args` reads ``--set-file``/``--set``, or ``KEY=VALUE`` items); when the
    job starts from a checkpoint and no ``profile`` is given, the checkpoint's own profile (it travels with the
    weights) with the overrides. A checkpoint whose architecture differs from the result is an error naming
    the keys."""
    from fl_app.config import apply_overrides, parse_overrides
    from fl_app.models.pretrained import check_init_architecture, checkpoint_profile_dict, resolve_init

    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    path = None
    if init and (init == "pretrained" or Path(init).exists()):  # prod: a server-side path stays unread here
        path = resolve_init(init, kind, profile or "cpu-demo")
    if path is not None and profile is None:
        prof = apply_overrides(checkpoint_profile_dict(path), overrides, source=str(path))
    else:
        prof = load_profile(profile or "cpu-demo", overrides)
    if path is not None and kind == "vqvae":  # the prior job's profile is the frozen VQ-VAE's (server side)
        check_init_architecture(path, kind, prof)
    return prof


def _job_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The :class:`JobSpec` fields of ``fl run`` / ``fl export`` flags; ``--batch-size`` / ``--lr`` are
    ``--set train.batch_size=`` / ``train.lr=`` (local work is the profile's, which travels with the model)."""
    from fl_app.config import overrides_from_args

    sugar = [f"train.{k}={v}" for k, v in (("batch_size", args.batch_size), ("lr", args.lr)) if v is not None]
    init = "" if args.init in (None, "scratch") else args.init
    if init and init != "pretrained" and Path(init).exists():
        init = str(Path(init).resolve())
    return dict(
        profile=job_profile(args.job, args.profile, overrides_from_args(args, extra=sugar), init).model_dump(
            mode="json"
        ),
        init=init,
        num_rounds=args.rounds, min_sites=args.min_sites, round_timeout=args.round_timeout,
        memory_gc_rounds=args.memory_gc_rounds, local_epochs=args.local_epochs, max_steps=args.max_steps,
        seed=args.seed, dp=args.dp_model, dp_epsilon=args.dp_epsilon, checkpoint_dir=args.checkpoint_dir,
        frozen_vqvae=args.vqvae,
    )  # fmt: skip


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
        args.job, args.env, run_dir, clients=clients, site_config_dir=args.site_config_dir,
        startup_kit=args.startup_kit, username=args.username, keep_poc=args.keep_poc, timeout=args.timeout,
        strategy_path=strategy, strategy_args=strategy_args, **_job_fields(args),
    )  # fmt: skip
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
    server = RunLayout.server(args.run)
    spec = JobSpec.for_run(
        args.job, server, num_clients=args.num_clients, run_name=args.run, **_job_fields(args)
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
        print(f"POC prepared: {poc.prepare(ws, clients, project=args.project)}")
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
    p.add_argument(
        "--profile",
        default=None,
        help="profile name or YAML (default: the --init checkpoint's own profile, else cpu-demo)",
    )
    add_set_args(p)
    p.add_argument(
        "--init",
        default="scratch",
        metavar="pretrained|PATH|scratch",
        help="initial global model: the package's public checkpoint for the profile, a global-model directory "
        "or .pt file (server-side path), or scratch (random, the default)",
    )
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
    p.add_argument("--batch-size", type=int, default=None, help="same as --set train.batch_size=B")
    p.add_argument("--lr", type=float, default=None, help="same as --set train.lr=LR")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--dp-model",
        action="store_true",
        help="sites run DP-SGD: refuse a VQ-VAE quantiser that is not DP-safe (vqvae.quantiser)",
    )
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
    pc.add_argument("--project", default="poc/project.yml", help="the POC project definition (prepare)")
    pc.set_defaults(func=_cmd_poc)
    pv = sub.add_parser("provision", help="startup kits for server, sites and admins from project.yml")
    pv.add_argument("--project", default="site_configs/project.yml")
    pv.add_argument("--workspace", default="workspaces/provision")
    pv.set_defaults(func=_cmd_provision)
    return fl

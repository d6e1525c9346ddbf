"""``synthbrain tune``: hyper-parameter search over federated runs with Optuna.

    synthbrain tune --job vqvae --space space.yaml --trials 30 --study NAME [--out runs/tune-NAME]

Every trial is a federated run of the job with the trial's profile: by default the in-process federation
(:func:`fl_app.fl.inprocess.federate`: the clients' own local training functions and the server's own
aggregation strategy, no transport), or a real NVFlare simulator job with ``--env sim``. After each round
the new global model is evaluated on held-out data and the value is reported to the trial, so the pruner
(median or Hyperband) stops trials that fall behind the others at the same round.

The search space is a YAML mapping of profile keys (the dotted paths of ``--set``) to ranges or choices::

    vqvae.lr: {low: 0.0005, high: 0.005, log: true}
    vqvae.num_embeddings: {choices: [256, 512]}
    train.batch_size: {low: 2, high: 8, step: 2}

Every key is checked against the profile schema (an unknown key is an error naming it), and every bound
and choice is validated as a profile value before the study starts. ``vqvae.*`` and ``train.*`` keys tune
the ``vqvae`` job, ``prior.*`` and ``train.*`` keys the ``prior`` job (whose grid and codes are the frozen
VQ-VAE's).

Objectives (``--objective``, several for a multi-objective study; pruning needs exactly one): ``psnr`` and
``dice`` (held-out, maximised) for the VQ-VAE, ``bits`` (held-out bits per code, minimised) for the prior.

Sites: simulated by default (``--sites``, ``--subjects``, plus a held-out site drawn from another seed),
or the sites of ``--site-config-dir`` (site YAMLs, as ``synthbrain fl run``), where the held-out metric is
the sample-weighted mean over each site's validation split. A site whose YAML enables DP trains with DP-SGD
in every trial and every trial's spend goes to the site's privacy ledger; the study's total ε is printed
before anything runs, and a study that would exceed a site's budget is refused (docs/PRIVACY.md).

Storage: ``OUT/study.db`` (SQLite) unless ``--storage URL`` (e.g. PostgreSQL, for several machines running
trials of one study); a study is resumed by running the same command again (``--trials`` is the study's
total of finished trials). Outputs in ``OUT``: ``best.yaml`` (a profile overlay for ``--set-file``),
``report.html`` (Optuna's plots with plotly inline, offline, and a summary table) and ``summary.json``.
"""

from __future__ import annotations

import argparse
import html
import json
import logging
import math
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fl_app.config import (
    ConfigError,
    Profile,
    add_set_args,
    check_profile_key,
    load_profile,
    nest_overrides,
    overrides_from_args,
    write_set_file,
)

log = logging.getLogger(__name__)

__all__ = [
    "OBJECTIVES",
    "ParamSpec",
    "add_tune_parser",
    "load_space",
    "run_tune",
]

OBJECTIVES: dict[str, tuple[str, str, str]] = {
    # name: (job, held-out metric key, direction)
    "psnr": ("vqvae", "psnr_db", "maximize"),
    "dice": ("vqvae", "dice_mean", "maximize"),
    "bits": ("prior", "bits_per_code", "minimize"),
}
DEFAULT_OBJECTIVE = {"vqvae": "psnr", "prior": "bits"}
JOB_SECTIONS = {"vqvae": ("vqvae", "train"), "prior": ("prior", "train")}
_SPEC_KEYS = {"low", "high", "log", "step", "choices"}


# --------------------------------------------------------------------------- search space


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


@dataclass
class ParamSpec:
    """One searched profile key: a range (``low``, ``high``, ``log``, ``step``) or ``choices``."""

    key: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list[Any] | None = None

    @property
    def encoded(self) -> bool:
        """Choices that are not plain scalars (e.g. ``vqvae.channels`` lists) are offered as JSON strings."""
        return self.choices is not None and any(isinstance(c, (list, dict)) for c in self.choices)

    @property
    def integer(self) -> bool:
        return self.choices is None and all(_is_int(v) for v in (self.low, self.high, self.step or 1))

    def distribution_choices(self) -> list[Any]:
        assert self.choices is not None
        return [json.dumps(c) for c in self.choices] if self.encoded else list(self.choices)

    def suggest(self, trial: Any) -> Any:
        if self.choices is not None:
            v = trial.suggest_categorical(self.key, self.distribution_choices())
            return json.loads(v) if self.encoded else v
        if self.integer:
            return trial.suggest_int(
                self.key, int(self.low), int(self.high), step=int(self.step or 1), log=self.log
            )
        return trial.suggest_float(self.key, float(self.low), float(self.high), step=self.step, log=self.log)

    def decode(self, value: Any) -> Any:
        """A stored Optuna parameter value -> the profile value."""
        return json.loads(value) if self.encoded else value

    def encode(self, value: Any) -> Any:
        """A profile value -> the Optuna parameter value (for enqueueing the baseline)."""
        return json.dumps(value) if self.encoded else value

    def contains(self, value: Any) -> bool:
        """Whether the profile value ``value`` is a point of this space (the baseline can be enqueued)."""
        if self.choices is not None:
            norm = json.loads(json.dumps(value))
            return any(json.loads(json.dumps(c)) == norm for c in self.choices)
        if not _is_num(value) or not self.low <= value <= self.high:
            return False
        if self.integer and not _is_int(value):
            return False
        if self.step:
            k = (value - self.low) / self.step
            return abs(k - round(k)) < 1e-9
        return True

    def probe_values(self) -> list[Any]:
        """Values that must each give a valid profile: the bounds, or every choice."""
        return list(self.choices) if self.choices is not None else [self.low, self.high]


def _parse_spec(key: str, spec: Any, source: str) -> ParamSpec:
    where = f"{source}: {key}"
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: expected a mapping with low/high[/log/step] or choices, got {spec!r}")
    unknown = sorted(set(spec) - _SPEC_KEYS)
    if unknown:
        raise ConfigError(
            f"{where}: unknown field(s) {', '.join(unknown)} (allowed: low, high, log, step, choices)"
        )
    if "choices" in spec:
        extra = sorted(set(spec) - {"choices"})
        if extra:
            raise ConfigError(f"{where}: choices cannot be combined with {', '.join(extra)}")
        ch = spec["choices"]
        if not isinstance(ch, list) or not ch:
            raise ConfigError(f"{where}: choices must be a non-empty list")
        return ParamSpec(key, choices=list(ch))
    if "low" not in spec or "high" not in spec:
        raise ConfigError(f"{where}: a range needs both low and high (or give choices)")
    low, high, step, log_ = spec["low"], spec["high"], spec.get("step"), spec.get("log", False)
    if isinstance(low, str):  # YAML 1.1 reads 1e-4 as a string
        low = _float_or(low, where)
    if isinstance(high, str):
        high = _float_or(high, where)
    if not (_is_num(low) and _is_num(high)):
        raise ConfigError(f"{where}: low and high must be numbers, got {low!r} and {high!r}")
    if not low < high:
        raise ConfigError(f"{where}: low ({low}) must be smaller than high ({high})")
    if not isinstance(log_, bool):
        raise ConfigError(f"{where}: log must be true or false")
    if step is not None:
        if isinstance(step, str):
            step = _float_or(step, where)
        if not _is_num(step) or step <= 0:
            raise ConfigError(f"{where}: step must be a positive number, got {step!r}")
        if log_:
            raise ConfigError(f"{where}: log and step cannot be combined")
    if log_ and low <= 0:
        raise ConfigError(f"{where}: a log range needs low > 0, got {low}")
    return ParamSpec(key, low=low, high=high, log=log_, step=step)


def _float_or(v: str, where: str) -> float:
    try:
        return float(v)
    except ValueError:
        raise ConfigError(f"{where}: {v!r} is not a number") from None


def load_space(
    path: str | Path, job: str, profile: str = "cpu-demo", base: dict[str, Any] | None = None
) -> list[ParamSpec]:
    """Read and check a search-space YAML for ``job``: every key a profile key of the job's sections, every
    bound / choice a valid value of the profile (``profile`` with the ``base`` overrides)."""
    from fl_app.config import _deep_merge, _read_yaml

    path = Path(path)
    raw = _read_yaml(path)
    if not raw:
        raise ConfigError(f"{path}: the search space is empty")
    specs = []
    for key, spec in raw.items():
        key = str(key)
        if key.startswith("data."):
            check_profile_key(key, str(path))  # an unknown data.* key is named as unknown first
            raise ConfigError(
                f"{path}: {key}: data.* keys fix the grid every site preprocesses to; not tunable"
            )
        check_profile_key(key, str(path), JOB_SECTIONS[job])
        specs.append(_parse_spec(key, spec, str(path)))
    for s in specs:
        for v in s.probe_values():
            try:
                load_profile(profile, _deep_merge(base or {}, nest_overrides({s.key: v})))
            except ConfigError as exc:
                msg = str(exc).split(": ", 1)[-1]
                raise ConfigError(f"{path}: {s.key}: value {v!r} is not valid: {msg}") from None
    return specs


def _profile_value(profile: Profile, key: str) -> Any:
    section, name = key.split(".", 1)
    v = getattr(getattr(profile, section), name)
    return json.loads(json.dumps(v, default=list))  # tuples -> lists, as YAML gives them


# --------------------------------------------------------------------------- sites and held-out data


@dataclass
class StudyData:
    """The sites (their YAMLs) and what the held-out metric is computed on."""

    site_config_dir: Path
    clients: list[str]
    held_out_bids: Path | None  # simulated: a held-out site from another seed; None: the sites' val splits
    description: str


def _prepare_data(args: argparse.Namespace, out: Path, profile: Profile) -> StudyData:
    from fl_app.config import write_site_yaml
    from fl_app.fl.run import list_site_configs

    if args.site_config_dir:
        d = Path(args.site_config_dir).resolve()
        return StudyData(
            d, list_site_configs(d), None, f"sites of {d} (held out: each site's validation split)"
        )
    from fl_app.data.simulate import simulate_sites

    params = {"sites": args.sites, "subjects": args.subjects, "held_subjects": args.held_subjects,
              "seed": args.data_seed, "spacing": list(profile.data.spacing)}  # fmt: skip
    marker = out / "data" / "data.json"
    if marker.is_file():
        had = json.loads(marker.read_text())
        if had != params:
            raise ConfigError(
                f"{out}: this study's simulated data was made with {had}, not {params}: give the same "
                "--sites/--subjects/--held-subjects/--data-seed, or another --out / --study"
            )
    cfg_dir = out / "site_configs"
    if not marker.is_file():
        print(f"simulating {args.sites} sites × {args.subjects} subjects + a held-out site ...", flush=True)
        sites = simulate_sites(out / "data" / "sites", args.sites, args.subjects, profile, args.data_seed)
        simulate_sites(out / "data" / "held", 1, args.held_subjects, profile, args.data_seed + 1000)
        for p in sites:
            write_site_yaml(
                cfg_dir / f"{p.name}.yaml",
                {"name": p.name, "bids_dir": str(p.resolve()), "profile": args.profile,
                 "cache_dir": str((out / "cache" / p.name).resolve()), "min_subjects": 2,
                 "compute": {"device": "cpu"}},
            )  # fmt: skip
        marker.write_text(json.dumps(params))
    held = (out / "data" / "held" / "site-1").resolve()
    return StudyData(
        cfg_dir.resolve(),
        list_site_configs(cfg_dir),
        held,
        f"{args.sites} simulated sites × {args.subjects} subjects (seed {args.data_seed}); held out: "
        f"{args.held_subjects} subjects of another simulated site (seed {args.data_seed + 1000})",
    )


# --------------------------------------------------------------------------- one trial


class _Evaluator:
    """Evaluates a global state on the held-out data: the simulated held-out site, or every site's
    validation split (sample-weighted mean)."""

    def __init__(self, kind: str, profile: Profile, loaders: list[tuple[Any, int]], dp: bool) -> None:
        self.kind, self.profile, self.loaders = kind, profile, loaders
        if kind == "vqvae":
            from fl_app.models.vqvae import build_vqvae

            self.net = build_vqvae(profile, dp=dp)
        else:
            from fl_app.models.prior import build_prior

            self.net = build_prior(profile)

    def __call__(self, state: dict[str, Any]) -> dict[str, float]:
        self.net.load_state_dict(state)
        self.net.eval()
        if self.kind == "vqvae":
            from fl_app.train.vqvae_local import evaluate_vqvae as evaluate
        else:
            from fl_app.train.prior_local import evaluate_prior as evaluate
        sums: dict[str, float] = {}
        total = 0
        for loader, n in self.loaders:
            m = evaluate(self.net, loader)
            for k, v in m.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "n_volumes":
                    sums[k] = sums.get(k, 0.0) + n * float(v)
            total += n
        return {k: v / total for k, v in sums.items()} | {"n_held_out": float(total)}


def _client_args(args: argparse.Namespace, kind: str, run: str) -> argparse.Namespace:
    """The arguments a job's client gets (``fl_app.fl.client.add_common_client_args``)."""
    from fl_app.fl.client import add_common_client_args

    argv = [kind, "--max-steps", str(args.steps), "--seed", str(args.seed), "--rounds", str(args.rounds)]
    argv += ["--run", run] + (["--dp-epsilon", str(args.dp_epsilon)] if args.dp_epsilon else [])
    return add_common_client_args(argparse.ArgumentParser()).parse_args(argv)


class TrialRunner:
    """Runs one trial's federated job and reports each round's held-out metric to the Optuna trial."""

    def __init__(self, args: argparse.Namespace, data: StudyData, out: Path, objectives: list[str]) -> None:
        from fl_app.config import load_site_config

        self.args, self.data, self.out, self.objectives = args, data, out, objectives
        self.kind = args.job
        self.cfgs = [load_site_config(data.site_config_dir / f"{c}.yaml") for c in data.clients]
        self.any_dp = any(c.privacy.enabled for c in self.cfgs)
        self.frozen_vqvae: Path | None = None
        self.metric_key = OBJECTIVES[objectives[0]][1]

    # ---- reporting (one code path for every environment)
    def report(self, trial: Any, rnd: int, metrics: dict[str, float], bar: Any) -> None:
        """Record round ``rnd``'s held-out metrics on ``trial``; single objective: report the value to the
        pruner and raise ``optuna.TrialPruned`` when it says so."""
        import optuna

        trial.set_user_attr(f"round_{rnd}", metrics)
        value = metrics.get(self.metric_key, math.nan)
        if bar is not None:
            bar.update(1)
            bar.set_postfix({self.objectives[0]: f"{value:.4g}"})
        if len(self.objectives) == 1:
            if not math.isfinite(value):  # a diverged trial: worst possible, and stop it
                trial.set_user_attr("diverged_round", rnd)
                raise optuna.TrialPruned(f"held-out {self.metric_key} is {value} at round {rnd}")
            trial.report(value, rnd)
            if trial.should_prune():
                raise optuna.TrialPruned(f"round {rnd}: held-out {self.metric_key} {value:.4g}")

    def values(self, metrics: dict[str, float]) -> list[float]:
        return [float(metrics.get(OBJECTIVES[o][1], math.nan)) for o in self.objectives]

    # ---- the held-out loaders
    def _held_out(self, profile: Profile, tasks: list[Any] | None, vq: Any = None) -> list[tuple[Any, int]]:
        if self.data.held_out_bids is None:
            assert tasks is not None
            return [(t.val_loader, t.n_val) for t in tasks if t.val_loader is not None and t.n_val]
        from fl_app.data.cohort import read_bids
        from fl_app.data.dataset import SiteDataset

        ds = SiteDataset(
            read_bids(self.data.held_out_bids).valid(), profile, cache_dir=self.out / "cache" / "held"
        )
        bs = profile.train.batch_size
        if self.kind == "vqvae":
            from torch.utils.data import DataLoader

            from fl_app.train.vqvae_local import vqvae_collate

            return [(DataLoader(ds, batch_size=bs, shuffle=False, collate_fn=vqvae_collate), len(ds))]
        from fl_app.train.prior_local import encode_codes, make_prior_loader

        codes = encode_codes(vq, ds, self.out / "cache" / "held_codes", self._vq_key())
        return [(make_prior_loader(codes, bs, shuffle=False), len(codes))]

    def _vq_key(self) -> str:
        from fl_app.data.nifti import file_sha256

        assert self.frozen_vqvae is not None
        return file_sha256(self.frozen_vqvae)[:16]

    # ---- the prior's frozen VQ-VAE
    def ensure_vqvae(self, base_profile: Profile) -> Path:
        """The prior job's frozen VQ-VAE: ``--vqvae``, else one trained once per study in-process with the
        base profile and the study's trial size (``OUT/vqvae_for_prior.pt``, reused on resume)."""
        if self.args.vqvae:
            p = Path(self.args.vqvae)
            for cand in (p, p / "vqvae.pt", p / "global_vqvae.pt", p / "fl" / "vqvae" / "global_vqvae.pt"):
                if cand.is_file():
                    self.frozen_vqvae = cand.resolve()
                    return self.frozen_vqvae
            raise ConfigError(f"--vqvae {p}: no VQ-VAE checkpoint there (vqvae.pt / global_vqvae.pt)")
        path = self.out / "vqvae_for_prior.pt"
        if not path.is_file():
            from fl_app.models.vqvae import build_vqvae, save_vqvae

            print(
                f"training the prior's frozen VQ-VAE once ({self.args.rounds} rounds × {self.args.steps} steps) ..."
            )
            state = self._federate_inprocess("vqvae", base_profile, None, None)
            vq = build_vqvae(base_profile, dp=self.any_dp)
            vq.load_state_dict(state)
            save_vqvae(
                vq, base_profile, path, extra={"made_by": "synthbrain tune (the prior study's VQ-VAE)"}
            )
        self.frozen_vqvae = path.resolve()
        return self.frozen_vqvae

    # ---- in-process federation
    def _federate_inprocess(self, kind: str, profile: Profile, trial: Any, bar: Any) -> dict[str, Any]:
        import torch

        from fl_app.fl.client import TASKS, planned_steps
        from fl_app.fl.inprocess import LocalSite, federate
        from fl_app.fl.local_dp import SiteDP
        from fl_app.fl.server import FROZEN_PREFIX, build_initial_state

        prof_dict = profile.model_dump(mode="json")
        params, prof_dict = build_initial_state(
            kind, prof_dict, dp=self.any_dp, frozen_vqvae=str(self.frozen_vqvae or ""), seed=self.args.seed
        )
        from fl_app.config import profile_from_dict

        profile = profile_from_dict(prof_dict, source="trial profile")
        state = {k: torch.as_tensor(v) for k, v in params.items() if not k.startswith(FROZEN_PREFIX)}
        run = f"tune-{self.args.study}"
        job_id = f"{run}-trial-{trial.number}" if trial is not None else f"{run}-vqvae-for-prior"
        cargs = _client_args(self.args, kind, run)
        tasks, sites = [], []
        device = torch.device("cpu")
        for name, cfg in zip(self.data.clients, self.cfgs, strict=True):
            task = TASKS[kind](cargs, cfg, device, True)
            task.setup(params, profile, 0)
            max_steps, per_round = planned_steps(cargs, cfg, len(task.train_loader))
            dp = None
            if cfg.privacy.enabled:
                dp = SiteDP(cfg, job_id, kind, self.args.rounds, self.args.dp_epsilon, run)
                task.model, task.optimizer, task.train_loader = dp.make_private(
                    task.model, task.optimizer, task.train_loader, per_round
                )
            tasks.append(task)
            sites.append(
                LocalSite(name, task.model, task.optimizer, task.train_loader, dp=dp, seed=self.args.seed)
            )
            steps = max_steps or self.args.steps
        on_round = None
        if trial is not None:
            vq = None
            if kind == "prior":
                from fl_app.models.vqvae import load_vqvae

                vq, _ = load_vqvae(self.frozen_vqvae)
            evaluate = _Evaluator(kind, profile, self._held_out(profile, tasks, vq), self.any_dp)

            def on_round(rnd: int, new_state: dict[str, Any], updates: list) -> None:
                self.last_metrics = evaluate(new_state)
                self.report(trial, rnd, self.last_metrics, bar)

        fed = federate(kind, profile, sites, state, rounds=self.args.rounds, steps=steps, on_round=on_round)
        if trial is not None:
            trial.set_user_attr("steps_per_site", fed.steps_per_site)
            if fed.refused:
                trial.set_user_attr("refused_rounds", fed.refused)
            eps = {s.name: s.dp.job_epsilon() for s in sites if s.dp is not None}
            if eps:
                trial.set_user_attr("site_epsilon", eps)
        return fed.state

    # ---- NVFlare simulator
    def _federate_sim(self, profile: Profile, trial: Any, bar: Any) -> None:
        from fl_app.fl.run import run_job
        from fl_app.run_layout import RunLayout

        run_dir = (self.out / "trials" / f"trial-{trial.number:04d}").resolve()
        layout = RunLayout(run_dir)
        evaluate = None
        for rnd in range(self.args.rounds):
            # one simulator job per round, each resuming from the last round's checkpoint, so the pruner can
            # stop the trial between rounds (the sites plan their DP noise for all --rounds)
            run_job(
                self.kind, "sim", run_dir, clients=self.data.clients, site_config_dir=self.data.site_config_dir,
                profile=profile.model_dump(mode="json"), num_rounds=rnd + 1, planned_rounds=self.args.rounds,
                max_steps=self.args.steps, seed=self.args.seed, dp_epsilon=self.args.dp_epsilon,
                dp=self.any_dp or None, frozen_vqvae=str(self.frozen_vqvae) if self.frozen_vqvae else None,
            )  # fmt: skip
            gfile = layout.global_file(self.kind)
            if self.kind == "vqvae":
                from fl_app.models.vqvae import load_vqvae

                model, prof = load_vqvae(gfile)
                vq = None
            else:
                from fl_app.models.prior import load_prior
                from fl_app.models.vqvae import load_vqvae

                model, prof = load_prior(gfile)
                vq, _ = load_vqvae(self.frozen_vqvae)
            if evaluate is None:
                tasks = self._sim_val_tasks(prof) if self.data.held_out_bids is None else None
                evaluate = _Evaluator(self.kind, prof, self._held_out(prof, tasks, vq), self.any_dp)
            self.last_metrics = evaluate(model.state_dict())
            self.report(trial, rnd, self.last_metrics, bar)

    def _sim_val_tasks(self, profile: Profile) -> list[Any]:
        """The sites' validation splits (as their clients split them) for the held-out metric of ``--env sim``."""
        import torch

        from fl_app.fl.client import TASKS
        from fl_app.fl.server import build_initial_state

        cargs = _client_args(self.args, self.kind, f"tune-{self.args.study}")
        params, _ = build_initial_state(
            self.kind, profile.model_dump(mode="json"), frozen_vqvae=str(self.frozen_vqvae or "")
        )
        tasks = []
        for cfg in self.cfgs:
            t = TASKS[self.kind](cargs, cfg, torch.device("cpu"), True)
            t.setup(params, profile, 0)
            tasks.append(t)
        return tasks

    def __call__(self, trial: Any, specs: list[ParamSpec], base: dict[str, Any]) -> list[float] | float:
        from tqdm import tqdm

        from fl_app.config import _deep_merge

        values = {s.key: s.suggest(trial) for s in specs}
        profile = load_profile(self.args.profile, _deep_merge(base, nest_overrides(values)))
        trial.set_user_attr("overrides", values)
        self.last_metrics: dict[str, float] = {}
        t0 = time.perf_counter()
        bar = tqdm(
            total=self.args.rounds, desc=f"trial {trial.number}", unit="round", leave=True,
            disable=self.args.quiet, file=sys.stderr,
        )  # fmt: skip
        try:
            if self.args.env == "sim":
                self._federate_sim(profile, trial, bar)
            else:
                self._federate_inprocess(self.kind, profile, trial, bar)
        finally:
            bar.close()
            trial.set_user_attr("seconds", time.perf_counter() - t0)
            trial.set_user_attr("held_out", self.last_metrics)
        vals = self.values(self.last_metrics)
        return vals[0] if len(vals) == 1 else vals


# --------------------------------------------------------------------------- privacy before the study


def _dp_plan(runner: TrialRunner, profile: Profile, n_trials: int) -> list[dict[str, Any]]:
    """Per DP site: the ε the remaining ``n_trials`` trials plan to spend on top of its ledger (each trial's
    (σ, q, rounds × steps) as its client plans them, at the base profile's batch size)."""
    from fl_app.data.dataset import split_indices
    from fl_app.fl.client import open_site_dataset, planned_steps
    from fl_app.fl.local_dp import ledger_path
    from fl_app.privacy.accountant import PrivacyLedger, epsilon_from_history, noise_multiplier_for

    args = runner.args
    cargs = _client_args(args, runner.kind, f"tune-{args.study}")
    plans = []
    for cfg in runner.cfgs:
        if not cfg.privacy.enabled:
            continue
        p = cfg.privacy
        n = len(open_site_dataset(cfg, profile))
        n_train = len(split_indices(n, profile.train.val_fraction, args.seed)[0])
        bs = cfg.training.batch_size or profile.train.batch_size
        q = 1.0 / max(math.ceil(n_train / bs), 1)
        _, per_round = planned_steps(cargs, cfg, max(math.ceil(n_train / bs), 1))
        steps = per_round * args.rounds
        target = args.dp_epsilon if args.dp_epsilon is not None else p.job_epsilon
        if p.noise_multiplier is not None:
            sigma = float(p.noise_multiplier)
        elif target is not None:
            sigma = noise_multiplier_for(target, p.delta, q, steps, p.accountant)
        else:
            raise ConfigError(
                f"site {cfg.name}: DP is enabled but no noise multiplier: set privacy.noise_multiplier or "
                "privacy.job_epsilon in its YAML, or give --dp-epsilon (the ε of each trial)"
            )
        ledger = PrivacyLedger(ledger_path(cfg), cfg.name, p.accountant)
        spent_hist = [e.triple() for e in ledger.entries()]
        spent = epsilon_from_history(spent_hist, p.delta, p.accountant)
        per_trial = epsilon_from_history([(sigma, q, steps)], p.delta, p.accountant)
        total = epsilon_from_history([*spent_hist, *[(sigma, q, steps)] * n_trials], p.delta, p.accountant)
        plans.append({"site": cfg.name, "sigma": sigma, "q": q, "steps_per_trial": steps,
                      "epsilon_per_trial": per_trial, "trials": n_trials, "spent": spent,
                      "total_after_study": total, "budget": p.epsilon_budget, "delta": p.delta})  # fmt: skip
    return plans


# --------------------------------------------------------------------------- outputs


def _trial_rows(study: Any, specs: list[ParamSpec], objectives: list[str]) -> list[dict[str, Any]]:
    by_key = {s.key: s for s in specs}
    rows = []
    for t in study.trials:
        rounds = sorted(int(k.split("_")[1]) for k in t.user_attrs if k.startswith("round_"))
        rows.append({
            "number": t.number,
            "state": t.state.name,
            "baseline": bool(t.user_attrs.get("baseline", False)),
            "values": dict(zip(objectives, t.values, strict=True)) if t.values else None,
            "params": {k: by_key[k].decode(v) if k in by_key else v for k, v in t.params.items()},
            "rounds_run": (rounds[-1] + 1) if rounds else 0,
            "seconds": t.user_attrs.get("seconds"),
            "held_out": t.user_attrs.get("held_out"),
        })  # fmt: skip
    return rows


def _best_trials(study: Any) -> list[Any]:
    try:
        return list(study.best_trials)
    except ValueError:
        return []


def write_outputs(
    study: Any, specs: list[ParamSpec], objectives: list[str], args: argparse.Namespace, out: Path,
    base: dict[str, Any], data: StudyData, privacy: list[dict[str, Any]],
) -> dict[str, Any]:  # fmt: skip
    """``best.yaml``, ``summary.json`` and ``report.html`` from the study as stored."""
    rows = _trial_rows(study, specs, objectives)
    best = _best_trials(study)
    summary: dict[str, Any] = {
        "study": study.study_name, "job": args.job, "profile": args.profile, "env": args.env,
        "objectives": {o: OBJECTIVES[o][2] for o in objectives}, "base_overrides": base,
        "trial_size": {"sites": len(data.clients), "rounds": args.rounds, "steps": args.steps},
        "data": data.description, "pruner": args.pruner if len(objectives) == 1 else "none (multi-objective)",
        "states": {s: sum(r["state"] == s for r in rows) for s in sorted({r["state"] for r in rows})},
        "trials": rows, "privacy": privacy,
    }  # fmt: skip
    secs = [r["seconds"] for r in rows if r["seconds"] is not None and r["state"] in ("COMPLETE", "PRUNED")]
    summary["seconds_per_trial_mean"] = sum(secs) / len(secs) if secs else None
    if best:
        first = OBJECTIVES[objectives[0]]
        sign = 1 if first[2] == "maximize" else -1
        b = max(best, key=lambda t: sign * t.values[0])
        by_key = {s.key: s for s in specs}
        best_values = {k: by_key[k].decode(v) for k, v in b.params.items() if k in by_key}
        flat_base = {f"{sec}.{k}": v for sec, d in base.items() for k, v in d.items()}
        comment = (
            f"synthbrain tune: best trial {b.number} of study {study.study_name!r} ({args.job} job, profile "
            f"{args.profile})\n"
            + ", ".join(f"held-out {o} = {v:.4f}" for o, v in zip(objectives, b.values, strict=True))
            + f"\napply with: --profile {args.profile} --set-file best.yaml"
        )
        write_set_file(out / "best.yaml", {**flat_base, **best_values}, comment)
        summary["best"] = {"number": b.number, "values": dict(zip(objectives, b.values, strict=True)),
                           "params": best_values, "file": str(out / "best.yaml")}  # fmt: skip
        summary["pareto_front"] = [t.number for t in best] if len(objectives) > 1 else None
        base_rows = [r for r in rows if r["baseline"] and r["state"] == "COMPLETE"]
        if base_rows:
            bv = base_rows[0]["values"][objectives[0]]
            summary["baseline"] = {"number": base_rows[0]["number"], "values": base_rows[0]["values"]}
            summary["best_minus_baseline"] = sign * (b.values[0] - bv)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    _write_html(study, summary, objectives, out / "report.html")
    return summary


def _figures(study: Any, objectives: list[str]) -> list[tuple[str, Any]]:
    import optuna.visualization as vis

    names = [f"held-out {o}" for o in objectives]
    figs: list[tuple[str, Any]] = []
    multi = len(objectives) > 1
    target = (lambda t: t.values[0]) if multi else None
    plots = [
        (
            "Optimisation history",
            lambda: vis.plot_optimization_history(study, target=target, target_name=names[0]),
        ),
        ("Held-out metric per round (pruning)", lambda: vis.plot_intermediate_values(study)),
        (
            "Parameter importances",
            lambda: vis.plot_param_importances(study, target=target, target_name=names[0]),
        ),
        (
            "Parallel coordinates",
            lambda: vis.plot_parallel_coordinate(study, target=target, target_name=names[0]),
        ),
    ]
    if multi:
        plots.insert(0, ("Pareto front", lambda: vis.plot_pareto_front(study, target_names=names)))
    for title, make in plots:
        try:
            figs.append((title, make()))
        except Exception as exc:  # too few trials for a plot (e.g. importances need two complete ones)
            figs.append((title, f"not available yet: {exc}"))
    return figs


def _fmt_param(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else json.dumps(v)


def _write_html(study: Any, summary: dict[str, Any], objectives: list[str], path: Path) -> None:
    """One self-contained page: plotly.js inline (no network), Optuna's plots and the trials table."""
    esc = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>synthbrain tune: {esc(summary['study'])}</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse}"
        "td,th{border:1px solid #bbb;padding:3px 8px;font-size:13px}th{background:#eee}"
        "tr.best{background:#e6ffe6}tr.PRUNED{color:#888}</style></head><body>",
        f"<h1>synthbrain tune: study {esc(summary['study'])}</h1>",
        f"<p>Job <b>{esc(summary['job'])}</b>, profile <b>{esc(summary['profile'])}</b>, env "
        f"<b>{esc(summary['env'])}</b>; objectives: "
        + ", ".join(f"held-out {esc(o)} ({d})" for o, d in summary["objectives"].items())
        + f"; pruner: {esc(str(summary['pruner']))}. Data: {esc(summary['data'])}. Trial size: "
        + f"{summary['trial_size']['sites']} sites, {summary['trial_size']['rounds']} rounds × "
        + f"{summary['trial_size']['steps']} local steps. Trials: "
        + ", ".join(f"{n} {s.lower()}" for s, n in summary["states"].items())
        + ".</p>",
    ]
    if "best" in summary:
        b = summary["best"]
        parts.append(
            f"<p><b>Best: trial {b['number']}</b> "
            + ", ".join(f"{esc(k)} = {v:.4f}" for k, v in b["values"].items())
            + " with "
            + ", ".join(f"<code>{esc(k)}={esc(_fmt_param(v))}</code>" for k, v in b["params"].items())
            + " (written to <code>best.yaml</code>)."
        )
        if "best_minus_baseline" in summary:
            parts.append(
                f" Baseline (the profile's values, trial {summary['baseline']['number']}): "
                + ", ".join(f"{esc(k)} = {v:.4f}" for k, v in summary["baseline"]["values"].items())
                + f"; best − baseline = {summary['best_minus_baseline']:+.4f} (in the objective's favour)."
            )
        parts.append("</p>")
    for p in summary["privacy"]:
        parts.append(
            f"<p>Privacy, site {esc(p['site'])}: ε {p['epsilon_per_trial']:.3g} per trial, {p['trials']} "
            f"trials planned, total {p['total_after_study']:.3g} (budget {p['budget']}) at δ {p['delta']:g}.</p>"
        )
    keys = sorted({k for r in summary["trials"] for k in r["params"]})
    head = ["#", "state", *[f"held-out {o}" for o in objectives], *keys, "rounds", "seconds"]
    parts.append("<h2>Trials</h2><table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr>")
    best_n = summary.get("best", {}).get("number")
    for r in summary["trials"]:
        vals = [r["values"][o] if r["values"] else None for o in objectives]
        if r["values"] is None and r["held_out"]:
            vals = [r["held_out"].get(OBJECTIVES[o][1]) for o in objectives]  # pruned: its last round
        cells = [
            str(r["number"]) + (" (baseline)" if r["baseline"] else ""),
            r["state"].lower(),
            *[f"{v:.4f}" if isinstance(v, float) and math.isfinite(v) else "" for v in vals],
            *[_fmt_param(r["params"][k]) if k in r["params"] else "" for k in keys],
            str(r["rounds_run"]),
            f"{r['seconds']:.0f}" if r["seconds"] is not None else "",
        ]
        cls = "best" if r["number"] == best_n else r["state"]
        parts.append(f"<tr class='{cls}'>" + "".join(f"<td>{esc(c)}</td>" for c in cells) + "</tr>")
    parts.append("</table>")
    first = True
    for title, fig in _figures(study, objectives):
        parts.append(f"<h2>{esc(title)}</h2>")
        if isinstance(fig, str):
            parts.append(f"<p>{esc(fig)}</p>")
            continue
        parts.append(fig.to_html(full_html=False, include_plotlyjs=first))  # plotly.js once, inline
        first = False
    parts.append("</body></html>")
    path.write_text("\n".join(parts))


# --------------------------------------------------------------------------- the command


def _pruner(args: argparse.Namespace) -> Any:
    import optuna

    if args.pruner == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=args.pruner_startup, n_warmup_steps=args.pruner_warmup
        )
    if args.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=args.rounds, reduction_factor=3)
    return optuna.pruners.NopPruner()


def _storage(args: argparse.Namespace, out: Path) -> Any:
    import optuna

    url = args.storage or f"sqlite:///{(out / 'study.db').resolve()}"
    # heartbeats: a trial whose process died (crash, kill) is marked failed when the study is resumed
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(url, heartbeat_interval=60, grace_period=180)


def run_tune(args: argparse.Namespace) -> int:
    import optuna

    objectives = args.objective or [DEFAULT_OBJECTIVE[args.job]]
    for o in objectives:
        if OBJECTIVES[o][0] != args.job:
            raise ConfigError(f"--objective {o} is for the {OBJECTIVES[o][0]} job, not {args.job}")
    if len(set(objectives)) != len(objectives):
        raise ConfigError(f"--objective: each objective once, got {objectives}")
    out = Path(args.out or f"runs/tune-{args.study}")
    out.mkdir(parents=True, exist_ok=True)
    base = overrides_from_args(args)
    base_profile = load_profile(args.profile, base)
    specs = load_space(args.space, args.job, args.profile, base)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.quiet:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
    if not getattr(args, "verbose", False):  # the progress bars say it; -v: every epoch's log line
        for name in ("fl_app.train", "fl_app.fl", "fl_app.data"):
            logging.getLogger(name).setLevel(logging.WARNING)
    data = _prepare_data(args, out, base_profile)
    runner = TrialRunner(args, data, out, objectives)
    directions = [OBJECTIVES[o][2] for o in objectives]
    study = optuna.create_study(
        study_name=args.study, storage=_storage(args, out), directions=directions, load_if_exists=True,
        sampler=optuna.samplers.RandomSampler(seed=args.seed) if args.sampler == "random"
        else optuna.samplers.TPESampler(seed=args.seed),
        pruner=_pruner(args),
    )  # fmt: skip
    finished_states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    done = len(study.get_trials(deepcopy=False, states=finished_states))
    todo = max(args.trials - done, 0)
    print(
        f"study {args.study!r}: {args.job} job, {len(specs)} parameters, objectives "
        f"{', '.join(f'{o} ({OBJECTIVES[o][2]})' for o in objectives)}; {done} trials finished, {todo} to run "
        f"(--trials {args.trials}); storage {args.storage or out / 'study.db'}",
        flush=True,
    )
    print(f"data: {data.description}", flush=True)
    privacy: list[dict[str, Any]] = []
    if runner.any_dp:
        privacy = _dp_plan(runner, base_profile, todo)
        for p in privacy:
            print(
                f"privacy: site {p['site']}: each trial spends ε {p['epsilon_per_trial']:.3g} (σ {p['sigma']:.3g}, "
                f"q {p['q']:.3g}, {p['steps_per_trial']} DP steps); already spent {p['spent']:.3g}; after "
                f"{p['trials']} trials: total ε {p['total_after_study']:.3g} at δ {p['delta']:g} "
                f"(budget {p['budget']})",
                flush=True,
            )
        over = [p for p in privacy if p["budget"] is not None and p["total_after_study"] > p["budget"]]
        if over and todo:
            raise ConfigError(
                "the study would exceed the privacy budget of "
                + ", ".join(f"{p['site']} (ε {p['total_after_study']:.3g} > {p['budget']})" for p in over)
                + ": lower --trials, --rounds or --steps (or tune on simulated / public data: docs/PRIVACY.md)"
            )
        print(f"privacy: the {len(privacy)} DP site(s)' ledgers record every trial's spend", flush=True)
    if args.job == "prior":
        runner.ensure_vqvae(base_profile)
        print(f"prior: frozen VQ-VAE {runner.frozen_vqvae}", flush=True)
    if not study.trials and not args.no_baseline:  # the profile's own values first: the bar to beat
        baseline = {s.key: _profile_value(base_profile, s.key) for s in specs}
        if all(s.contains(baseline[s.key]) for s in specs):
            study.enqueue_trial(
                {s.key: s.encode(baseline[s.key]) for s in specs}, user_attrs={"baseline": True}
            )
        else:
            print(
                "baseline not enqueued: the profile's values are not all inside the search space", flush=True
            )
    t0 = time.perf_counter()
    interrupted = False
    if todo:
        try:
            study.optimize(
                lambda trial: runner(trial, specs, base),
                n_trials=todo if args.storage is None else None,
                timeout=args.timeout,
                callbacks=[optuna.study.MaxTrialsCallback(args.trials, states=finished_states)],
                catch=(),
                gc_after_trial=True,
            )
        except KeyboardInterrupt:
            interrupted = True
            print(
                "interrupted: the finished trials are in the study; run the same command to resume",
                flush=True,
            )
    summary = write_outputs(study, specs, objectives, args, out, base, data, privacy)
    summary["wall_seconds_this_run"] = time.perf_counter() - t0
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    states = ", ".join(f"{n} {s.lower()}" for s, n in summary["states"].items())
    print(f"study {args.study!r}: {states}; report {out / 'report.html'}", flush=True)
    if "best" in summary:
        b = summary["best"]
        vals = ", ".join(f"{k} {v:.4f}" for k, v in b["values"].items())
        print(f"best: trial {b['number']} ({vals}): {out / 'best.yaml'}", flush=True)
        if "best_minus_baseline" in summary:
            print(
                f"best − baseline (trial {summary['baseline']['number']}): {summary['best_minus_baseline']:+.4f}"
            )
    return 130 if interrupted else 0


def add_tune_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """``synthbrain tune``."""
    p = subparsers.add_parser(
        "tune",
        help="hyper-parameter search over federated runs (Optuna): pruned trials, best.yaml, HTML report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--job", choices=["vqvae", "prior"], required=True)
    p.add_argument("--space", required=True, help="search-space YAML over profile keys")
    p.add_argument("--study", required=True, help="study name (resumed when it exists in the storage)")
    p.add_argument(
        "--trials", type=int, default=30, help="finished trials the study should have (default 30)"
    )
    p.add_argument("--out", default=None, help="output folder (default runs/tune-<study>)")
    p.add_argument("--storage", default=None, help="Optuna storage URL (default sqlite:///OUT/study.db)")
    p.add_argument("--env", choices=["inprocess", "sim"], default="inprocess",
                   help="inprocess: in-process federation (fast); sim: an NVFlare simulator job per trial")  # fmt: skip
    p.add_argument("--objective", nargs="+", choices=sorted(OBJECTIVES), default=None,
                   help="held-out objective(s): psnr, dice (vqvae), bits (prior); several = multi-objective")  # fmt: skip
    p.add_argument("--pruner", choices=["median", "hyperband", "none"], default="median")
    p.add_argument(
        "--pruner-startup", type=int, default=5, help="median: trials finished before pruning starts"
    )
    p.add_argument("--pruner-warmup", type=int, default=0, help="median: rounds before a trial can be pruned")
    p.add_argument("--sampler", choices=["tpe", "random"], default="tpe")
    p.add_argument("--seed", type=int, default=0, help="sampler seed, and every trial's training seed")
    p.add_argument("--profile", default="cpu-demo")
    add_set_args(p, help="base profile override for every trial, e.g. train.batch_size=2")
    p.add_argument("--sites", type=int, default=2, help="simulated sites (default 2)")
    p.add_argument("--subjects", type=int, default=8, help="subjects per simulated site (default 8)")
    p.add_argument("--held-subjects", type=int, default=8, help="subjects of the held-out simulated site")
    p.add_argument("--data-seed", type=int, default=0, help="simulation seed (held-out site: seed + 1000)")
    p.add_argument("--rounds", type=int, default=3, help="federated rounds per trial (default 3)")
    p.add_argument("--steps", type=int, default=10, help="local steps per site and round (default 10)")
    p.add_argument("--site-config-dir", default=None,
                   help="tune on these sites (their YAMLs) instead of simulated ones; DP sites spend privacy")  # fmt: skip
    p.add_argument("--dp-epsilon", type=float, default=None, help="target ε of each trial at each DP site")
    p.add_argument(
        "--vqvae", default=None, help="prior job: the frozen VQ-VAE (default: trained once per study)"
    )
    p.add_argument("--no-baseline", action="store_true", help="do not run the profile's own values first")
    p.add_argument("--timeout", type=float, default=None, help="stop starting trials after this many seconds")
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument("--quiet", action="store_true", help="no progress bars, Optuna warnings only")
    p.set_defaults(func=run_tune)
    return p

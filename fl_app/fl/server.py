"""Server side of the synthbrain jobs: model persistor with per-round checkpoints, and the controller.

:class:`SynthPersistor` builds the initial global model from the consortium profile (or, for the prior
job, the prior plus the *frozen* global VQ-VAE of the first job under the ``vqvae.`` prefix, so that
every client encodes its own volumes with exactly that VQ-VAE), and after every round writes
``<checkpoint_dir>/checkpoint.pt`` atomically: the global weights, the round just completed and the
per-round metrics history. It also writes the global model in synthbrain's own format
(``global_vqvae.pt`` / ``global_prior.pt``, readable by :func:`fl_app.models.vqvae.load_vqvae` /
:func:`fl_app.models.prior.load_prior`).

:class:`SynthFedAvg` is NVFlare's FedAvg controller (streaming aggregation through the pluggable
:class:`SynthAggregator`) plus *resume*: when the persistor finds a
checkpoint of round ``r``, the job continues with round ``r + 1`` instead of starting over, so a
server stopped mid-job and the job submitted again lose at most the round in flight.

``checkpoint_dir`` is absolute, or relative to the server's workspace root (production), so that it
outlives the job's own run folder.
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.abstract.model import ModelLearnable, ModelLearnableKey, make_model_learnable
from nvflare.app_common.abstract.model_persistor import ModelPersistor
from nvflare.app_common.aggregators.model_aggregator import ModelAggregator
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.workflows.fedavg import FedAvg

from fl_app.privacy.aggregation import (
    DEFAULT_STRATEGY,
    NUM_SAMPLES_KEY,
    ClientUpdate,
    load_strategy,
    weighted_metrics,
)
from fl_app.run_layout import global_file_name

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "synthbrain-fl-checkpoint/1"
FROZEN_PREFIX = "vqvae."
"""Key prefix of the frozen VQ-VAE weights shipped inside the prior job's global model."""

__all__ = [
    "CHECKPOINT_FORMAT",
    "FROZEN_PREFIX",
    "SynthAggregator",
    "SynthFedAvg",
    "SynthPersistor",
    "build_initial_state",
    "read_checkpoint",
]


def _to_numpy(state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in state.items()}


def _to_torch(params: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(np.asarray(v)) for k, v in params.items()}


def build_initial_state(
    model_kind: str,
    profile: dict[str, Any],
    dp: bool = False,
    frozen_vqvae: str = "",
    seed: int = 0,
    init: str = "",
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Initial global weights and the profile the clients must build from.

    Args:
        model_kind: ``"vqvae"`` or ``"prior"``.
        profile: resolved profile dict (``Profile.model_dump(mode="json")``).
        dp: the job is for sites running DP-SGD: refuse a VQ-VAE quantiser that is not DP-safe.
        frozen_vqvae: prior job only: the global VQ-VAE file of the first job (``global_vqvae.pt``).
        seed: torch seed of the initialisation.
        init: ``"pretrained"``, a global-model directory or a ``.pt`` file (VQ-VAE or prior; see
            :func:`fl_app.models.pretrained.resolve_init`) whose weights are the initial global model; its architecture must equal the job profile's (else
            :class:`~fl_app.config.ConfigError` naming the differing keys). ``""``: random (``scratch``).

    Returns:
        ``(params, profile_dict)``: params ``{name: array}``; for the prior, the prior's weights plus the
        VQ-VAE's under :data:`FROZEN_PREFIX`; the profile is the VQ-VAE's (grid, codebook) with the job's
        ``prior`` and ``train`` sections.
    """
    from fl_app.config import profile_from_dict

    torch.manual_seed(seed)
    if model_kind == "vqvae":
        from fl_app.models.vqvae import build_vqvae

        prof = profile_from_dict(profile, source="job profile")
        model = build_vqvae(prof, dp=dp)
        if init:
            from fl_app.models.pretrained import check_init_architecture, resolve_init
            from fl_app.models.vqvae import load_vqvae

            path = resolve_init(init, "vqvae", prof.name)
            check_init_architecture(path, "vqvae", prof)
            model.load_state_dict(load_vqvae(path)[0].state_dict())
        return _to_numpy(model.state_dict()), prof.model_dump(mode="json")
    if model_kind == "prior":
        from fl_app.models.prior import build_prior
        from fl_app.models.vqvae import load_vqvae

        if not frozen_vqvae:
            raise ValueError("the prior job needs the global VQ-VAE of the first job (frozen_vqvae)")
        vq, vq_profile = load_vqvae(frozen_vqvae)
        merged = vq_profile.model_dump(mode="json")
        for section in ("prior", "train"):
            if section in profile:
                merged[section] = profile[section]
        for section in ("finetune",):
            if section in profile:
                merged[section] = profile[section]
        prof = profile_from_dict(merged, source="prior job profile")
        prior = build_prior(prof)
        if init:
            from fl_app.models.pretrained import check_init_architecture, resolve_init
            from fl_app.models.prior import load_prior

            path = resolve_init(init, "prior", prof.name)
            check_init_architecture(path, "prior", prof)
            prior.load_state_dict(load_prior(path)[0].state_dict())
        params = _to_numpy(prior.state_dict())
        params.update({FROZEN_PREFIX + k: v for k, v in _to_numpy(vq.state_dict()).items()})
        return params, prof.model_dump(mode="json")
    raise ValueError(f"model_kind must be 'vqvae' or 'prior', got {model_kind!r}")


def read_checkpoint(path: str | Path) -> dict[str, Any] | None:
    """The checkpoint written by :class:`SynthPersistor` (``None`` if there is none)."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.exists():
        return None
    payload = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a synthbrain federated checkpoint")
    return payload


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class SynthPersistor(ModelPersistor):
    """Initial model + per-round checkpoint (with the round number) + resume for the synthbrain jobs.

    Args:
        model_kind: ``"vqvae"`` or ``"prior"``.
        profile: resolved profile dict of the consortium.
        checkpoint_dir: where ``checkpoint.pt`` and ``global_<kind>.pt`` go (absolute, or relative to
            the server workspace root).
        frozen_vqvae: prior job: path of the first job's ``global_vqvae.pt`` on the server.
        dp: the VQ-VAE is built for DP training (loss-learned codebook).
        seed: initialisation seed.
        init: ``"pretrained"`` or a server-side global-model directory / ``.pt`` file the initial global
            model is read from (``""``: random init, ``scratch``).
    """

    def __init__(
        self,
        model_kind: str = "vqvae",
        profile: dict | None = None,
        checkpoint_dir: str = "synthbrain_checkpoints",
        frozen_vqvae: str = "",
        dp: bool = False,
        seed: int = 0,
        init: str = "",
    ) -> None:
        super().__init__()
        self.init = init
        self.model_kind = model_kind
        self.profile = profile or {}
        self.checkpoint_dir = checkpoint_dir
        self.frozen_vqvae = frozen_vqvae
        self.dp = dp
        self.seed = seed
        self._resolved: Path | None = None

    def _dir(self, fl_ctx: FLContext) -> Path:
        if self._resolved is None:
            p = Path(self.checkpoint_dir)
            if not p.is_absolute():
                root = None
                try:
                    root = fl_ctx.get_engine().get_workspace().get_root_dir()
                except Exception:
                    root = os.getcwd()
                p = Path(root) / p
            p.mkdir(parents=True, exist_ok=True)
            self._resolved = p
        return self._resolved

    def load_model(self, fl_ctx: FLContext) -> ModelLearnable:
        ckpt_dir = self._dir(fl_ctx)
        payload = read_checkpoint(ckpt_dir)
        if payload is not None:
            if payload.get("model_kind") != self.model_kind:
                raise ValueError(f"{ckpt_dir}: checkpoint is of a {payload.get('model_kind')} job")
            self.log_info(
                fl_ctx, f"resuming from {ckpt_dir}/checkpoint.pt (round {payload['round']} completed)"
            )
            meta = {
                "last_round": int(payload["round"]),
                "history": payload.get("history", []),
                "profile": payload["profile"],
                "model_kind": self.model_kind,
                "dp": payload.get("dp", self.dp),
            }
            return make_model_learnable(_to_numpy_dict(payload["params"]), meta)
        frozen = self.frozen_vqvae
        if frozen and not Path(frozen).is_absolute():
            frozen = str(Path(os.getcwd()) / frozen)
        params, profile = build_initial_state(
            self.model_kind, self.profile, self.dp, frozen, self.seed, init=self.init
        )
        source = f"from {self.init}" if self.init else "random (scratch)"
        self.log_info(fl_ctx, f"initial {self.model_kind} model: {len(params)} tensors, {source}")
        meta = {
            "last_round": -1,
            "history": [],
            "profile": profile,
            "model_kind": self.model_kind,
            "dp": self.dp,
        }
        return make_model_learnable(params, meta)

    def save_model(self, model: ModelLearnable, fl_ctx: FLContext) -> None:
        ckpt_dir = self._dir(fl_ctx)
        meta = dict(model.get(ModelLearnableKey.META) or {})
        rnd = meta.get("last_round")
        if rnd is None:
            rnd = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
        rnd = -1 if rnd is None else int(rnd)
        params = _to_torch(model[ModelLearnableKey.WEIGHTS])
        payload = {
            "format": CHECKPOINT_FORMAT,
            "model_kind": self.model_kind,
            "round": rnd,
            "params": params,
            "history": meta.get("history", []),
            "profile": meta.get("profile", self.profile),
            "dp": bool(meta.get("dp", self.dp)),
        }
        _atomic_torch_save(payload, ckpt_dir / "checkpoint.pt")
        self._write_global(payload, ckpt_dir)
        self.log_info(fl_ctx, f"checkpoint of round {rnd} written to {ckpt_dir}")

    def _write_global(self, payload: dict[str, Any], ckpt_dir: Path) -> None:
        """``global_<kind>.pt`` in synthbrain's own checkpoint format."""
        from fl_app.config import profile_from_dict

        prof = profile_from_dict(payload["profile"], source="checkpoint profile")
        extra = {"round": payload["round"], "federated": True}
        tmp = ckpt_dir / (global_file_name(self.model_kind) + ".tmp")
        params = payload["params"]
        if self.model_kind == "vqvae":
            from fl_app.models.vqvae import build_vqvae, save_vqvae

            m = build_vqvae(prof, dp=payload["dp"])
            m.load_state_dict(params)
            save_vqvae(m, prof, tmp, extra=extra)
        else:
            from fl_app.models.prior import build_prior, save_prior

            m = build_prior(prof)
            m.load_state_dict({k: v for k, v in params.items() if not k.startswith(FROZEN_PREFIX)})
            save_prior(m, prof, tmp, extra=extra)
        os.replace(tmp, ckpt_dir / global_file_name(self.model_kind))


def _to_numpy_dict(params: dict[str, Any]) -> dict[str, np.ndarray]:
    return {k: (v.numpy() if isinstance(v, torch.Tensor) else np.asarray(v)) for k, v in params.items()}


class SynthFedAvg(FedAvg):
    """FedAvg (sample-weighted, pluggable aggregator) that resumes from the persistor's last round and
    tolerates sites dropping out.

    Each round the task goes to every participating site; it ends when all of them have replied, or
    ``round_timeout`` seconds after ``min_sites`` of them have (NVFlare's ``min_responses`` and
    ``wait_time_after_min_received``). The sites aggregated and the sites that did not contribute are
    recorded per round in the history (``contributing_sites`` / ``missing_sites``).

    Args:
        num_clients: clients per round (every participating site when it is at least their number).
        num_rounds: total rounds of the job (a resumed job runs only the remaining ones).
        persistor_id: the :class:`SynthPersistor` component's id.
        aggregator: a ``ModelAggregator`` (normally :class:`SynthAggregator`).
        task_name: the client task.
        min_sites: replies needed before a round may close (0: every targeted site).
        round_timeout: seconds to wait for the remaining sites once ``min_sites`` have replied (0: do not
            wait; only used when ``min_sites`` is smaller than the number of sites).
        memory_gc_rounds: NVFlare's memory clean-up (``gc.collect`` + ``malloc_trim``) every N rounds on
            the server (0: never); worth it for large models held over many rounds.
    """

    def __init__(
        self,
        num_clients: int = 2,
        num_rounds: int = 2,
        persistor_id: str = "persistor",
        aggregator: Any = None,
        task_name: str = "train",
        min_sites: int = 0,
        round_timeout: int = 0,
        memory_gc_rounds: int = 0,
    ) -> None:
        super().__init__(
            num_clients=num_clients,
            num_rounds=num_rounds,
            persistor_id=persistor_id,
            aggregator=aggregator,
            task_name=task_name,
            memory_gc_rounds=memory_gc_rounds,
        )
        if min_sites < 0 or round_timeout < 0:
            raise ValueError("min_sites and round_timeout must be >= 0")
        self.total_rounds = num_rounds
        self.min_sites = int(min_sites)
        self.round_timeout = int(round_timeout)
        self._history: list[dict[str, Any]] = []
        self._static_meta: dict[str, Any] = {}
        self._round_targets: list[str] = []

    def load_model(self) -> FLModel:
        model = super().load_model()
        meta = dict(model.meta or {})
        last = int(meta.get("last_round", -1))
        self._history = list(meta.get("history", []))
        self._static_meta = {k: meta[k] for k in ("profile", "model_kind", "dp") if k in meta}
        restore = getattr(getattr(self.aggregator, "strategy", None), "restore", None)
        if callable(restore):  # e.g. DP-FedAvg: rounds already noised, adapted clip bound
            restore(self._history)
        if last >= 0:
            self.start_round = last + 1
            self.num_rounds = max(self.total_rounds - self.start_round, 0)
            self.info(f"resuming: rounds {self.start_round}..{self.total_rounds - 1} remain")
        model.meta = {**self._static_meta, "last_round": last, "history": self._history}
        return model

    def send_model(
        self,
        task_name: str = "train",
        data: FLModel | None = None,
        targets: list[str] | None = None,
        min_responses: int | None = None,
        timeout: int = 0,
        callback: Any = None,
    ) -> None:
        """FedAvg's per-round broadcast, with this job's ``min_sites`` / ``round_timeout``."""
        names = [getattr(t, "name", t) for t in (targets or [c.name for c in self.engine.get_clients()])]
        self._round_targets = sorted(str(n) for n in names)
        if min_responses is None and self.min_sites:
            min_responses = min(self.min_sites, len(names))
        wait = self.round_timeout if min_responses and min_responses < len(names) else 0
        self.info(
            f"round {self.current_round}: task to {self._round_targets}, closes when all have replied"
            + (
                f" or {wait} s after {min_responses} have"
                if min_responses and min_responses < len(names)
                else ""
            )
        )
        self.broadcast_model(
            task_name=task_name,
            data=data,
            targets=targets,
            min_responses=min_responses,
            timeout=timeout,
            wait_time_after_min_received=wait,
            blocking=False,
            callback=callback,
        )

    def _expected_sites(self) -> set[str]:
        """The sites expected in this round: targeted now, or aggregated in an earlier round of the run."""
        known = set(self._round_targets)
        for h in self._history:
            known.update(h.get("contributing_sites", h.get("sites", {})))
        return known

    def update_model(self, model: FLModel, aggr_result: FLModel) -> FLModel:
        model = super().update_model(model, aggr_result)
        ameta = aggr_result.meta or {}
        sites = copy.deepcopy(ameta.get("site_metrics", {}))
        missing = sorted(self._expected_sites() - set(sites))
        record = {
            "round": int(self.current_round),
            "metrics": dict(aggr_result.metrics or {}),
            "sites": sites,
            "contributing_sites": sorted(sites),
            "targeted_sites": list(self._round_targets),
            "missing_sites": missing,  # expected but not aggregated: dropped out, late, refused or failed
            "aggregation": ameta.get("aggregation", {}),
            "job_started_at_round": int(self.start_round),  # > 0: this round ran in a resumed job
        }
        self._history.append(record)
        if missing:
            self.warning(f"round {self.current_round}: no update from {missing}; aggregated {sorted(sites)}")
        self.info(f"round {self.current_round} global metrics: {record['metrics']}")
        model.meta = {**self._static_meta, "last_round": int(self.current_round), "history": self._history}
        return model


# --------------------------------------------------------------------------- aggregation (NVFlare adapter)


class SynthAggregator(ModelAggregator):
    """NVFlare ``ModelAggregator`` running an :class:`AggregationStrategy` over one round's updates.

    Args:
        strategy_path: dotted path of the strategy class (default :class:`FedAvgStrategy`).
        strategy_args: its keyword arguments.

    The aggregated ``FLModel`` is a ``DIFF`` whose ``metrics`` are the sample-weighted client metrics
    and whose ``meta["site_metrics"]`` holds each site's own metrics and sample count, and
    ``meta["aggregation"]`` the strategy's :meth:`~AggregationStrategy.describe`.
    """

    def __init__(self, strategy_path: str = DEFAULT_STRATEGY, strategy_args: dict | None = None) -> None:
        super().__init__()
        self.strategy_path = strategy_path
        self.strategy_args = strategy_args
        self.strategy = load_strategy(strategy_path, strategy_args)
        self._updates: list[ClientUpdate] = []
        self._round = 0

    def accept_model(self, model: FLModel) -> None:
        meta = model.meta or {}
        site = str(meta.get("client_name") or f"client-{len(self._updates)}")
        if model.params_type not in (ParamsType.DIFF, "DIFF"):
            raise ValueError(
                f"{site}: synthbrain clients send weight updates (DIFF), got {model.params_type}"
            )
        n = meta.get(NUM_SAMPLES_KEY, 0)
        metrics = {k: float(v) for k, v in (model.metrics or {}).items() if isinstance(v, (int, float))}
        self._updates.append(
            ClientUpdate(site=site, delta=dict(model.params or {}), num_samples=int(n or 0), metrics=metrics)
        )
        if model.current_round is not None:
            self._round = int(model.current_round)
        log.info("accepted update from %s (%d samples)", site, int(n or 0))

    def aggregate_model(self) -> FLModel:
        if not self._updates:
            # every site refused (e.g. privacy budgets spent) or failed: the global model stays as it is,
            # nothing was computed from any data, so no privacy is spent on the server either
            log.warning(
                "round %d: no client updates (all sites refused or failed); model unchanged", self._round
            )
            return FLModel(
                params={},
                params_type=ParamsType.DIFF,
                metrics={},
                meta={"site_metrics": {}, "aggregation": {**self.strategy.describe(), "round_noised": False}},
            )
        updates = sorted(self._updates, key=lambda u: u.site)  # arrival order must not matter
        delta = self.strategy.aggregate(updates, self._round)
        site_metrics = {u.site: {**u.metrics, "num_samples": u.num_samples} for u in updates}
        result = FLModel(
            params=delta,
            params_type=ParamsType.DIFF,
            metrics=weighted_metrics(updates),
            meta={"site_metrics": site_metrics, "aggregation": self.strategy.describe()},
        )
        self.reset_stats()
        return result

    def reset_stats(self) -> None:
        self._updates = []

"""The two synthbrain NVFlare jobs, built with NVFlare 2.9's recipe API (``FedAvgRecipe``).

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

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nvflare.apis.dxo import DataKind
from nvflare.app_opt.pt.recipes.fedavg import FedAvgRecipe as PTFedAvgRecipe
from nvflare.recipe.utils import add_experiment_tracking

from fl_app.fl.launcher import recipe_launch_args
from fl_app.fl.server import SynthAggregator, SynthFedAvg, SynthPersistor
from fl_app.privacy.aggregation import DEFAULT_STRATEGY

_JOBS = Path(__file__).resolve().parents[2] / "jobs"
"""``jobs/`` of the source tree: flat client entry points (``client_vqvae.py``, ``client_prior.py``)."""

CLIENT_SCRIPTS = {
    "vqvae": _JOBS / "client_vqvae.py",
    "prior": _JOBS / "client_prior.py",
}

__all__ = ["CLIENT_SCRIPTS", "JobSpec", "SynthFedAvgRecipe", "build_recipe"]


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
        local_epochs, max_steps, batch_size, lr: local work per round.
        dp: the job is for sites running DP-SGD: the server refuses a VQ-VAE quantiser that is not DP-safe.
        dp_epsilon: target ε of this job at each site running local DP-SGD (the site's YAML decides
            whether DP is on, and its ``epsilon_budget`` caps the total; None: the site's ``job_epsilon``).
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
    batch_size: int | None = None
    lr: float | None = None
    seed: int = 0
    dp: bool = False
    dp_epsilon: float | None = None
    run_name: str = ""
    strategy_path: str = DEFAULT_STRATEGY
    strategy_args: dict[str, Any] = field(default_factory=dict)
    name: str = ""

    def train_args(self) -> str:
        parts = [f"--local-epochs {self.local_epochs}", f"--seed {self.seed}", f"--rounds {self.num_rounds}"]
        if self.dp_epsilon:
            parts.append(f"--dp-epsilon {self.dp_epsilon}")
        if self.run_name:
            parts.append(f"--run {self.run_name}")
        if self.site_config_dir:
            parts.append(f"--site-config-dir {self.site_config_dir}")
        if self.max_steps:
            parts.append(f"--max-steps {self.max_steps}")
        if self.batch_size:
            parts.append(f"--batch-size {self.batch_size}")
        if self.lr:
            parts.append(f"--lr {self.lr}")
        return " ".join(parts)


def build_recipe(
    spec: JobSpec, result_filters: list[Any] | None = None, data_filters: list[Any] | None = None
) -> SynthFedAvgRecipe:
    """The NVFlare recipe of one synthbrain job (run it with ``recipe.run(env)`` or ``recipe.export``).

    ``result_filters`` / ``data_filters``: NVFlare ``Filter`` objects added to every client for outgoing
    task results / incoming task data of the ``train`` task (e.g. :class:`fl_app.fl.leak_audit.ResultAuditFilter`).
    """
    if spec.kind not in CLIENT_SCRIPTS:
        raise ValueError(f"job kind must be one of {sorted(CLIENT_SCRIPTS)}, got {spec.kind!r}")
    if spec.kind == "prior" and not spec.frozen_vqvae:
        raise ValueError("the prior job needs the global VQ-VAE of the vqvae job (frozen_vqvae)")
    persistor = SynthPersistor(
        model_kind=spec.kind,
        profile=spec.profile,
        checkpoint_dir=str(spec.checkpoint_dir),
        frozen_vqvae=str(spec.frozen_vqvae),
        dp=spec.dp,
        seed=spec.seed,
    )
    recipe = SynthFedAvgRecipe(
        name=spec.name or f"synthbrain-{spec.kind}",
        min_clients=min(spec.min_sites or spec.num_clients, spec.num_clients),
        num_clients=spec.num_clients,
        round_timeout=spec.round_timeout,
        server_memory_gc_rounds=spec.memory_gc_rounds,
        client_memory_gc_rounds=spec.memory_gc_rounds,
        num_rounds=spec.num_rounds,
        train_script=str(CLIENT_SCRIPTS[spec.kind]),
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

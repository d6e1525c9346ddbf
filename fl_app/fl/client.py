"""The synthbrain NVFlare client (Client API): one round loop for both jobs, each model a small :class:`Task`.

Each round (:func:`client_rounds`): receive the global model, check the site's privacy budget, evaluate the
received model on the site's own validation split (the *global* model's held-out metric), train it locally
with the model's NVFlare-free training function (:func:`~fl_app.train.vqvae_local.train_vqvae_local`,
:func:`~fl_app.train.prior_local.train_prior_local`: the same as the centralised run), evaluate again, and
send back the weight update (``ParamsType.DIFF``) with the FedAvg weight and the metrics (also streamed to
the server's TensorBoard). Images and code grids never leave the site: only weight updates and scalars.

* :class:`VQVAETask` (job ``vqvae``): the 3D VQ-VAE on the site's volumes.
* :class:`PriorTask` (job ``prior``): the transformer prior; on the first round it encodes the site's volumes
  *locally* with the frozen global VQ-VAE shipped under the ``vqvae.`` prefix (cached per subject) and
  reports ``vqvae_checksum`` (Σ|w| of the VQ-VAE it encoded with); the VQ-VAE is never sent back.

A site with ``compute.nproc`` > 1 runs the client under ``torchrun`` (:mod:`fl_app.train.distributed`):
rank 0 receives the task and the global weights and sends the update; every rank trains on its shard (all
ranks start from rank 0's weights and average their gradients); the reported sample count is the site's
total. Entry point (:func:`main`; what NVFlare runs at the site): ``python -m fl_app.fl.client vqvae|prior``.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from fl_app.config import Profile, SiteConfig, find_site_config, load_site_config

log = logging.getLogger(__name__)

__all__ = [
    "PriorTask",
    "Task",
    "VQVAETask",
    "add_common_client_args",
    "apply_compute",
    "client_rounds",
    "data_health_metrics",
    "exported_state",
    "freeze_for_job",
    "main",
    "open_site_dataset",
    "planned_steps",
    "refusal_model",
    "resolve_site",
    "state_delta",
    "to_state_dict",
]


def add_common_client_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments every synthbrain client script takes (set by the job; the site YAML can cap them)."""
    p.add_argument("job", choices=["vqvae", "prior"], help="which job's client (its Task)")
    p.add_argument("--site-config", default=None, help="site YAML (default: $SYNTHBRAIN_SITE_CONFIG)")
    p.add_argument("--site-config-dir", default=None, help="folder of <site>.yaml (simulator / POC)")
    p.add_argument(
        "--local-epochs",
        type=int,
        default=1,
        help="local epochs per round (ignored when a step cap is given)",
    )
    p.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help="local optimiser steps per round (takes precedence over --local-epochs)",
    )
    p.add_argument("--seed", type=int, default=0)
    # DP: what the job asks; the site's YAML decides whether DP is on and caps the total ε
    p.add_argument("--rounds", type=int, default=1, help="the job's planned rounds (plans the DP noise)")
    p.add_argument("--dp-epsilon", type=float, default=None, help="target ε of this job at each DP site")
    p.add_argument("--run", default="", help="consortium run name (recorded in site privacy ledgers)")
    return p


def main(argv: list[str] | None = None) -> int:
    """``python -m fl_app.fl.client vqvae|prior ...``: parse the job's arguments, open the NVFlare Client API,
    resolve the site's YAML and compute settings, join the site's torchrun group (when ``compute.nproc`` > 1),
    run :func:`client_rounds` with the job's :class:`Task` and leave the group."""
    import nvflare.client as flare

    from fl_app.fl.launcher import check_site_parallelism
    from fl_app.train import distributed as D

    args = add_common_client_args(argparse.ArgumentParser(description=__doc__)).parse_args(argv)
    flare.init()  # rank from $RANK: only rank 0 opens a Client API session
    site_name = flare.get_site_name()
    cfg = resolve_site(site_name, args)
    device = apply_compute(cfg)
    dist_ctx, device = D.init_from_env(device)
    try:
        check_site_parallelism(cfg, dist_ctx.world_size)
        task = TASKS[args.job](args, cfg, device, dist_ctx.is_main)
        return client_rounds(flare, task, args, cfg, site_name)
    finally:
        D.shutdown()


class Task:
    """The per-model part of a client round: set up (data, model, optimiser), evaluate, train, metrics.

    :meth:`setup` (on the first round; ``params``: the received weights, rank 0) fills ``model``, ``optimizer``,
    ``train_loader``, ``val_loader`` (None: no validation), ``dataset`` (the site's volumes, rank 0) and
    ``n_train``/``n_val`` (subjects); :meth:`net` is the bare model inside any DP/DDP wrapper; :meth:`metrics`
    returns ``(metrics, the site's training-sample count)`` of one round.
    """

    kind = ""
    exclude_prefix: str | None = None  # received weights under this prefix are not the model's
    exported: list[str] | None = None  # the tensors sent back (None: all; else profile.finetune's trainable)
    untracked: frozenset[str] = frozenset()  # metrics not sent to TensorBoard

    def __init__(
        self, args: argparse.Namespace, cfg: SiteConfig, device: torch.device, main_rank: bool
    ) -> None:
        self.args, self.cfg, self.device, self.main_rank = args, cfg, device, main_rank
        self.model: Any = None
        self.optimizer: Any = None
        self.train_loader: Any = None
        self.val_loader: Any = None
        self.dataset: Any = None
        self.n_train = self.n_val = 0

    def batch_size(self, profile: Profile) -> int:
        return self.cfg.training.batch_size or profile.train.batch_size

    def setup(self, params: Mapping[str, Any] | None, profile: Profile, rnd: int) -> None: ...
    def net(self) -> torch.nn.Module: ...
    def evaluate(self) -> dict[str, float]: ...
    def train(
        self, profile: Profile, epochs: int | None, max_steps: int | None, rnd: int
    ) -> dict[str, Any]: ...
    def metrics(self, result: dict, before: dict, after: dict) -> tuple[dict[str, float], int]: ...


class VQVAETask(Task):
    kind = "vqvae"

    def setup(self, params: Mapping[str, Any] | None, profile: Profile, rnd: int) -> None:
        from fl_app.data.dataset import make_loaders
        from fl_app.models.vqvae import build_vqvae
        from fl_app.train import distributed as D
        from fl_app.train.vqvae_local import make_optimizer, make_vqvae_loader

        args, cfg = self.args, self.cfg
        with D.main_process_first():  # rank 0 fills the preprocessing cache, the others read it
            self.dataset = open_site_dataset(cfg, profile)
        bs = self.batch_size(profile)
        train_part, self.val_loader = make_loaders(self.dataset, bs, profile.train.val_fraction, args.seed)
        self.n_train, self.n_val = len(train_part.dataset), len(self.val_loader.dataset)
        self.train_loader = make_vqvae_loader(train_part.dataset, bs, shuffle=True, seed=args.seed + rnd)
        self.model = build_vqvae(profile, dp=cfg.privacy.enabled)  # DP-SGD refuses a quantiser not DP-safe
        self.exported = freeze_for_job(self.model, profile.finetune.vqvae, "vqvae")
        self.optimizer = make_optimizer(self.model, profile, lr=profile.finetune.lr)

    def net(self) -> torch.nn.Module:
        from fl_app.models.vqvae import unwrap

        return unwrap(self.model)

    def evaluate(self) -> dict[str, float]:
        from fl_app.train.vqvae_local import evaluate_vqvae

        return evaluate_vqvae(self.net(), self.val_loader, self.device)

    def train(self, profile: Profile, epochs: int | None, max_steps: int | None, rnd: int) -> dict[str, Any]:
        from fl_app.train.vqvae_local import train_vqvae_local

        return train_vqvae_local(
            self.model, self.train_loader, profile, optimizer=self.optimizer, device=self.device,
            epochs=epochs, max_steps=max_steps, seed=self.args.seed + rnd, amp=profile.train.amp,
        )  # fmt: skip

    def metrics(self, result: dict, before: dict, after: dict) -> tuple[dict[str, float], int]:
        final = result["final"]
        return {
            "train_loss": float(final.get("loss", math.nan)),
            "train_image_loss": float(final.get("image_loss", math.nan)),
            "global_val_psnr_db": float(before.get("psnr_db", math.nan)),
            "local_val_psnr_db": float(after.get("psnr_db", math.nan)),
            "global_val_dice": float(before.get("dice_mean", math.nan)),
            "codebook_perplexity": float(final.get("codebook_perplexity", math.nan)),
            "num_samples": float(result["train_volumes"]),  # all ranks: the site's total
            "num_processes": float(result["world_size"]),
            "num_subjects": float(self.n_train),
            "num_val_subjects": float(self.n_val),
            "train_seconds": float(result["train_seconds"]),
        }, int(result["train_volumes"])


class PriorTask(Task):
    kind = "prior"
    untracked = frozenset({"vqvae_checksum"})
    vq_sum = math.nan

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        from fl_app.fl.server import FROZEN_PREFIX

        super().__init__(*args, **kwargs)
        self.exclude_prefix = FROZEN_PREFIX

    def setup(self, params: Mapping[str, Any] | None, profile: Profile, rnd: int) -> None:
        from fl_app.data.dataset import split_indices
        from fl_app.models.prior import build_prior
        from fl_app.models.vqvae import build_vqvae
        from fl_app.train import distributed as D
        from fl_app.train.prior_local import encode_codes, make_prior_loader, make_prior_optimizer

        args, cfg = self.args, self.cfg
        codes = None
        if self.main_rank:  # rank 0 holds the frozen VQ-VAE: it encodes, the other ranks get the grids
            vq_state = to_state_dict(params or {}, prefix=self.exclude_prefix or "")
            if not vq_state:
                raise RuntimeError("the prior job's global model carries no VQ-VAE (vqvae.* weights)")
            vqvae = build_vqvae(profile)  # frozen: only encodes; the profile names its quantiser
            vqvae.load_state_dict(vq_state)
            vqvae.to(self.device).eval()
            self.vq_sum = state_checksum(vq_state)
            vq_key = hashlib.sha256(repr(self.vq_sum).encode()).hexdigest()[:16]
            self.dataset = open_site_dataset(cfg, profile)
            cache = (cfg.cache_dir / "codes") if cfg.cache_dir else None
            codes = encode_codes(vqvae, self.dataset, cache, vq_key)
            del vqvae
        codes = D.broadcast_object(codes)
        train_idx, val_idx = split_indices(len(codes), profile.train.val_fraction, args.seed)
        self.n_train, self.n_val = len(train_idx), len(val_idx)
        bs = self.batch_size(profile)
        self.train_loader = make_prior_loader(codes.subset(train_idx), bs, shuffle=True, seed=args.seed)
        self.val_loader = make_prior_loader(codes.subset(val_idx), bs, shuffle=False) if val_idx else None
        self.model = build_prior(profile).to(self.device)
        self.exported = freeze_for_job(self.model, profile.finetune.prior, "prior")
        self.optimizer = make_prior_optimizer(self.model, profile.finetune.lr or profile.train.lr)

    def net(self) -> torch.nn.Module:
        from fl_app.models.prior import unwrap_prior

        return unwrap_prior(self.model)

    def evaluate(self) -> dict[str, float]:
        from fl_app.train.prior_local import evaluate_prior

        return evaluate_prior(self.net(), self.val_loader, self.device)

    def train(self, profile: Profile, epochs: int | None, max_steps: int | None, rnd: int) -> dict[str, Any]:
        from fl_app.train.prior_local import train_prior_local

        return train_prior_local(
            self.model, self.train_loader, profile, optimizer=self.optimizer, device=self.device,
            epochs=epochs, max_steps=max_steps, amp=profile.train.amp,
        )  # fmt: skip

    def metrics(self, result: dict, before: dict, after: dict) -> tuple[dict[str, float], int]:
        final = result["final"]
        n_seq = int(result.get("train_sequences", self.n_train))
        return {
            "train_loss": float(final.get("loss", math.nan)),
            "train_bits_per_code": float(final.get("bits_per_code", math.nan)),
            "global_val_bits_per_code": float(before.get("bits_per_code", math.nan)),
            "local_val_bits_per_code": float(after.get("bits_per_code", math.nan)),
            "num_samples": float(n_seq),  # all ranks: the site's total
            "num_processes": float(result.get("world_size", 1)),
            "num_subjects": float(self.n_train),
            "num_val_subjects": float(self.n_val),
            "vqvae_checksum": self.vq_sum,
            "train_seconds": float(result["train_seconds"]),
        }, n_seq


TASKS: dict[str, type[Task]] = {"vqvae": VQVAETask, "prior": PriorTask}


def client_rounds(flare: Any, task: Task, args: argparse.Namespace, cfg: SiteConfig, site_name: str) -> int:
    """The client's round loop (every rank runs it; only rank 0 talks to NVFlare)."""
    from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
    from nvflare.client.tracking import SummaryWriter

    from fl_app.config import profile_from_dict
    from fl_app.fl.local_dp import PrivacyBudgetExceeded, SiteDP, released_metrics
    from fl_app.privacy.aggregation import NUM_SAMPLES_KEY
    from fl_app.train import distributed as D

    main_rank = task.main_rank
    writer = SummaryWriter() if main_rank else None
    dp: SiteDP | None = None
    max_steps = None
    while True:
        in_model = (flare.receive() if flare.is_running() else None) if main_rank else None
        msg = None if in_model is None else {"round": in_model.current_round, "meta": in_model.meta or {}}
        msg = D.broadcast_object(msg)  # the other ranks learn of the task (or the end) from rank 0
        if msg is None:
            break
        rnd = int(msg["round"] or 0)
        profile = profile_from_dict(msg["meta"]["profile"], source="global model")
        if task.model is None:
            task.setup(in_model.params if main_rank else None, profile, rnd)
            max_steps, steps_per_round = planned_steps(args, cfg, len(task.train_loader))
            if cfg.privacy.enabled:
                dp = SiteDP(cfg, flare.get_job_id(), task.kind, args.rounds, args.dp_epsilon, args.run)
                task.model, task.optimizer, task.train_loader = dp.make_private(
                    task.model, task.optimizer, task.train_loader, steps_per_round
                )
        net = task.net()
        received = None
        if main_rank:  # the other ranks get these weights when training starts (rank 0's broadcast)
            received = to_state_dict(in_model.params, exclude_prefix=task.exclude_prefix)
            net.load_state_dict(received)
        if dp is not None:
            try:
                eps_after = dp.check_budget(rnd)
            except PrivacyBudgetExceeded as exc:
                log.error("REFUSED round %d: %s", rnd, exc)
                flare.send(refusal_model("privacy budget exceeded"))
                continue
            log.info(
                "site %s round %d: privacy budget ok (total ε after this round ≤ %.3f)",
                site_name,
                rnd,
                eps_after,
            )
        # rank 0 evaluates; data-dependent metrics are not computed under DP unless the site releases them
        show = main_rank and task.val_loader is not None and (dp is None or "metrics" in cfg.privacy.release)
        before = task.evaluate() if show else {}
        result = task.train(profile, args.local_epochs if max_steps is None else None, max_steps, rnd)
        if not main_rank:
            continue
        after = task.evaluate() if show else {}
        metrics, n_samples = task.metrics(result, before, after)
        n_weight = max(n_samples, 1)
        if dp is not None:
            dp.record_round(rnd)  # the spend is on the ledger before anything leaves the site
            metrics.update(dp.accounting_metrics())
            log.info("site %s round %d: %s", site_name, rnd, dp.describe())
            n_weight = 1  # the sampled count is data-dependent; DP-FedAvg weighs sites uniformly
        log.info("site %s round %d: %s", site_name, rnd, metrics)
        metrics.update(data_health_metrics(task.dataset))  # counts of unreadable files, never which ones
        metrics = released_metrics(metrics, cfg, dp is not None)
        for k, v in metrics.items():
            if math.isfinite(v) and k not in task.untracked:
                writer.add_scalar(k, v, global_step=rnd)
        delta = state_delta(*exported_state(net.state_dict(), received, task.exported, site_name))
        meta = {NUM_SAMPLES_KEY: n_weight}
        flare.send(FLModel(params=delta, params_type=ParamsType.DIFF, metrics=metrics, meta=meta))
    return 0


def freeze_for_job(model: torch.nn.Module, items: list[str], kind: str) -> list[str] | None:
    """Apply the job's ``profile.finetune.<kind>`` to a freshly built model (before its optimiser and
    Opacus see it): the frozen parameters get ``requires_grad = False``. Returns the names the site will send
    (None: a whole-model job sends every tensor)."""
    from fl_app.models.finetune import apply_trainable, exported_names

    names = exported_names(model, items, kind)
    if names is not None:
        apply_trainable(model, items, kind)
        log.info("%s job: fine-tuning %d of %d parameter tensors (%s)", kind, len(names),
                 len(list(model.parameters())), ", ".join(items))  # fmt: skip
    return names


def exported_state(
    new: Mapping[str, torch.Tensor],
    received: Mapping[str, torch.Tensor],
    exported: list[str] | None,
    site: str,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(new, received)`` restricted to the tensors a site sends. With a declared trainable subset, every
    other tensor must still be byte-identical to what the site received (the public checkpoint's value):
    otherwise nothing is sent (``RuntimeError``)."""
    if exported is None:
        return dict(new), dict(received)
    from fl_app.models.finetune import frozen_changes

    changed = frozen_changes(new, received, exported)
    if changed:
        raise RuntimeError(
            f"site {site}: frozen tensors changed during local training ({', '.join(changed[:5])}); "
            "the update is not sent"
        )
    return {k: new[k] for k in exported}, {k: received[k] for k in exported}


def planned_steps(args: argparse.Namespace, cfg: SiteConfig, loader_len: int) -> tuple[int | None, int]:
    """``(max_steps for train_*_local, planned optimiser steps per round)`` after the site's caps."""
    max_steps = args.max_steps
    if cfg.training.max_steps_per_round:
        max_steps = min(max_steps or 10**9, cfg.training.max_steps_per_round)
    return max_steps, (max_steps if max_steps is not None else args.local_epochs * max(loader_len, 1))


def refusal_model(reason: str):
    """The reply of a site that refuses a round: no parameters, so the server's FedAvg controller skips
    it (``Empty result from client``) and the round goes on with the other sites."""
    from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

    return FLModel(params={}, params_type=ParamsType.DIFF, metrics={}, meta={"synthbrain_refused": reason})


def resolve_site(site_name: str, args: argparse.Namespace) -> SiteConfig:
    """The site's :class:`SiteConfig` (see :func:`fl_app.config.find_site_config`)."""
    path = find_site_config(site_name, args.site_config, args.site_config_dir)
    cfg = load_site_config(path)
    log.info("site %s: config %s", site_name, path)
    return cfg


def apply_compute(cfg: SiteConfig) -> torch.device:
    """Apply the site's compute settings; returns the training device."""
    if cfg.compute.gpus:
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", ",".join(str(g) for g in cfg.compute.gpus))
    if cfg.compute.num_threads:
        torch.set_num_threads(cfg.compute.num_threads)
    if cfg.compute.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.compute.device)


def open_site_dataset(cfg: SiteConfig, profile: Profile):
    """The site's :class:`~fl_app.data.dataset.SiteDataset` (preprocessed once into its cache)."""
    from fl_app.data.cohort import read_cohort
    from fl_app.data.dataset import SiteDataset

    cohort = read_cohort(cfg)
    ds = SiteDataset(cohort.valid(), profile, cache_dir=cfg.cache_dir, derive_labels=cfg.derive_labels)
    ds.skip_unreadable = True  # a file that stops reading mid-job is excluded, not fatal to the round
    if len(ds) < cfg.min_subjects:
        raise RuntimeError(
            f"site {cfg.name}: {len(ds)} usable subjects, fewer than its min_subjects ({cfg.min_subjects})"
        )
    log.info("site %s: %d subjects usable (%d skipped)", cfg.name, len(ds), ds.n_skipped)
    return ds


def data_health_metrics(dataset: Any) -> dict[str, float]:
    """Re-verify the site's files (:meth:`~fl_app.data.dataset.SiteDataset.recheck`) and return the counts
    a client reports each round: ``skipped_subjects`` (unreadable when the job started) and
    ``unreadable_subjects`` (stopped reading since; excluded from training from then on). Counts only:
    never which subject or what is wrong with its file."""
    recheck = getattr(dataset, "recheck", None)
    unreadable = recheck() if callable(recheck) else 0
    return {
        "skipped_subjects": float(getattr(dataset, "n_skipped", 0)),
        "unreadable_subjects": float(unreadable),
    }


def to_state_dict(params: Mapping[str, Any], prefix: str = "", exclude_prefix: str | None = None) -> dict:
    """Received FLModel params (numpy or torch) -> ``{name: tensor}``, optionally selecting a prefix."""
    out = {}
    for k, v in params.items():
        if exclude_prefix and k.startswith(exclude_prefix):
            continue
        if prefix and not k.startswith(prefix):
            continue
        t = v if isinstance(v, torch.Tensor) else torch.as_tensor(np.asarray(v))
        out[k[len(prefix) :]] = t
    return out


def state_delta(new: Mapping[str, torch.Tensor], old: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``new − old`` per tensor (CPU), the update a client sends (``ParamsType.DIFF``)."""
    if set(new) != set(old):
        raise ValueError(f"state keys differ: {sorted(set(new) ^ set(old))[:5]}")
    return {k: (new[k].detach().cpu() - old[k].detach().cpu().to(new[k].dtype)) for k in new}


def state_checksum(state: Mapping[str, torch.Tensor]) -> float:
    """Σ |w| over a state dict (float64): a cheap fingerprint proving which weights a client used."""
    return float(sum(float(v.detach().double().abs().sum()) for v in state.values()))


if __name__ == "__main__":
    raise SystemExit(main())

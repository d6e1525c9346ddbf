"""NVFlare client script of the ``prior`` job (Client API), a thin shell around :mod:`fl_app.train.prior_local`.

The global model the server sends holds the prior's weights and, under the ``vqvae.`` prefix, the frozen
global VQ-VAE of the first job. On the first round the client loads that VQ-VAE and encodes its own
volumes into code grids *locally* (:func:`encode_codes`, cached per subject), so code grids never leave
the site either. Each round: evaluate the received prior on the site's validation codes (bits per
code), train with :func:`train_prior_local` (the same function as the centralised run), send the
prior's weight update (``ParamsType.DIFF``, the VQ-VAE is never sent back) with the number of training
sequences and the metrics, including ``vqvae_checksum`` (Σ|w| of the VQ-VAE it encoded with).

Under ``torchrun`` (a site with ``compute.nproc`` > 1, :mod:`fl_app.train.distributed`) rank 0 receives the
task, encodes the site's volumes and broadcasts the code grids to the other ranks; every rank trains on its
shard of the sequences; rank 0 sends the update with the site's total sequence count. ``train.amp``
reaches the training loop (bf16 autocast on CUDA).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import math
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from fl_app.config import SiteConfig
    from fl_app.train.distributed import DistContext

log = logging.getLogger("synthbrain.client.prior")


def main(argv: list[str] | None = None) -> int:
    from fl_app.fl.client import run_client

    return run_client(__doc__, _rounds, argv)


def _rounds(
    flare: Any,
    args: argparse.Namespace,
    cfg: SiteConfig,
    site_name: str,
    device: torch.device,
    dist_ctx: DistContext,
) -> int:
    """The client's round loop (every rank runs it; only rank 0 talks to NVFlare)."""
    from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
    from nvflare.client.tracking import SummaryWriter

    from fl_app.config import profile_from_dict
    from fl_app.data.dataset import split_indices
    from fl_app.fl.client import (
        open_site_dataset,
        planned_steps,
        refusal_model,
        state_checksum,
        state_delta,
        to_state_dict,
    )
    from fl_app.fl.local_dp import PrivacyBudgetExceeded, SiteDP, released_metrics
    from fl_app.fl.server import FROZEN_PREFIX
    from fl_app.models.prior import _unwrap, build_prior
    from fl_app.models.vqvae import build_vqvae
    from fl_app.privacy.aggregation import NUM_SAMPLES_KEY
    from fl_app.train import distributed as D
    from fl_app.train.prior_local import (
        encode_codes,
        evaluate_prior,
        make_prior_loader,
        make_prior_optimizer,
        train_prior_local,
    )

    main_rank = dist_ctx.is_main
    writer = SummaryWriter() if main_rank else None

    model = optimizer = train_loader = val_loader = None
    dp: SiteDP | None = None
    vq_sum = math.nan
    n_train = n_val = 0
    max_steps = None
    while True:
        in_model = (flare.receive() if flare.is_running() else None) if main_rank else None
        task = None if in_model is None else {"round": in_model.current_round, "meta": in_model.meta or {}}
        task = D.broadcast_object(task)  # the other ranks learn of the task (or the end) from rank 0
        if task is None:
            break
        rnd = int(task["round"] or 0)
        meta = task["meta"]
        profile = profile_from_dict(meta["profile"], source="global model")
        if model is None:
            codes = None
            if main_rank:  # rank 0 holds the frozen VQ-VAE: it encodes, the other ranks get the grids
                vq_state = to_state_dict(in_model.params, prefix=FROZEN_PREFIX)
                if not vq_state:
                    raise RuntimeError("the prior job's global model carries no VQ-VAE (vqvae.* weights)")
                vqvae = build_vqvae(profile, dp=bool(meta.get("dp", False)))
                vqvae.load_state_dict(vq_state)
                vqvae.to(device).eval()
                vq_sum = state_checksum(vq_state)
                vq_key = hashlib.sha256(repr(vq_sum).encode()).hexdigest()[:16]
                dataset = open_site_dataset(cfg, profile)
                cache = (cfg.cache_dir / "codes") if cfg.cache_dir else None
                codes = encode_codes(vqvae, dataset, cache, vq_key)
                del vqvae
            codes = D.broadcast_object(codes)
            train_idx, val_idx = split_indices(len(codes), profile.train.val_fraction, args.seed)
            n_train, n_val = len(train_idx), len(val_idx)
            bs = cfg.training.batch_size or args.batch_size or profile.train.batch_size
            train_loader = make_prior_loader(codes.subset(train_idx), bs, shuffle=True, seed=args.seed)
            val_loader = make_prior_loader(codes.subset(val_idx), bs, shuffle=False) if val_idx else None
            model = build_prior(profile).to(device)
            optimizer = make_prior_optimizer(model, args.lr or profile.train.lr)
            max_steps, steps_per_round = planned_steps(args, cfg, len(train_loader))
            if cfg.privacy.enabled:
                dp = SiteDP(cfg, flare.get_job_id(), "prior", args.rounds, args.dp_epsilon, args.run)
                model, optimizer, train_loader = dp.make_private(
                    model, optimizer, train_loader, steps_per_round
                )
        net = _unwrap(model)
        received = None
        if main_rank:  # the other ranks get these weights when training starts (rank 0's broadcast)
            received = to_state_dict(in_model.params, exclude_prefix=FROZEN_PREFIX)
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
        show = main_rank and val_loader is not None and (dp is None or "metrics" in cfg.privacy.release)
        before = evaluate_prior(net, val_loader, device) if show else {}
        result = train_prior_local(
            model,
            train_loader,
            profile,
            optimizer=optimizer,
            device=device,
            epochs=args.local_epochs if max_steps is None else None,
            max_steps=max_steps,
            amp=profile.train.amp,
        )
        if not main_rank:
            continue
        after = evaluate_prior(net, val_loader, device) if show else {}
        final = result["final"]
        n_seq = int(result.get("train_sequences", n_train))
        metrics = {
            "train_loss": float(final.get("loss", math.nan)),
            "train_bits_per_code": float(final.get("bits_per_code", math.nan)),
            "global_val_bits_per_code": float(before.get("bits_per_code", math.nan)),
            "local_val_bits_per_code": float(after.get("bits_per_code", math.nan)),
            "num_samples": float(n_seq),  # all ranks: the site's total
            "num_processes": float(result.get("world_size", 1)),
            "num_subjects": float(n_train),
            "num_val_subjects": float(n_val),
            "vqvae_checksum": vq_sum,
            "train_seconds": float(result["train_seconds"]),
        }
        n_weight = max(n_seq, 1)
        if dp is not None:
            dp.record_round(rnd)  # the spend is on the ledger before anything leaves the site
            metrics.update(dp.accounting_metrics())
            log.info("site %s round %d: %s", site_name, rnd, dp.describe())
            n_weight = 1  # the sampled count is data-dependent; DP-FedAvg weighs sites uniformly
        log.info("site %s round %d: %s", site_name, rnd, metrics)
        from fl_app.fl.client import data_health_metrics

        metrics.update(data_health_metrics(dataset))  # counts of unreadable files, never which ones
        metrics = released_metrics(metrics, cfg, dp is not None)
        for k, v in metrics.items():
            if math.isfinite(v) and k != "vqvae_checksum":
                writer.add_scalar(k, v, global_step=rnd)
        delta = state_delta({k: v for k, v in net.state_dict().items()}, received)
        flare.send(
            FLModel(
                params=delta, params_type=ParamsType.DIFF, metrics=metrics, meta={NUM_SAMPLES_KEY: n_weight}
            )
        )
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(main())

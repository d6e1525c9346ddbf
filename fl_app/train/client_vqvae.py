"""NVFlare client script of the ``vqvae`` job (Client API), a thin shell around :mod:`fl_app.train.vqvae_local`.

Each round: receive the global VQ-VAE, evaluate it on this site's own validation split (that is the
*global* model's held-out reconstruction PSNR), train it locally with :func:`train_vqvae_local` (the
same function as the centralised run), evaluate again, and send back the weight update
(``ParamsType.DIFF``) with the number of training volumes (the FedAvg weight) and the metrics. Metrics
are also streamed to the server's TensorBoard through NVFlare's tracking ``SummaryWriter``.

Images never leave the site: only weight updates and scalar metrics are sent.

A site with ``compute.nproc`` > 1 runs this script under ``torchrun`` (:mod:`fl_app.train.distributed`):
rank 0 receives the task and the global weights and sends the update; every rank trains on its shard of
the site's subjects (the training function starts all ranks from rank 0's weights and averages their
gradients); the reported sample count is the site's total. The profile's ``train.amp`` reaches the
training loop (bf16 autocast on CUDA).

Arguments (set in the job; see :func:`fl_app.fl.client.add_common_client_args`): ``--site-config`` /
``--site-config-dir``, ``--local-epochs``, ``--max-steps``, ``--batch-size``, ``--lr``, ``--seed``.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from fl_app.config import SiteConfig
    from fl_app.train.distributed import DistContext

log = logging.getLogger("synthbrain.client.vqvae")


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
    from fl_app.data.dataset import make_loaders
    from fl_app.fl.client import (
        open_site_dataset,
        planned_steps,
        refusal_model,
        state_delta,
        to_state_dict,
    )
    from fl_app.fl.local_dp import PrivacyBudgetExceeded, SiteDP, released_metrics
    from fl_app.models.vqvae import build_vqvae, unwrap
    from fl_app.privacy.aggregation import NUM_SAMPLES_KEY
    from fl_app.train import distributed as D
    from fl_app.train.vqvae_local import evaluate_vqvae, make_optimizer, make_vqvae_loader, train_vqvae_local

    main_rank = dist_ctx.is_main
    writer = SummaryWriter() if main_rank else None

    model = optimizer = train_loader = val_loader = None
    dp: SiteDP | None = None
    n_train = 0
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
            with D.main_process_first():  # rank 0 fills the preprocessing cache, the others read it
                dataset = open_site_dataset(cfg, profile)
            bs = cfg.training.batch_size or args.batch_size or profile.train.batch_size
            train_part, val_loader = make_loaders(dataset, bs, profile.train.val_fraction, args.seed)
            n_train = len(train_part.dataset)
            train_loader = make_vqvae_loader(train_part.dataset, bs, shuffle=True, seed=args.seed + rnd)
            if cfg.privacy.enabled and not meta.get("dp", False):
                raise RuntimeError(
                    f"site {site_name} runs local DP (privacy.enabled) but the job's VQ-VAE is not the "
                    "DP-compatible one: the consortium must run the job with DP (--dp / --dp-model)"
                )
            model = build_vqvae(profile, dp=bool(meta.get("dp", False)))
            optimizer = make_optimizer(model, profile, args.lr)
            max_steps, steps_per_round = planned_steps(args, cfg, len(train_loader))
            if cfg.privacy.enabled:
                dp = SiteDP(cfg, flare.get_job_id(), "vqvae", args.rounds, args.dp_epsilon, args.run)
                model, optimizer, train_loader = dp.make_private(
                    model, optimizer, train_loader, steps_per_round
                )
        net = unwrap(model)
        received = None
        if main_rank:  # the other ranks get these weights when training starts (rank 0's broadcast)
            received = to_state_dict(in_model.params)
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
        show = main_rank and (dp is None or "metrics" in cfg.privacy.release)
        before = evaluate_vqvae(net, val_loader, device) if show else {}
        result = train_vqvae_local(
            model,
            train_loader,
            profile,
            optimizer=optimizer,
            device=device,
            epochs=args.local_epochs if max_steps is None else None,
            max_steps=max_steps,
            seed=args.seed + rnd,
            amp=profile.train.amp,
        )
        if not main_rank:
            continue
        after = evaluate_vqvae(net, val_loader, device) if show else {}
        final = result["final"]
        metrics = {
            "train_loss": float(final.get("loss", math.nan)),
            "train_image_loss": float(final.get("image_loss", math.nan)),
            "global_val_psnr_db": float(before.get("psnr_db", math.nan)),
            "local_val_psnr_db": float(after.get("psnr_db", math.nan)),
            "global_val_dice": float(before.get("dice_mean", math.nan)),
            "codebook_perplexity": float(final.get("codebook_perplexity", math.nan)),
            "num_samples": float(result["train_volumes"]),  # all ranks: the site's total
            "num_processes": float(result["world_size"]),
            "num_subjects": float(n_train),
            "num_val_subjects": float(len(val_loader.dataset)),
            "train_seconds": float(result["train_seconds"]),
        }
        n_weight = max(int(result["train_volumes"]), 1)
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
            if math.isfinite(v):
                writer.add_scalar(k, v, global_step=rnd)
        delta = state_delta(net.state_dict(), received)
        flare.send(
            FLModel(
                params=delta, params_type=ParamsType.DIFF, metrics=metrics, meta={NUM_SAMPLES_KEY: n_weight}
            )
        )
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(main())

"""In-process federated averaging: the clients' own local training functions and the server's own aggregation
strategies, in one process, without NVFlare.

What a federated job does each round, minus the transport: every site loads the global weights, trains
locally with the model's NVFlare-free training function (:func:`~fl_app.train.vqvae_local.train_vqvae_local`,
:func:`~fl_app.train.prior_local.train_prior_local`, as :mod:`fl_app.fl.client` does), sends its weight
update, and the server combines the updates with an :class:`~fl_app.privacy.aggregation.AggregationStrategy`
(sample-weighted FedAvg, DP-FedAvg, ...) as :class:`~fl_app.fl.server.SynthAggregator` does. Each site keeps
its model, optimiser (Adam moments, warm-up clock) and loader between rounds, as a client process does.

A site running record-level DP-SGD with its own :class:`~fl_app.fl.local_dp.SiteDP` is handled as the client
handles it: the round is refused when it does not fit the site's budget, the steps taken are written to the
site's privacy ledger after training, and the site's update is weighted uniformly.

Used by ``synthbrain tune`` (every trial is a federated run) and by ``bench/dp_utility.py``; NVFlare runs the
same rounds for real (``synthbrain fl run``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from fl_app.config import Profile
from fl_app.privacy.aggregation import AggregationStrategy, ClientUpdate, FedAvgStrategy

log = logging.getLogger(__name__)

__all__ = ["FederationResult", "LocalSite", "federate", "net_of"]

RoundCallback = Callable[[int, dict[str, torch.Tensor], list[ClientUpdate]], None]
"""``on_round(round, new global state, the round's updates)``; may raise to stop the federation."""


def net_of(kind: str, model: nn.Module) -> nn.Module:
    """The bare model inside any Opacus / DDP wrapper (the one whose ``state_dict`` is the global model's)."""
    if kind == "vqvae":
        from fl_app.models.vqvae import unwrap

        return unwrap(model)
    from fl_app.models.prior import unwrap_prior

    return unwrap_prior(model)


@dataclass
class LocalSite:
    """One site of an in-process federation.

    Attributes:
        name: the site's name (the update's ``site``).
        model: its model (possibly wrapped by Opacus for DP-SGD).
        optimizer: its optimiser (kept across rounds).
        loader: its training loader.
        dp: the site's :class:`~fl_app.fl.local_dp.SiteDP` when it runs DP-SGD accounted in its ledger
            (None: no DP, or DP the caller accounts itself).
        seed: base seed of the site's local training (``seed + round`` each round, as the client).
    """

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    loader: Any
    dp: Any = None
    seed: int = 0
    steps_taken: int = 0
    refused_rounds: list[int] = field(default_factory=list)


@dataclass
class FederationResult:
    """What :func:`federate` returns: the final global state, the rounds run, each site's total steps."""

    state: dict[str, torch.Tensor]
    rounds: int
    steps_per_site: list[int]
    refused: dict[str, list[int]]


def _train_site(kind: str, site: LocalSite, profile: Profile, steps: int, rnd: int) -> tuple[dict, int]:
    """One round of the model's own local training function at ``site``; ``(result, FedAvg weight)``."""
    if kind == "vqvae":
        from fl_app.train.vqvae_local import train_vqvae_local

        res = train_vqvae_local(
            site.model, site.loader, profile, optimizer=site.optimizer, max_steps=steps,
            seed=site.seed + rnd, amp=profile.train.amp,
        )  # fmt: skip
        return res, int(res["train_volumes"])
    from fl_app.train.prior_local import train_prior_local

    res = train_prior_local(
        site.model, site.loader, profile, optimizer=site.optimizer, max_steps=steps, amp=profile.train.amp
    )
    return res, int(res.get("train_sequences", 1))


def federate(
    kind: str,
    profile: Profile,
    sites: Sequence[LocalSite],
    state: dict[str, torch.Tensor],
    *,
    rounds: int,
    steps: int,
    strategy: AggregationStrategy | None = None,
    on_round: RoundCallback | None = None,
    exported: Sequence[str] | None = None,
) -> FederationResult:
    """Run ``rounds`` federated rounds of ``steps`` local steps per site from the global ``state``.

    Args:
        kind: ``"vqvae"`` or ``"prior"`` (which local training function the sites run).
        profile: the job's profile (local training settings).
        sites: the sites (models built from ``profile``, any DP wrapping done).
        state: the initial global weights (``state_dict`` of the bare model); not modified.
        rounds, steps: rounds, and local optimiser steps per site and round.
        strategy: the server's aggregation strategy (default sample-weighted FedAvg).
        on_round: called after each round's aggregation with the new global state (e.g. to evaluate it
            on held-out data); an exception it raises stops the federation and propagates.
        exported: the tensors a site sends (a fine-tune's trainable subset, ``profile.finetune``); None:
            all of them. The others stay as in ``state``.
    """
    if kind not in ("vqvae", "prior"):
        raise ValueError(f"kind must be vqvae or prior, got {kind!r}")
    from fl_app.privacy.accountant import PrivacyBudgetExceeded

    strategy = strategy or FedAvgStrategy("samples")
    state = {k: v.detach().clone() for k, v in state.items()}
    keys = list(exported) if exported is not None else list(state)
    for rnd in range(rounds):
        updates = []
        for site in sites:
            net = net_of(kind, site.model)
            net.load_state_dict(state)
            if site.dp is not None:
                try:
                    site.dp.check_budget(rnd)
                except PrivacyBudgetExceeded as exc:  # the site refuses the round, as its client would
                    log.error("site %s REFUSED round %d: %s", site.name, rnd, exc)
                    site.refused_rounds.append(rnd)
                    continue
            res, n = _train_site(kind, site, profile, steps, rnd)
            site.steps_taken += int(res["steps"])
            if site.dp is not None:
                site.dp.record_round(rnd)  # on the ledger before the update "leaves" the site
                n = 1  # the sampled count is data-dependent: uniform weight, as the client sends
            new = net.state_dict()
            delta = {k: (new[k].detach().cpu() - state[k]).numpy() for k in keys}
            final = {k: float(v) for k, v in res.get("final", {}).items() if isinstance(v, (int, float))}
            updates.append(ClientUpdate(site.name, delta, max(int(n), 1), metrics=final))
        if updates:  # every site refused: the global model stays as it is (as the server does)
            agg = strategy.aggregate(updates, rnd)
            state = {
                k: state[k] + torch.as_tensor(np.asarray(agg[k])).to(state[k].dtype) if k in agg else state[k]
                for k in state
            }
        if on_round is not None:
            on_round(rnd, state, updates)
    return FederationResult(
        state=state,
        rounds=rounds,
        steps_per_site=[s.steps_taken for s in sites],
        refused={s.name: list(s.refused_rounds) for s in sites if s.refused_rounds},
    )

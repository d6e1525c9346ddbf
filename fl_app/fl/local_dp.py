"""Record-level DP-SGD at a site (Opacus), composed in the site's persistent privacy ledger, with the
site's ε budget enforced by the site's own client.

Per job, :class:`SiteDP`:

1. wraps the model / optimiser / loader with an Opacus ``PrivacyEngine`` (Poisson sampling, per-sample
   clipping to ``max_grad_norm``); the noise multiplier is the site's fixed ``noise_multiplier`` or is
   derived from the job's target ε at the site's δ for the planned ``rounds × steps per round`` at the
   Poisson rate q = batch size / training subjects;
2. before every round, :meth:`SiteDP.check_budget` composes the site's whole ledger (every earlier round
   and job) with this round's planned (σ, q, steps) and refuses -- :class:`PrivacyBudgetExceeded`, logged
   and recorded -- if the total would exceed ``epsilon_budget`` (read from the site YAML only);
3. after training, :meth:`SiteDP.record_round` writes the DP steps the optimiser actually took (Opacus'
   accountant counts every step, empty Poisson batches included) to the ledger, *before* the update
   is sent, keyed by (this process's random session id, round): nothing is counted twice, and a round
   really run again (restarted job) is counted again.

:func:`released_metrics` decides what else leaves the site in a DP job (see docs/PRIVACY.md).
"""

from __future__ import annotations

import logging
import math
import uuid
from pathlib import Path
from typing import Any

from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from fl_app.config import SiteConfig
from fl_app.privacy.accountant import LedgerEntry, PrivacyBudgetExceeded, PrivacyLedger, noise_multiplier_for

log = logging.getLogger(__name__)

__all__ = [
    "ACCOUNTING_METRICS",
    "DATA_INDEPENDENT_METRICS",
    "PrivacyBudgetExceeded",
    "SiteDP",
    "ledger_path",
    "released_metrics",
]

DATA_INDEPENDENT_METRICS = frozenset({"vqvae_checksum"})
"""Metrics that depend only on what the server sent (Σ|w| of the received global VQ-VAE)."""

ACCOUNTING_METRICS = frozenset(
    {"epsilon", "job_epsilon", "dp_noise_multiplier", "dp_sample_rate", "dp_steps", "dp_max_grad_norm",
     "dp_delta", "num_subjects", "num_val_subjects", "skipped_subjects", "unreadable_subjects"}
)  # fmt: skip
"""Released with ``privacy.release: [accounting]``: they reveal the site's subject count (q = B / n)."""


def ledger_path(cfg: SiteConfig) -> Path:
    """The site's ledger file: ``privacy.ledger``, else ``<cache_dir>/privacy_ledger.json``."""
    if cfg.privacy.ledger is not None:
        return Path(cfg.privacy.ledger)
    if cfg.cache_dir is None:
        raise ValueError(
            f"site {cfg.name}: local DP needs a state folder for the privacy ledger: set cache_dir "
            "or privacy.ledger in the site YAML"
        )
    return Path(cfg.cache_dir) / "privacy_ledger.json"


def released_metrics(metrics: dict[str, float], cfg: SiteConfig, dp_on: bool) -> dict[str, float]:
    """The metrics a client may send: all of them without DP; under DP only data-independent ones plus
    the exceptions the site accepted in ``privacy.release``."""
    if not dp_on:
        return dict(metrics)
    allowed = set(DATA_INDEPENDENT_METRICS)
    if "accounting" in cfg.privacy.release:
        allowed |= ACCOUNTING_METRICS
    if "metrics" in cfg.privacy.release:
        return dict(metrics)
    return {k: v for k, v in metrics.items() if k in allowed}


class SiteDP:
    """Opacus DP-SGD for one job at one site, accounted in the site's ledger.

    Args:
        cfg: the site's config (``privacy`` section, name, state folder).
        job_id: NVFlare job id (ledger key).
        job: job kind, ``"vqvae"`` / ``"prior"``.
        planned_rounds: the job's total rounds (plans σ when it is derived from a target ε).
        target_epsilon: the ε the job asks this site to spend on it (None: the site's ``job_epsilon``).
        run: consortium run name (recorded).
    """

    def __init__(
        self,
        cfg: SiteConfig,
        job_id: str,
        job: str,
        planned_rounds: int,
        target_epsilon: float | None = None,
        run: str = "",
    ) -> None:
        if not cfg.privacy.enabled:
            raise ValueError(f"site {cfg.name}: privacy is not enabled in its YAML")
        self.cfg = cfg
        self.p = cfg.privacy
        self.job_id = job_id
        self.job = job
        self.run = run
        self.planned_rounds = max(int(planned_rounds), 1)
        self.target_epsilon = target_epsilon if target_epsilon is not None else self.p.job_epsilon
        self.ledger = PrivacyLedger(ledger_path(cfg), cfg.name, self.p.accountant)
        self.engine = None
        self.noise_multiplier: float | None = None
        self.sample_rate: float | None = None
        self.steps_per_round = 0
        self._steps_recorded = 0
        self._audit = None
        self.session = uuid.uuid4().hex

    def make_private(
        self, model: nn.Module, optimizer: Optimizer, loader: DataLoader, steps_per_round: int
    ) -> tuple[nn.Module, Optimizer, DataLoader]:
        """Opacus ``make_private`` (Poisson sampling) with σ fixed or derived from the target ε.

        Args:
            model: a DP-compatible model (e.g. ``build_vqvae(profile, dp=True)``).
            optimizer: its optimiser.
            loader: the training loader (batch size B over n subjects: q = 1 / len(loader)).
            steps_per_round: local DP steps planned per round.
        """
        from opacus import PrivacyEngine

        self.sample_rate = 1.0 / len(loader)
        self.steps_per_round = int(steps_per_round)
        if self.p.noise_multiplier is not None:
            sigma = float(self.p.noise_multiplier)
        elif self.target_epsilon is not None:
            planned = self.planned_rounds * self.steps_per_round
            sigma = noise_multiplier_for(
                self.target_epsilon, self.p.delta, self.sample_rate, planned, self.p.accountant
            )
        else:
            raise ValueError(
                f"site {self.cfg.name}: no noise multiplier: set privacy.noise_multiplier or privacy.job_epsilon "
                "in the site YAML, or run the job with a target ε (--dp-epsilon)"
            )
        self.noise_multiplier = sigma
        self.engine = PrivacyEngine(accountant=self.p.accountant)
        named = {id(p): n for n, p in model.named_parameters()}
        out = self.engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=sigma,
            max_grad_norm=self.p.max_grad_norm,
            poisson_sampling=True,
        )
        log.info(
            "site %s job %s: DP-SGD σ=%.4g, C=%g, q=%.4g, %d steps/round × %d rounds (target ε=%s at δ=%g)",
            self.cfg.name, self.job, sigma, self.p.max_grad_norm, self.sample_rate, self.steps_per_round,
            self.planned_rounds, self.target_epsilon, self.p.delta,
        )  # fmt: skip
        from fl_app.fl.leak_audit import audit_dir, enable_optimizer_audit

        if audit_dir():  # leak-audit mode (tests): record the released gradients of every DP step
            self._audit = enable_optimizer_audit(out[1], named, Path(audit_dir()) / self.cfg.name / self.job)
        return out

    def check_budget(self, round_num: int) -> float:
        """Refuse (raise :class:`PrivacyBudgetExceeded`, recorded in the ledger) unless this round fits.

        Returns:
            the site's total ε after this round's planned steps.
        """
        planned = [(self.noise_multiplier, self.sample_rate, self.steps_per_round)]
        try:
            return self.ledger.check(planned, self.p.delta, self.p.epsilon_budget)
        except PrivacyBudgetExceeded as exc:
            self.ledger.record_refusal(self.job_id, self.job, round_num, str(exc))
            raise

    def _accountant_steps(self) -> int:
        if self.engine is None:
            return 0
        return int(sum(n for _, _, n in self.engine.accountant.history))

    def record_round(self, round_num: int) -> LedgerEntry:
        """Write this round's DP steps (from Opacus' accountant) to the ledger; call before sending."""
        steps = self._accountant_steps() - self._steps_recorded
        entry = LedgerEntry(
            job_id=self.job_id,
            job=self.job,
            round=int(round_num),
            noise_multiplier=float(self.noise_multiplier),
            sample_rate=float(self.sample_rate),
            steps=int(steps),
            max_grad_norm=float(self.p.max_grad_norm),
            run=self.run,
            session=self.session,
        )
        self.ledger.record(entry)
        self._steps_recorded += steps
        if self._audit is not None:
            self._audit.flush(round_num)
        return entry

    def epsilon(self) -> float:
        """Total ε the site has spent (every job in its ledger) at its δ."""
        return self.ledger.epsilon(self.p.delta)

    def job_epsilon(self) -> float:
        """ε spent on this job."""
        return self.ledger.epsilon(self.p.delta, session=self.session)

    def accounting_metrics(self) -> dict[str, float]:
        """Accounting values for the round's reply (released only with ``release: [accounting]``)."""
        eps = self.epsilon()
        return {
            "epsilon": eps if math.isfinite(eps) else -1.0,
            "job_epsilon": self.job_epsilon(),
            "dp_noise_multiplier": float(self.noise_multiplier or 0.0),
            "dp_sample_rate": float(self.sample_rate or 0.0),
            "dp_steps": float(self._steps_recorded),
            "dp_max_grad_norm": float(self.p.max_grad_norm),
            "dp_delta": float(self.p.delta),
        }

    def describe(self) -> dict[str, Any]:
        return {"site": self.cfg.name, "job": self.job, "job_id": self.job_id, **self.accounting_metrics(),
                "epsilon_budget": self.p.epsilon_budget, "ledger": str(self.ledger.path)}  # fmt: skip

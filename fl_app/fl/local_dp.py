"""Local DP-SGD at a site, as the site's YAML asks (``privacy:``), with its privacy budget enforced.

The Opacus ``PrivacyEngine`` lives as long as the client process, so the accountant counts every DP step
the site ever released in this job (all rounds). Before each round :meth:`SiteDP.check_budget` refuses
to train once the spent ε has reached the site's ``epsilon_budget``.
"""

from __future__ import annotations

import logging
import math

from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from fl_app.fl.site import SitePrivacy

log = logging.getLogger(__name__)


class PrivacyBudgetExceeded(RuntimeError):
    """The site's ε budget is spent: its client stops contributing."""


class SiteDP:
    """Wraps the model/optimiser/loader with Opacus and tracks ε.

    Args:
        cfg: the site's ``privacy`` section (noise multiplier, clipping norm, δ, ε budget).
    """

    def __init__(self, cfg: SitePrivacy) -> None:
        from opacus import PrivacyEngine

        self.cfg = cfg
        self.engine = PrivacyEngine(accountant="prv")

    def make_private(
        self, model: nn.Module, optimizer: Optimizer, loader: DataLoader
    ) -> tuple[nn.Module, Optimizer, DataLoader]:
        """Opacus ``make_private`` with Poisson sampling (the model must be DP-compatible)."""
        return self.engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=self.cfg.noise_multiplier,
            max_grad_norm=self.cfg.max_grad_norm,
            poisson_sampling=True,
        )

    def epsilon(self) -> float:
        """ε spent so far at the site's δ (0 before the first step)."""
        try:
            return float(self.engine.get_epsilon(self.cfg.delta))
        except (ValueError, ZeroDivisionError):
            return 0.0

    def check_budget(self, site: str) -> None:
        """Raise :class:`PrivacyBudgetExceeded` once the spent ε reaches the site's budget."""
        budget = self.cfg.epsilon_budget
        eps = self.epsilon()
        if budget is not None and math.isfinite(eps) and eps >= budget:
            raise PrivacyBudgetExceeded(f"site {site}: privacy budget spent (ε = {eps:.2f} ≥ {budget:g})")

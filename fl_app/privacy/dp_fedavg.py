"""Server-side differential privacy: DP-FedAvg (McMahan et al. 2018), with optional adaptive clipping
(Andrew et al. 2021), as an :class:`~fl_app.privacy.aggregation.AggregationStrategy`.

Each round, with the n participating sites' updates Δ_i (all float tensors of the model as one vector):

    Δ̃_i = Δ_i · min(1, C / ‖Δ_i‖₂)                       (clip each site's whole update to L2 norm C)
    Δ   = (Σ_i Δ̃_i + N(0, σ_Δ² C² I)) / n                 (uniform average, Gaussian noise on the sum)

This is the Gaussian mechanism on a sum with L2 sensitivity C under add/remove of one site's entire
contribution, so each round is one step of (σ, q = 1) and the job's *site-level* ε over R rounds is that
of R such steps (Opacus RDP accountant; every invited site takes part every round, so there is no
sampling amplification). The number of participating sites n is treated as public (the server sees who
answered). The server sees the raw updates: this protects every site's data against everyone who gets
the global model (and the other sites), not against the server operator -- record-level DP-SGD at the
sites does that.

Adaptive clipping (``target_quantile`` γ set): the server also releases the noisy fraction of sites whose
update norm was ≤ C, b = (Σ_i 1[‖Δ_i‖ ≤ C] + N(0, σ_b²)) / n, and moves C ← C·exp(−η (b − γ)). The
two releases share the budget: with the nominal σ accounted for, the update noise is
σ_Δ = (σ⁻² − (2σ_b)⁻²)^(−1/2) (Andrew et al., Thm. 1), so the per-round privacy is that of a single
Gaussian mechanism with noise multiplier σ.

Integer tensors (e.g. the prior's fixed permutation buffers) must arrive unchanged (zero update):
they are data-independent, and a non-zero integer update is rejected.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from fl_app.privacy.accountant import clip_by_global_norm, epsilon_from_history, gaussian_noise, global_norm
from fl_app.privacy.aggregation import AggregationStrategy, ClientUpdate

log = logging.getLogger(__name__)

__all__ = ["DPFedAvgStrategy", "dp_fedavg_aggregate", "dp_fedavg_strategy", "effective_update_noise"]


def effective_update_noise(noise_multiplier: float, quantile_noise: float | None) -> float:
    """σ_Δ for the update when ``quantile_noise`` σ_b is also spent on the clipped-fraction estimate."""
    if quantile_noise is None:
        return noise_multiplier
    if noise_multiplier <= 0:
        return 0.0
    inv = noise_multiplier**-2 - (2.0 * quantile_noise) ** -2
    if inv <= 0:
        raise ValueError(
            f"quantile_noise {quantile_noise} too small for noise_multiplier {noise_multiplier}: "
            "need 2·quantile_noise > noise_multiplier"
        )
    return inv**-0.5


def dp_fedavg_aggregate(
    deltas: Sequence[dict[str, np.ndarray]],
    clip: float,
    noise_std_multiplier: float,
    rng: np.random.Generator,
) -> tuple[dict[str, np.ndarray], list[float]]:
    """One DP-FedAvg round on float tensors: clip each update to ``clip``, sum, add noise, divide by n.

    Args:
        deltas: one ``{name: float array}`` per site (same keys and shapes).
        clip: L2 bound C of each site's whole update.
        noise_std_multiplier: σ_Δ; the noise on the sum has std σ_Δ·C per coordinate.
        rng: noise source.

    Returns:
        ``(noised mean update {name: float64 array}, each site's update norm before clipping)``.
    """
    if not deltas:
        raise ValueError("no updates")
    n = len(deltas)
    total: dict[str, np.ndarray] = {k: np.zeros(np.shape(v), dtype=np.float64) for k, v in deltas[0].items()}
    norms = []
    for d in deltas:
        clipped, norm = clip_by_global_norm(d, clip)
        norms.append(norm)
        for k, v in clipped.items():
            total[k] += v
    noise = gaussian_noise({k: v.shape for k, v in total.items()}, noise_std_multiplier * clip, rng)
    return {k: (total[k] + noise[k]) / n for k in total}, norms


class DPFedAvgStrategy(AggregationStrategy):
    """DP-FedAvg with site-level (user-level) accounting; optional adaptive clipping.

    Args:
        noise_multiplier: σ, noise std on the sum divided by the clip bound (privacy per round).
        clip: initial (or fixed) L2 clip bound C of a site's update.
        delta: δ at which ε is reported.
        target_quantile: γ ∈ (0, 1) for adaptive clipping (None: fixed C).
        clip_lr: η, the geometric learning rate of the clip bound.
        quantile_noise: σ_b, noise std of the count of unclipped sites (default max(1, σ), so that the
            update noise grows by at most 2/√3 ≈ 1.15×).
        accountant: ``"rdp"`` or ``"prv"``.
        seed: noise RNG seed (None: OS entropy -- use that in production).
    """

    name = "dp-fedavg"

    def __init__(
        self,
        noise_multiplier: float = 1.0,
        clip: float = 1.0,
        delta: float = 1e-5,
        target_quantile: float | None = None,
        clip_lr: float = 0.2,
        quantile_noise: float | None = None,
        accountant: str = "rdp",
        seed: int | None = None,
    ) -> None:
        if noise_multiplier < 0 or clip <= 0:
            raise ValueError("need noise_multiplier ≥ 0 and clip > 0")
        if target_quantile is not None and not 0 < target_quantile < 1:
            raise ValueError("target_quantile must be in (0, 1)")
        self.noise_multiplier = float(noise_multiplier)
        self.clip = float(clip)
        self.initial_clip = float(clip)
        self.delta = float(delta)
        self.target_quantile = target_quantile
        self.clip_lr = float(clip_lr)
        self.quantile_noise = (
            (quantile_noise if quantile_noise is not None else max(1.0, self.noise_multiplier))
            if target_quantile is not None
            else None
        )
        self.update_noise = effective_update_noise(self.noise_multiplier, self.quantile_noise)
        self.accountant = accountant
        self.seed = seed
        self._rng = np.random.default_rng(seed)
        self.rounds_noised = 0
        self.last_round: dict[str, Any] = {}

    # -- resume: the checkpoint history holds one describe() per completed round
    def restore(self, history: Sequence[dict[str, Any]]) -> None:
        """Continue after a server restart: rounds already noised and the adapted clip bound."""
        recs = [
            h.get("aggregation", {}) for h in history if h.get("aggregation", {}).get("name") == self.name
        ]
        self.rounds_noised = sum(1 for r in recs if r.get("round_noised"))
        if recs and recs[-1].get("next_clip") is not None:
            self.clip = float(recs[-1]["next_clip"])
        if self.seed is not None:
            self._rng = np.random.default_rng([self.seed, len(history)])

    def aggregate(self, updates: Sequence[ClientUpdate], round_num: int) -> dict[str, np.ndarray]:
        keys = list(updates[0].delta.keys())
        float_keys, int_keys = [], []
        for k in keys:
            arr = np.asarray(updates[0].delta[k])
            (float_keys if np.issubdtype(arr.dtype, np.floating) else int_keys).append(k)
        for u in updates:
            if set(u.delta) != set(keys):
                raise ValueError(f"{u.site}: update carries different tensors")
            for k in int_keys:
                if np.any(np.asarray(u.delta[k]) != 0):
                    raise ValueError(f"{u.site}: non-zero update of integer tensor {k} under DP-FedAvg")
        deltas = [{k: np.asarray(u.delta[k]) for k in float_keys} for u in updates]
        clip = self.clip
        mean, norms = dp_fedavg_aggregate(deltas, clip, self.update_noise, self._rng)
        n = len(updates)
        next_clip = clip
        noisy_frac = None
        if self.target_quantile is not None:
            below = sum(1.0 for x in norms if x <= clip)
            noisy_frac = (below + self._rng.normal(0.0, self.quantile_noise)) / n
            next_clip = clip * math.exp(-self.clip_lr * (noisy_frac - self.target_quantile))
        self.clip = next_clip
        self.rounds_noised += 1
        self.last_round = {
            "round": int(round_num),
            "round_noised": True,
            "sites": n,
            "clip": clip,
            "next_clip": next_clip,
            "noisy_fraction_unclipped": noisy_frac,
            "update_norm_after_noise": global_norm(mean),
        }
        # norms before clipping are not released (they are data-dependent): only the noisy fraction is
        log.info("DP-FedAvg round %d: %d sites, C=%.4g, σ=%.3g", round_num, n, clip, self.noise_multiplier)
        out: dict[str, np.ndarray] = {}
        for k in keys:
            dtype = np.asarray(updates[0].delta[k]).dtype
            out[k] = mean[k].astype(dtype) if k in mean else np.zeros_like(np.asarray(updates[0].delta[k]))
        return out

    def epsilon(self) -> float:
        """Site-level ε at δ over the rounds noised so far (this job, resumes included)."""
        return epsilon_from_history(
            [(self.noise_multiplier, 1.0, self.rounds_noised)], self.delta, self.accountant
        )

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "level": "site",
            "noise_multiplier": self.noise_multiplier,
            "update_noise_multiplier": self.update_noise,
            "clip": self.initial_clip,
            "adaptive_clipping": self.target_quantile is not None,
            "target_quantile": self.target_quantile,
            "quantile_noise": self.quantile_noise,
            "sample_rate": 1.0,
            "delta": self.delta,
            "accountant": self.accountant,
            "rounds": self.rounds_noised,
            "epsilon": self.epsilon(),
            **self.last_round,
        }


def dp_fedavg_strategy(
    noise_multiplier: float = 1.0,
    clip: float = 1.0,
    target_quantile: float | None = None,
    delta: float = 1e-5,
    seed: int | None = None,
) -> tuple[str, dict[str, Any]]:
    """``(strategy_path, strategy_args)`` selecting :class:`DPFedAvgStrategy` in a job."""
    args: dict[str, Any] = {"noise_multiplier": noise_multiplier, "clip": clip, "delta": delta}
    if target_quantile is not None:
        args["target_quantile"] = target_quantile
    if seed is not None:
        args["seed"] = seed
    return f"{__name__}.DPFedAvgStrategy", args

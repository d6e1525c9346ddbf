"""Server-side aggregation of client updates: sample-weighted FedAvg, pluggable.

Clients send *updates* (``local weights − received global weights``, NVFlare ``ParamsType.DIFF``) with
their sample count in ``meta["NUM_STEPS_CURRENT_ROUND"]``. The server adds the aggregated update to the
global model. The math lives in plain functions and :class:`AggregationStrategy` subclasses that take
and return ``dict[str, numpy.ndarray]``, so unit tests (and the DP issue's DP-FedAvg) need no NVFlare:

    class DPFedAvgStrategy(AggregationStrategy):
        def aggregate(self, updates, round_num):
            ... clip each update's delta to norm C, average, add N(0, (σC/n)²) ...
        def describe(self):
            return {"name": "dp-fedavg", "noise_multiplier": σ, "clip": C, "epsilon": ...}

:class:`fl_app.fl.server.SynthAggregator` is the NVFlare ``ModelAggregator`` that the federated jobs put
into the FedAvg controller; it gathers :class:`ClientUpdate` objects and calls the configured strategy, named by its
dotted class path (``strategy_path``) and keyword arguments (``strategy_args``), so a job switches to
DP-FedAvg by changing two strings in its definition.
"""

from __future__ import annotations

import importlib
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

__all__ = [
    "NUM_SAMPLES_KEY",
    "AggregationStrategy",
    "ClientUpdate",
    "FedAvgStrategy",
    "load_strategy",
    "weighted_average",
    "weighted_metrics",
]

NUM_SAMPLES_KEY = "NUM_STEPS_CURRENT_ROUND"
"""FLModel meta key carrying the client's training-sample count (NVFlare's FedAvg weight key)."""

DEFAULT_STRATEGY = "fl_app.privacy.aggregation.FedAvgStrategy"


@dataclass
class ClientUpdate:
    """One client's contribution to one round.

    Attributes:
        site: client name.
        delta: ``{param name: array}``, local minus received global weights.
        num_samples: training volumes / sequences used this round (FedAvg weight).
        metrics: scalar metrics the client reported (training loss, validation PSNR, ...).
    """

    site: str
    delta: dict[str, np.ndarray]
    num_samples: int
    metrics: dict[str, float] = field(default_factory=dict)


def _as_array(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # torch tensor (ExchangeFormat.PYTORCH)
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def weighted_average(deltas: Sequence[Mapping[str, Any]], weights: Sequence[float]) -> dict[str, np.ndarray]:
    """``Σ_i w_i·delta_i / Σ_i w_i`` per parameter.

    Args:
        deltas: one ``{name: array}`` per client, all with the same keys and shapes.
        weights: one non-negative weight per client, not all zero.

    Returns:
        ``{name: array}`` in each parameter's original dtype (integer buffers are rounded).
    """
    if len(deltas) != len(weights) or not deltas:
        raise ValueError("need one weight per update and at least one update")
    w = np.asarray(weights, dtype=np.float64)
    if np.any(w < 0) or not np.isfinite(w).all() or w.sum() <= 0:
        raise ValueError(f"weights must be finite, non-negative and not all zero: {list(weights)}")
    w = w / w.sum()
    keys = list(deltas[0].keys())
    for d in deltas[1:]:
        if set(d.keys()) != set(keys):
            raise ValueError("updates carry different parameter names")
    out: dict[str, np.ndarray] = {}
    for k in keys:
        arrays = [_as_array(d[k]) for d in deltas]
        acc = np.zeros(arrays[0].shape, dtype=np.float64)
        for wi, a in zip(w, arrays, strict=True):
            if a.shape != acc.shape:
                raise ValueError(f"{k}: shapes differ between updates ({a.shape} vs {acc.shape})")
            acc += wi * a.astype(np.float64)
        dtype = arrays[0].dtype
        out[k] = np.rint(acc).astype(dtype) if np.issubdtype(dtype, np.integer) else acc.astype(dtype)
    return out


def weighted_metrics(updates: Sequence[ClientUpdate]) -> dict[str, float]:
    """Sample-weighted mean of each scalar metric over the clients that reported it (NaNs skipped)."""
    sums: dict[str, float] = {}
    norms: dict[str, float] = {}
    for u in updates:
        for k, v in u.metrics.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
                continue
            sums[k] = sums.get(k, 0.0) + u.num_samples * float(v)
            norms[k] = norms.get(k, 0.0) + u.num_samples
    return {k: sums[k] / norms[k] for k in sums if norms[k] > 0}


class AggregationStrategy:
    """How the server turns one round's client updates into one global update (subclass me)."""

    name = "base"

    def aggregate(self, updates: Sequence[ClientUpdate], round_num: int) -> dict[str, np.ndarray]:
        """Combine ``updates`` (at least one) into the update added to the global model."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """JSON-able description for the model card (name, parameters, privacy spent if any)."""
        return {"name": self.name}


class FedAvgStrategy(AggregationStrategy):
    """Sample-weighted federated averaging (McMahan et al. 2017) of the client updates.

    Args:
        weighting: ``"samples"`` (weight = samples used this round) or ``"uniform"``.
    """

    name = "fedavg"

    def __init__(self, weighting: str = "samples") -> None:
        if weighting not in ("samples", "uniform"):
            raise ValueError(f"weighting must be 'samples' or 'uniform', got {weighting!r}")
        self.weighting = weighting

    def aggregate(self, updates: Sequence[ClientUpdate], round_num: int) -> dict[str, np.ndarray]:
        weights = [float(max(u.num_samples, 0)) if self.weighting == "samples" else 1.0 for u in updates]
        if sum(weights) <= 0:
            weights = [1.0] * len(updates)
        return weighted_average([u.delta for u in updates], weights)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "weighting": self.weighting}


def load_strategy(path: str = DEFAULT_STRATEGY, args: Mapping[str, Any] | None = None) -> AggregationStrategy:
    """Instantiate an :class:`AggregationStrategy` from its dotted class path and keyword arguments."""
    module, _, cls_name = path.rpartition(".")
    if not module:
        raise ValueError(f"strategy path must be 'package.module.Class', got {path!r}")
    cls = getattr(importlib.import_module(module), cls_name)
    strategy = cls(**dict(args or {}))
    if not isinstance(strategy, AggregationStrategy):
        raise TypeError(f"{path} is not an AggregationStrategy")
    return strategy

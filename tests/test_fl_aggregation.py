"""Server aggregation math (no NVFlare run): sample-weighted FedAvg, strategy loading, the NVFlare adapter."""

from __future__ import annotations

import numpy as np
import pytest
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

from fl_app.fl.server import SynthAggregator
from fl_app.privacy.aggregation import (
    NUM_SAMPLES_KEY,
    AggregationStrategy,
    ClientUpdate,
    FedAvgStrategy,
    load_strategy,
    weighted_average,
    weighted_metrics,
)


def test_weighted_average_is_sample_weighted():
    a = {"w": np.array([1.0, 2.0], dtype=np.float32), "n": np.array([2], dtype=np.int64)}
    b = {"w": np.array([4.0, 8.0], dtype=np.float32), "n": np.array([5], dtype=np.int64)}
    out = weighted_average([a, b], [1, 3])
    np.testing.assert_allclose(out["w"], [(1 + 12) / 4, (2 + 24) / 4])
    assert out["w"].dtype == np.float32
    assert out["n"].dtype == np.int64 and int(out["n"][0]) == 4  # round(4.25)


def test_weighted_average_rejects_bad_input():
    with pytest.raises(ValueError):
        weighted_average([{"w": np.zeros(2)}], [0.0])
    with pytest.raises(ValueError):
        weighted_average([{"w": np.zeros(2)}, {"v": np.zeros(2)}], [1, 1])
    with pytest.raises(ValueError):
        weighted_average([{"w": np.zeros(2)}, {"w": np.zeros(3)}], [1, 1])


def test_fedavg_strategy_weights_and_uniform():
    ups = [ClientUpdate("a", {"w": np.array([0.0])}, 1), ClientUpdate("b", {"w": np.array([10.0])}, 9)]
    assert float(FedAvgStrategy().aggregate(ups, 0)["w"][0]) == pytest.approx(9.0)
    assert float(FedAvgStrategy("uniform").aggregate(ups, 0)["w"][0]) == pytest.approx(5.0)
    assert FedAvgStrategy().describe() == {"name": "fedavg", "weighting": "samples"}


def test_weighted_metrics_skip_nan():
    ups = [
        ClientUpdate("a", {}, 1, {"psnr": 10.0, "x": float("nan")}),
        ClientUpdate("b", {}, 3, {"psnr": 20.0, "x": 2.0}),
    ]
    m = weighted_metrics(ups)
    assert m["psnr"] == pytest.approx(17.5)
    assert m["x"] == pytest.approx(2.0)


class _Median(AggregationStrategy):
    name = "median"

    def aggregate(self, updates, round_num):
        return {k: np.median(np.stack([u.delta[k] for u in updates]), axis=0) for k in updates[0].delta}


def test_strategy_is_pluggable_by_path():
    s = load_strategy("fl_app.privacy.aggregation.FedAvgStrategy", {"weighting": "uniform"})
    assert isinstance(s, FedAvgStrategy) and s.weighting == "uniform"
    with pytest.raises(TypeError):
        load_strategy("collections.OrderedDict")
    agg = SynthAggregator(f"{__name__}._Median")
    for i, v in enumerate([1.0, 2.0, 100.0]):
        agg.accept_model(
            FLModel(
                params={"w": np.array([v])},
                params_type=ParamsType.DIFF,
                meta={NUM_SAMPLES_KEY: 1, "client_name": f"s{i}"},
            )
        )
    res = agg.aggregate_model()
    assert float(res.params["w"][0]) == 2.0
    assert res.meta["aggregation"] == {"name": "median"}


def test_synth_aggregator_fedavg_and_reset():
    agg = SynthAggregator()
    agg.accept_model(
        FLModel(
            params={"w": np.array([2.0])},
            params_type=ParamsType.DIFF,
            metrics={"loss": 1.0},
            meta={NUM_SAMPLES_KEY: 1, "client_name": "site-1"},
        )
    )
    agg.accept_model(
        FLModel(
            params={"w": np.array([6.0])},
            params_type=ParamsType.DIFF,
            metrics={"loss": 3.0},
            meta={NUM_SAMPLES_KEY: 3, "client_name": "site-2"},
        )
    )
    res = agg.aggregate_model()
    assert res.params_type == ParamsType.DIFF
    assert float(res.params["w"][0]) == pytest.approx(5.0)
    assert res.metrics["loss"] == pytest.approx(2.5)
    assert res.meta["site_metrics"]["site-2"]["num_samples"] == 3
    empty = agg.aggregate_model()  # stats were reset: no updates (all sites refused) -> no change
    assert empty.params == {} and empty.meta["aggregation"]["round_noised"] is False
    with pytest.raises(ValueError):  # full weights are refused: clients must send updates
        agg.accept_model(FLModel(params={"w": np.array([1.0])}, params_type=ParamsType.FULL, meta={}))

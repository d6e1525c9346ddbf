"""bench/dp_clip.py: the DP-SGD clip bound from per-sample gradient norms on public data at a checkpoint."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import dp_clip


def test_round_up_keeps_two_significant_figures() -> None:
    assert dp_clip._round_up(0.2474) == pytest.approx(0.25)
    assert dp_clip._round_up(0.2696) == pytest.approx(0.27)
    assert dp_clip._round_up(0.0910) == pytest.approx(0.091)
    assert dp_clip._round_up(3.01) == pytest.approx(3.1)


def test_stats_separate_shared_from_per_sample_directions() -> None:
    """Gradients that share one direction have cosine 1 to their mean; opposite ones cancel in the mean."""
    d = torch.zeros(10)
    d[0] = 1.0
    same = dp_clip.grad_norm_stats([s * d for s in (0.1, 0.2, 0.3, 0.4, 0.5)])
    assert same["norm_median"] == pytest.approx(0.3) and same["mean_cosine_to_mean"] == pytest.approx(1.0)
    assert same["mean_gradient_norm"] == pytest.approx(0.3) and same["recommended_clip"] == pytest.approx(0.3)
    assert same["norm_p10"] < same["norm_median"] < same["norm_p90"] and same["trainable_parameters"] == 10
    opposite = dp_clip.grad_norm_stats([d, -d])
    assert opposite["mean_gradient_norm"] == pytest.approx(0.0) and opposite["norm_median"] == pytest.approx(
        1.0
    )


def test_clip_bound_of_each_subset_at_a_checkpoint(tmp_path) -> None:
    """From a checkpoint folder: one row per VQ-VAE and prior subset, over the public subjects, with the
    subset's own parameter count; the recommendation is the median rounded up."""
    from fl_app.config import load_profile
    from fl_app.models.finetune import trainable_names
    from fl_app.models.vqvae import build_vqvae
    from tests.test_bench_dp_utility import TINY_BENCH
    from tests.test_finetune import _checkpoint_dir

    prof = load_profile("cpu-demo", TINY_BENCH)
    ck = tmp_path / "ck"
    ck.mkdir()
    _checkpoint_dir(ck, prof)
    rep = dp_clip.run(dp_clip.parse_args(["--init", str(ck), "--sites", "2", "--subjects", "2",
                                          "--vqvae-subsets", "decoder_out", "biases",
                                          "--prior-subsets", "prior_last"]))  # fmt: skip
    assert set(rep["vqvae"]) == {"decoder_out", "biases"} and set(rep["prior"]) == {"prior_last"}
    vq = build_vqvae(prof, dp=True)
    n_out = sum(p.numel() for n, p in vq.named_parameters() if n in trainable_names(vq, ["decoder_out"]))
    row = rep["vqvae"]["decoder_out"]
    assert row["n"] == 4 and row["trainable_parameters"] == n_out
    assert 0 < row["norm_p10"] <= row["norm_median"] <= row["norm_p90"]
    assert row["norm_median"] <= row["recommended_clip"] < 1.1 * row["norm_median"]
    assert rep["prior"]["prior_last"]["norm_median"] > 0
    assert rep["public_seed"] == 7000

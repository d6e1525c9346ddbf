"""The config schema: profiles load, bad keys and values are named, site YAML paths resolve."""

from __future__ import annotations

from pathlib import Path

import pytest

from fl_app.config import ConfigError, builtin_profiles, load_profile, load_site_config


def test_builtin_profiles():
    assert {"cpu-demo", "full-1mm"} <= set(builtin_profiles())
    demo = load_profile("cpu-demo")
    assert demo.data.shape == (64, 64, 64) and demo.data.spacing == (3.0, 3.0, 3.0)
    assert demo.code_shape[0] * demo.code_shape[1] * demo.code_shape[2] <= 1000
    full = load_profile("full-1mm")
    assert full.data.shape == (160, 224, 160) and full.data.spacing == (1.0, 1.0, 1.0)
    assert full.code_shape in ((10, 14, 10), (20, 28, 20))
    assert full.train.amp == "bf16"


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ({"vqvae": {"num_embedings": 3}}, "vqvae.num_embedings: unknown key"),
        ({"data": {"spacing": [1, -1, 2]}}, "data.spacing"),
        ({"train": {"batch_size": 0}}, "train.batch_size"),
        ({"prior": {"attention": "flash"}}, "prior.attention"),
        ({"data": {"shape": [60, 64, 64]}}, "divisible"),
        ({"bogus": 1}, "bogus: unknown key"),
    ],
)
def test_bad_values_are_named(override, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_profile("cpu-demo", override)


def test_profile_file_extends(tmp_path):
    p = tmp_path / "mine.yaml"
    p.write_text("extends: cpu-demo\ntrain:\n  epochs: 3\n")
    prof = load_profile(p)
    assert prof.name == "mine" and prof.train.epochs == 3 and prof.data.shape == (64, 64, 64)
    with pytest.raises(ConfigError, match="unknown profile"):
        load_profile("no-such-profile")


def test_site_config(tmp_path):
    (tmp_path / "site.yaml").write_text(
        "name: st-thomas\nbids_dir: data/bids\nmin_subjects: 10\ncolumns:\n  age: age_at_scan\n"
    )
    cfg = load_site_config(tmp_path / "site.yaml")
    assert cfg.bids_dir == (tmp_path / "data" / "bids").resolve()
    assert cfg.columns.age == "age_at_scan" and cfg.min_subjects == 10
    (tmp_path / "bad.yaml").write_text("name: x\nmin_subject: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: min_subject: unknown key"):
        load_site_config(tmp_path / "bad.yaml")
    (tmp_path / "bad2.yaml").write_text("columns:\n  sex_values: {W: X}\n")
    with pytest.raises(ConfigError, match=r"columns\.sex_values\.W"):
        load_site_config(tmp_path / "bad2.yaml")


SHIPPED_SITES = sorted((Path(__file__).resolve().parents[1] / "site_configs").glob("hospital-*.yaml"))


@pytest.mark.parametrize("path", SHIPPED_SITES, ids=lambda p: p.stem)
def test_shipped_site_yamls_load_whole(path, tmp_path, capsys):
    """The site YAMLs README and COHORTS.md tell sites to pass are one config: data, privacy, compute, training."""
    from fl_app.cli import main

    cfg = load_site_config(path)
    assert cfg.name == path.stem and cfg.path == path
    assert cfg.privacy.epsilon_budget and cfg.compute.device == "auto" and cfg.training.batch_size is None
    # site check and audit-site read the same file; they get past the config to the (absent) data
    assert main(["site", "check", "--config", str(path), "--bids", str(tmp_path / "none"), "--quiet"]) == 1
    assert "unknown key" not in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match=r"profile\.yaml"):  # the (absent) cohort, after the config
        main(
            [
                "audit-site",
                "--config",
                str(path),
                "--cohort",
                str(tmp_path / "c"),
                "--out",
                str(tmp_path / "o"),
            ]
        )

"""``synthbrain tune``: a tiny Optuna study over in-process federated runs (32³ volumes, tiny networks, 1 local
step per round) end to end on SQLite, resumed in the same database, a clearly worse trial pruned through the
real reporting path, DP sites charged on their ledgers, ``best.yaml`` applied with ``--set-file``, and the
search-space checks. No timing is asserted."""

from __future__ import annotations

import json
import re
from pathlib import Path

import optuna
import pytest
import yaml

from fl_app.cli import build_parser, main
from fl_app.config import ConfigError, load_profile, overrides_from_args, read_set_file
from fl_app.tune import load_space

TINY = [
    "--set", "data.shape=[32,32,32]", "--set", "data.spacing=[5,5,5]",
    "--set", "vqvae.channels=[8,16]", "--set", "vqvae.num_res_channels=[8,16]",
    "--set", "vqvae.num_embeddings=32", "--set", "prior.d_model=16", "--set", "prior.n_layers=1",
    "--set", "prior.n_heads=2", "--set", "train.batch_size=2",
]  # fmt: skip
SIZE = ["--sites", "2", "--subjects", "3", "--held-subjects", "2", "--rounds", "1", "--steps", "1", "--quiet"]


def _tune(out: Path, space: Path, *extra: str, study: str = "s", job: str = "vqvae") -> int:
    argv = ["tune", "--job", job, "--space", str(space), "--study", study, "--out", str(out), *SIZE, *TINY]
    return main([*argv, *extra])


def _space(tmp: Path, text: str, name: str = "space.yaml") -> Path:
    p = tmp / name
    p.write_text(text)
    return p


def _load(out: Path, study: str = "s") -> optuna.Study:
    return optuna.load_study(study_name=study, storage=f"sqlite:///{out / 'study.db'}")


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-trial study, then the same command with --trials 3: it resumes in the same database."""
    tmp = tmp_path_factory.mktemp("tune")
    space = _space(
        tmp, "vqvae.lr: {low: 0.0005, high: 0.01, log: true}\nvqvae.entropy_weight: {choices: [0.0, 0.2]}\n"
    )
    out = tmp / "study"
    assert _tune(out, space, "--trials", "2") == 0
    first = _load(out)
    (tmp / "first.json").write_text(json.dumps([[t.number, t.params, t.state.name] for t in first.trials]))
    (tmp / "data_mtime").write_text(str((out / "data" / "data.json").stat().st_mtime_ns))
    assert _tune(out, space, "--trials", "3") == 0
    return out


def test_tiny_study_runs_end_to_end_and_resumes(study_dir: Path) -> None:
    study = _load(study_dir)
    assert len(study.trials) == 3  # 2, then continued to 3 in the same database
    first = json.loads((study_dir.parent / "first.json").read_text())
    assert [[t.number, t.params, t.state.name] for t in study.trials[:2]] == first  # the first two kept
    assert all(t.state.name in ("COMPLETE", "PRUNED") for t in study.trials)
    # the simulated data was made once and reused by the resumed run
    assert (study_dir / "data" / "data.json").stat().st_mtime_ns == int(
        (study_dir.parent / "data_mtime").read_text()
    )
    # trial 0 is the profile's own values (the baseline)
    t0 = study.trials[0]
    assert t0.user_attrs["baseline"] is True
    assert t0.params == {"vqvae.lr": 0.002, "vqvae.entropy_weight": 0.2}
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE  # PSNR
    for t in study.trials:
        assert "round_0" in t.user_attrs and "psnr_db" in t.user_attrs["round_0"]
    summary = json.loads((study_dir / "summary.json").read_text())
    assert summary["best"]["number"] == study.best_trial.number
    assert summary["states"].get("COMPLETE", 0) + summary["states"].get("PRUNED", 0) == 3


def test_report_is_offline_html_with_the_plots_and_table(study_dir: Path) -> None:
    page = (study_dir / "report.html").read_text()
    assert "plotly.js v" in page  # the library inline, once
    assert page.count("plotly.js v") == 1
    from html.parser import HTMLParser

    class Scripts(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.sources: list[str | None] = []

        def handle_starttag(self, tag: str, attrs: list) -> None:
            if tag in ("script", "link", "img"):
                self.sources += [v for k, v in attrs if k in ("src", "href")]

    parser = Scripts()
    parser.feed(page)
    assert parser.sources == []  # nothing loaded from anywhere: it works offline
    for title in ("Optimisation history", "Parallel coordinates", "Parameter importances", "Trials"):
        assert title in page
    assert "vqvae.lr" in page


def test_best_yaml_round_trips_into_a_run(study_dir: Path) -> None:
    best = _load(study_dir).best_trial
    path = study_dir / "best.yaml"
    overlay = yaml.safe_load(path.read_text())
    assert overlay["vqvae"]["lr"] == pytest.approx(best.params["vqvae.lr"])
    assert overlay["data"]["shape"] == [32, 32, 32]  # the study's base overrides travel with it
    # synthbrain fl run vqvae --set-file best.yaml: the job's profile has the trial's values
    from fl_app.fl.run import _job_fields

    args = build_parser("fl").parse_args(["fl", "run", "vqvae", "--set-file", str(path)])
    prof = _job_fields(args)["profile"]
    assert prof["vqvae"]["lr"] == pytest.approx(best.params["vqvae.lr"])
    assert prof["vqvae"]["entropy_weight"] == best.params["vqvae.entropy_weight"]
    assert prof["data"]["shape"] == [32, 32, 32]
    # --set wins over --set-file
    args = build_parser("fl").parse_args(
        ["fl", "run", "vqvae", "--set-file", str(path), "--set", "vqvae.lr=0.5"]
    )
    assert _job_fields(args)["profile"]["vqvae"]["lr"] == 0.5
    # synthbrain pretrain --set-file best.yaml
    args = build_parser("pretrain").parse_args(["pretrain", "--set-file", str(path)])
    p = load_profile(args.profile, overrides_from_args(args))
    assert p.vqvae.lr == pytest.approx(best.params["vqvae.lr"])


def test_set_file_checks_every_key(tmp_path: Path) -> None:
    bad = _space(tmp_path, "vqvae:\n  lrr: 0.1\n", "bad.yaml")
    with pytest.raises(ConfigError, match=r"bad\.yaml: vqvae\.lrr: unknown profile key"):
        read_set_file(bad)
    ok = _space(tmp_path, "vqvae.lr: 0.001\ntrain: {lr: 0.0005}\n", "ok.yaml")
    assert read_set_file(ok) == {"vqvae": {"lr": 0.001}, "train": {"lr": 0.0005}}
    with pytest.raises(ConfigError, match=re.escape("only prior.*, train.* keys")):
        read_set_file(ok, sections=("prior", "train"))  # train-local prior: the VQ-VAE fixes the rest


def test_unknown_key_in_space_is_an_error_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    space = _space(tmp_path, "vqvae.lr: {low: 0.001, high: 0.01}\nvqvae.lrr: {low: 0.001, high: 0.01}\n")
    with pytest.raises(ConfigError, match=r"space\.yaml: vqvae\.lrr: unknown profile key"):
        load_space(space, "vqvae")
    assert _tune(tmp_path / "o", space, "--trials", "1") == 2  # the command: exit 2, the key named
    assert "vqvae.lrr: unknown profile key" in capsys.readouterr().err
    assert not (tmp_path / "o" / "study.db").exists()  # nothing ran
    wrong_job = _space(tmp_path, "prior.d_model: {choices: [16, 32]}\n", "w.yaml")
    with pytest.raises(ConfigError, match=re.escape("prior.d_model: only vqvae.*, train.* keys")):
        load_space(wrong_job, "vqvae")
    bad_value = _space(tmp_path, "vqvae.num_embeddings: {choices: [1, 64]}\n", "v.yaml")
    with pytest.raises(ConfigError, match=r"vqvae\.num_embeddings: value 1 is not valid"):
        load_space(bad_value, "vqvae")
    bad_range = _space(tmp_path, "vqvae.lr: {low: 0.01, high: 0.001}\n", "r.yaml")
    with pytest.raises(ConfigError, match=r"low \(0\.01\) must be smaller than high"):
        load_space(bad_range, "vqvae")
    with pytest.raises(ConfigError, match=r"data\.shape: data\.\* keys .* not tunable"):
        load_space(_space(tmp_path, "data.shape: {choices: [[32,32,32]]}\n", "d.yaml"), "vqvae")


def test_a_clearly_worse_trial_is_pruned(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The held-out metric is made deterministic (a tiny lr scores far worse); everything else -- the
    federated rounds, the per-round report, the median pruner, the study's storage -- is the real thing."""
    import fl_app.tune as tune

    def fake_eval(self: tune._Evaluator, state: dict) -> dict[str, float]:
        return {"psnr_db": 30.0 if self.profile.vqvae.lr > 1e-4 else 5.0}

    monkeypatch.setattr(tune._Evaluator, "__call__", fake_eval)
    space = _space(tmp_path, "vqvae.lr: {choices: [0.002, 1.0e-7]}\n")
    out = tmp_path / "p"
    rc = _tune(out, space, "--trials", "5", "--rounds", "2", "--pruner-startup", "1", "--seed", "3")
    assert rc == 0
    trials = _load(out).trials
    bad = [t for t in trials if t.params["vqvae.lr"] < 1e-4]
    good = [t for t in trials if t.params["vqvae.lr"] > 1e-4]
    assert bad and good
    assert all(t.state.name == "PRUNED" for t in bad)
    assert all("round_1" not in t.user_attrs for t in bad)  # stopped after its first round
    assert all(t.state.name == "COMPLETE" and t.value == 30.0 for t in good)


def test_dp_sites_are_charged_on_their_ledgers(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from fl_app.config import write_site_yaml
    from fl_app.data.simulate import simulate_sites
    from fl_app.privacy.accountant import PrivacyLedger

    prof = load_profile("cpu-demo", {"data": {"shape": [32, 32, 32], "spacing": [5, 5, 5]}})
    sites = simulate_sites(tmp_path / "data", 2, 4, prof, seed=5)
    cfg_dir = tmp_path / "cfg"

    def write(budget: float) -> None:
        for p in sites:
            write_site_yaml(cfg_dir / f"{p.name}.yaml", {
                "name": p.name, "bids_dir": str(p), "cache_dir": str(tmp_path / "cache" / p.name), "min_subjects": 2,
                "privacy": {"enabled": True, "epsilon_budget": budget}})  # fmt: skip

    write(1.2)  # two trials at ε 1 each compose to about 1.36: they do not fit
    space = _space(tmp_path, "vqvae.lr: {low: 0.001, high: 0.01, log: true}\n")
    common = ["--site-config-dir", str(cfg_dir), "--dp-epsilon", "1.0", "--trials", "2", "--no-baseline"]
    assert _tune(tmp_path / "o1", space, *common) == 2
    err = capsys.readouterr()
    assert "exceed the privacy budget" in err.err and "privacy: site site-1" in err.out
    assert not (tmp_path / "cache" / "site-1" / "privacy_ledger.json").exists()  # nothing was spent
    write(50.0)
    assert _tune(tmp_path / "o2", space, *common) == 0
    out = capsys.readouterr().out
    assert "total ε" in out  # the study's total, printed before it starts
    for p in sites:
        ledger = PrivacyLedger(tmp_path / "cache" / p.name / "privacy_ledger.json", p.name)
        entries = ledger.entries()
        assert len({e.session for e in entries}) == 2  # one DP job per trial
        assert {e.run for e in entries} == {"tune-s"}
        assert 1.0 < ledger.epsilon(1e-5) < 2.0 + 1e-6  # two trials at ε 1 composed
    trials = _load(tmp_path / "o2").trials
    assert all(0.9 < t.user_attrs["site_epsilon"]["site-1"] <= 1.0 + 1e-6 for t in trials)


def test_prior_study_minimises_held_out_bits(tmp_path: Path) -> None:
    space = _space(
        tmp_path, "prior.dropout: {choices: [0.0, 0.1]}\ntrain.lr: {low: 0.0005, high: 0.005, log: true}\n"
    )
    out = tmp_path / "prior"
    assert _tune(out, space, "--trials", "2", job="prior") == 0
    study = _load(out)
    assert study.direction == optuna.study.StudyDirection.MINIMIZE
    assert (out / "vqvae_for_prior.pt").is_file()  # the frozen VQ-VAE, trained once per study
    assert all(
        "bits_per_code" in t.user_attrs["held_out"] for t in study.trials if t.state.name == "COMPLETE"
    )
    assert "prior" in yaml.safe_load((out / "best.yaml").read_text())


def test_ctrl_c_mid_trial_then_the_same_command_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fl_app.tune as tune

    real = tune._Evaluator.__call__
    calls = {"n": 0}

    def interrupt_second(self: tune._Evaluator, state: dict) -> dict[str, float]:
        calls["n"] += 1
        if calls["n"] == 2:  # Ctrl-C during the second trial
            raise KeyboardInterrupt
        return real(self, state)

    monkeypatch.setattr(tune._Evaluator, "__call__", interrupt_second)
    space = _space(tmp_path, "vqvae.lr: {low: 0.001, high: 0.01, log: true}\n")
    out = tmp_path / "c"
    assert _tune(out, space, "--trials", "3") == 130
    assert [t.state.name for t in _load(out).trials] == ["COMPLETE", "FAIL"]
    assert (out / "best.yaml").is_file()  # the outputs of what finished are written all the same
    monkeypatch.setattr(tune._Evaluator, "__call__", real)
    assert _tune(out, space, "--trials", "3") == 0
    states = [t.state.name for t in _load(out).trials]
    assert states[:2] == ["COMPLETE", "FAIL"] and len(states) == 4  # the failed trial is run again
    assert sum(s in ("COMPLETE", "PRUNED") for s in states) == 3


@pytest.mark.slow
def test_env_sim_runs_each_trial_as_an_nvflare_simulator_job(tmp_path: Path) -> None:
    space = _space(tmp_path, "vqvae.lr: {low: 0.001, high: 0.01, log: true}\n")
    out = tmp_path / "sim"
    assert _tune(out, space, "--trials", "1", "--env", "sim") == 0
    (trial,) = _load(out).trials
    assert trial.state.name == "COMPLETE" and "psnr_db" in trial.user_attrs["round_0"]
    from fl_app.fl.server import read_checkpoint

    ck = read_checkpoint(out / "trials" / "trial-0000" / "fl" / "vqvae")  # the simulator job's own checkpoint
    assert ck is not None and ck["round"] == 0
    settings = json.loads((out / "trials" / "trial-0000" / "job_vqvae.json").read_text())
    assert settings["env"] == "sim" and settings["profile"]["vqvae"]["lr"] == pytest.approx(
        trial.params["vqvae.lr"]
    )

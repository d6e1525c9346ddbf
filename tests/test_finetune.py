"""Fine-tuning a declared subset from a checkpoint (``profile.finetune``, ``--init``), without NVFlare: presets,
the architecture check, what a site sends, the leak-audit check of a fine-tuning release, and the
accountant's ε of a DP fine-tune against Opacus' own. The NVFlare jobs are in tests/test_fl_finetune.py."""

from __future__ import annotations

import pytest
import torch

from fl_app.config import ConfigError, load_profile
from tests.test_fl_sim import TINY


@pytest.fixture(scope="module")
def prof():
    return load_profile("cpu-demo", TINY)


def _checkpoint_dir(root, prof, seed: int = 123):
    """A global-model directory with a VQ-VAE and a prior of seed ``seed`` (stand-in for the public one)."""
    from fl_app.config import profile_to_yaml
    from fl_app.models.prior import build_prior, save_prior
    from fl_app.models.vqvae import build_vqvae, save_vqvae

    torch.manual_seed(seed)
    save_vqvae(build_vqvae(prof, dp=True), prof, root / "vqvae.pt")
    save_prior(build_prior(prof), prof, root / "prior.pt")
    (root / "profile.yaml").write_text(profile_to_yaml(prof))
    return root


def test_presets_and_patterns_choose_the_trainable_tensors(prof):
    from fl_app.models.finetune import apply_trainable, trainable_names
    from fl_app.models.prior import build_prior
    from fl_app.models.vqvae import build_vqvae

    vq = build_vqvae(prof, dp=True)
    names = apply_trainable(vq, ["decoder_last"], "vqvae")
    assert names and all(n.startswith(("net.decoder.blocks.3.", "net.decoder.blocks.4.")) for n in names)
    assert {n for n, p in vq.named_parameters() if p.requires_grad} == set(names)
    assert trainable_names(vq, ["biases"]) == [n for n, _ in vq.named_parameters() if n.endswith(".bias")]
    assert trainable_names(vq, ["all"]) == [n for n, _ in vq.named_parameters()]
    prior = build_prior(prof)
    last = len(prior.blocks) - 1
    got = set(trainable_names(prior, ["prior_last", "cond_embeddings"]))
    assert (
        any(n.startswith(f"blocks.{last}.") for n in got) and "head.weight" in got and "sex_emb.weight" in got
    )
    assert not any(n.startswith("tok_emb") for n in got)
    with pytest.raises(ConfigError, match=r"finetune.vqvae: 'norms' matches no parameter"):
        trainable_names(vq, ["norms"], "vqvae")  # the VQ-VAE has no normalisation layers
    with pytest.raises(ConfigError, match=r"finetune\.vqvae"):
        load_profile(
            "cpu-demo", {"finetune": {"vqvae": ["decoderlast"]}}
        )  # a typo: neither preset nor pattern


def test_init_resolution_and_architecture_check(tmp_path, prof, monkeypatch):
    from fl_app.models import pretrained
    from fl_app.models.pretrained import check_init_architecture, resolve_init

    assert resolve_init("scratch", "vqvae") is None and resolve_init(None, "prior") is None
    monkeypatch.setattr(pretrained, "PRETRAINED_ROOT", tmp_path / "shipped")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "shipped" / "cpu-demo")):
        resolve_init("pretrained", "vqvae", "cpu-demo")  # not shipped: the error names the path
    ck = tmp_path / "ck"
    ck.mkdir()
    _checkpoint_dir(ck, prof)
    assert resolve_init(ck, "vqvae") == (ck / "vqvae.pt").resolve()
    assert resolve_init(ck / "prior.pt", "prior") == (ck / "prior.pt").resolve()
    (ck / "prior.pt").unlink()
    with pytest.raises(FileNotFoundError, match=r"has no prior\.pt"):
        resolve_init(ck, "prior")
    check_init_architecture(ck / "vqvae.pt", "vqvae", prof)  # same architecture: fine
    other = load_profile(
        "cpu-demo", {**TINY, "vqvae": {**TINY["vqvae"], "channels": [8, 24], "num_res_channels": [8, 24]}}
    )
    with pytest.raises(ConfigError, match=r"vqvae.channels: \[8, 16\] != \[8, 24\]") as exc:
        check_init_architecture(ck / "vqvae.pt", "vqvae", other)
    assert "vqvae.num_res_channels" in str(exc.value) and "data.shape" not in str(exc.value)


def test_a_directory_whose_prior_adds_a_prior_key_starts_both_jobs(tmp_path, prof):
    """A global-model directory whose prior was trained with a prior key its VQ-VAE's stored profile lacks
    (``cond_every_position``): the directory's profile is the prior's, and with it both jobs start from the
    checkpoint (the demo's path; with the VQ-VAE's profile the prior job refused the checkpoint)."""
    from fl_app.config import apply_overrides, profile_to_yaml
    from fl_app.fl.server import FROZEN_PREFIX, build_initial_state
    from fl_app.models.pretrained import checkpoint_profile_dict
    from fl_app.models.prior import build_prior, save_prior

    ck = _checkpoint_dir(tmp_path, prof)
    full = apply_overrides(prof.model_dump(mode="json"), {"prior": {"cond_every_position": True}}, "test")
    save_prior(build_prior(full), full, ck / "prior.pt")
    (ck / "profile.yaml").write_text(profile_to_yaml(full))
    pd = checkpoint_profile_dict(ck)
    assert pd["prior"]["cond_every_position"] is True
    assert checkpoint_profile_dict(ck / "vqvae.pt")["prior"]["cond_every_position"] is False
    build_initial_state("vqvae", pd, dp=True, init=str(ck))
    params, _ = build_initial_state("prior", pd, frozen_vqvae=str(ck / "vqvae.pt"), init=str(ck))
    assert "cond_proj.weight" in params and not any(k.startswith(FROZEN_PREFIX + "cond") for k in params)


def test_initial_global_model_is_the_checkpoint(tmp_path, prof):
    from fl_app.fl.run import job_profile
    from fl_app.fl.server import FROZEN_PREFIX, build_initial_state

    ck = _checkpoint_dir(tmp_path, prof)
    want_vq = torch.load(ck / "vqvae.pt", weights_only=True)["state_dict"]
    want_pr = torch.load(ck / "prior.pt", weights_only=True)["state_dict"]
    pd = prof.model_dump(mode="json")
    params, _ = build_initial_state("vqvae", pd, dp=True, init=str(ck))
    assert set(params) == set(want_vq) and all(
        torch.equal(torch.as_tensor(params[k]), want_vq[k]) for k in params
    )
    scratch, _ = build_initial_state("vqvae", pd, dp=True)
    assert not all(torch.equal(torch.as_tensor(scratch[k]), want_vq[k]) for k in scratch)
    params, _ = build_initial_state("prior", pd, frozen_vqvae=str(ck / "vqvae.pt"), init=str(ck / "prior.pt"))
    own = {k: v for k, v in params.items() if not k.startswith(FROZEN_PREFIX)}
    assert set(own) == set(want_pr) and all(torch.equal(torch.as_tensor(own[k]), want_pr[k]) for k in own)
    # the profile travels with the checkpoint: no --profile gives the checkpoint's, --set on top of it
    jp = job_profile("vqvae", None, ["train.lr=0.01", "finetune.vqvae=[decoder_last]"], str(ck))
    assert jp.vqvae == prof.vqvae and jp.train.lr == 0.01 and jp.finetune.vqvae == ["decoder_last"]
    with pytest.raises(
        ConfigError, match=r"vqvae\.channels"
    ):  # cpu-demo's own VQ-VAE is another architecture
        job_profile("vqvae", "cpu-demo", [], str(ck))
    with pytest.raises(ConfigError, match=r"vqvae\.embedding_dim"):
        job_profile("vqvae", None, ["vqvae.embedding_dim=4"], str(ck))


def test_a_site_sends_only_trainable_tensors_and_never_a_changed_frozen_one(prof):
    from fl_app.fl.client import exported_state, freeze_for_job
    from fl_app.models.vqvae import build_vqvae

    vq = build_vqvae(prof, dp=True)
    assert freeze_for_job(vq, ["all"], "vqvae") is None  # whole model: every tensor, as before
    exported = freeze_for_job(vq, ["decoder_out"], "vqvae")
    received = {k: v.clone() for k, v in vq.state_dict().items()}
    with torch.no_grad():
        for p in vq.parameters():
            if p.requires_grad:
                p.add_(0.1)
    new, old = exported_state(vq.state_dict(), received, exported, "site-x")
    assert (
        set(new)
        == set(old)
        == set(exported)
        == {"net.decoder.blocks.4.conv.weight", "net.decoder.blocks.4.conv.bias"}
    )
    with torch.no_grad():
        vq.net.encoder.blocks[0].conv.bias.add_(1e-7)
    with pytest.raises(RuntimeError, match=r"frozen tensors changed .*net.encoder.blocks.0.conv.bias"):
        exported_state(vq.state_dict(), received, exported, "site-x")


def test_leak_audit_flags_an_extra_tensor_an_uncovered_one_and_a_changed_frozen_one():
    from fl_app.fl.leak_audit import finetune_release_problems

    ck = {"a": torch.ones(3), "b": torch.zeros(2), "c": torch.arange(4.0)}
    trainable = ["a"]
    record = {"param_order": ["a"]}
    received = {k: v.clone() for k, v in ck.items()}
    assert finetune_release_problems({"a": torch.ones(3)}, received, ck, trainable, record) == []
    bad = finetune_release_problems(
        {"a": torch.ones(3), "b": torch.zeros(2)}, received, ck, trainable, record
    )
    assert any(p.startswith("b: left the site") for p in bad) and any(
        "b: sent but not updated" in p for p in bad
    )
    assert finetune_release_problems({"a": torch.ones(3)}, received, ck, trainable, {"param_order": []}) == [
        "a: sent but not updated by the DP optimiser (not covered by the accountant)"
    ]
    received["c"] = received["c"].clone()
    received["c"][0] = 1e-30  # any change in any byte
    assert finetune_release_problems({"a": torch.ones(3)}, received, ck, trainable, record) == [
        "c: frozen but not byte-identical to the checkpoint"
    ]


def test_dp_fine_tune_accountant_matches_opacus_and_frozen_weights_stay(tmp_path, prof):
    """DP-SGD of a decoder-only subset: Opacus sees only the trainable tensors, the frozen ones are unchanged,
    and the site ledger's ε equals Opacus' own accountant's for the same (σ, q, steps)."""
    from opacus.accountants import RDPAccountant

    from fl_app.config import site_config_from_dict
    from fl_app.fl.client import freeze_for_job
    from fl_app.fl.local_dp import SiteDP
    from fl_app.models.vqvae import build_vqvae
    from fl_app.train.vqvae_local import make_optimizer, make_vqvae_loader, train_vqvae_local

    torch.manual_seed(0)
    shape = tuple(prof.data.shape)
    data = [{"image": torch.rand(1, *shape), "label": torch.randint(0, 4, shape), "has_label": True}
            for _ in range(8)]  # fmt: skip
    cfg = site_config_from_dict({"name": "s", "cache_dir": str(tmp_path), "privacy": {
        "enabled": True, "epsilon_budget": 50.0, "max_grad_norm": 1.0, "delta": 1e-5}})  # fmt: skip
    vq = build_vqvae(prof, dp=True)
    trainable = freeze_for_job(vq, ["decoder_last"], "vqvae")
    before = {k: v.clone() for k, v in vq.state_dict().items()}
    opt = make_optimizer(vq, prof)
    loader = make_vqvae_loader(data, 2, shuffle=True)
    dp = SiteDP(cfg, "job", "vqvae", planned_rounds=2, target_epsilon=4.0)
    model, opt, loader = dp.make_private(vq, opt, loader, steps_per_round=3)
    seen = [p for g in opt.original_optimizer.param_groups for p in g["params"]]
    assert {id(p) for p in seen} == {id(p) for n, p in vq.named_parameters() if n in trainable}
    for rnd in range(2):
        dp.check_budget(rnd)
        train_vqvae_local(model, loader, prof, optimizer=opt, max_steps=3, seed=rnd)
        dp.record_round(rnd)
    after = vq.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in after if k not in trainable)
    assert any(not torch.equal(after[k], before[k]) for k in trainable)
    ref = RDPAccountant()
    ref.history = [(dp.noise_multiplier, dp.sample_rate, 6)]
    assert dp.job_epsilon() == pytest.approx(ref.get_epsilon(1e-5), rel=1e-9)
    assert dp.job_epsilon() == pytest.approx(dp.engine.accountant.get_epsilon(1e-5), rel=1e-9)
    assert dp.job_epsilon() <= 4.0 + 1e-6 and dp.job_epsilon() > 3.5


def test_finetune_lr_is_optional_positive_and_travels_in_the_profile():
    """``finetune.lr`` (the federated jobs' learning rate when set) defaults to None (each model's own rate),
    refuses a non-positive value, and round-trips through the profile YAML that travels with a model."""
    import yaml

    from fl_app.config import ConfigError, load_profile, profile_from_dict, profile_to_yaml

    assert load_profile("cpu-demo").finetune.lr is None
    p = load_profile("cpu-demo", {"finetune": {"vqvae": ["decoder_last"], "lr": 3e-4}})
    assert profile_from_dict(yaml.safe_load(profile_to_yaml(p))).finetune.lr == 3e-4
    with pytest.raises(ConfigError, match="lr"):
        load_profile("cpu-demo", {"finetune": {"lr": 0.0}})

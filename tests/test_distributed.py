"""Several training processes per site (torchrun, DDP on gloo) and bf16 autocast of the full-1mm profile.

* The site YAML's ``compute.nproc``: validation, the DP refusal, the launch command and the recipe's
  launch choice.
* ``torchrun --standalone --nproc_per_node=2`` of this file (its ``__main__`` is the worker) trains the TINY
  VQ-VAE: with the DP-compatible (loss-learned) codebook and SGD, the two ranks end bit-identical and equal
  (float tolerance) to one process stepping on the union of their batches; with the EMA codebook, Adam
  and dead-code restarts (no exact single-process counterpart: restarts draw from rank 0's encoder
  outputs) the ranks still end bit-identical, from deliberately different initial weights; a batch that
  is empty on one rank (unreadable subjects) is skipped by both.
* The full-1mm profile (its architecture) at a small shape (16×16×32) with ``train.amp: bf16``: the setting reaches both training loops;
  on CPU autocast is a no-op (decision: no CPU bf16), on CUDA the forward runs in bf16.
* One NVFlare simulator run of the vqvae job with one site at ``compute.nproc: 2`` (external launch
  through the site launcher, torchrun inside the client): the round completes and the site reports its
  whole sample count.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fl_app.config import ConfigError, load_profile

TINY_VQ = {
    "data": {"shape": [32, 32, 32], "spacing": [6.0, 6.0, 6.0]},
    "vqvae": {"channels": [8, 16], "num_res_channels": [8, 16], "num_embeddings": 32, "embedding_dim": 8},
    "train": {"batch_size": 2, "lr": 0.003},
}


def _profile(quantiser: str = "loss"):
    over = {**TINY_VQ, "vqvae": {**TINY_VQ["vqvae"], "quantiser": quantiser}}
    return load_profile("cpu-demo", over)


def _volumes(n: int = 4) -> list[dict[str, torch.Tensor]]:
    """``n`` deterministic labelled 32³ items in the SiteDataset layout."""
    from fl_app.models.vqvae import NUM_TISSUE_CLASSES

    g = torch.Generator().manual_seed(42)
    items = []
    for _ in range(n):
        label = torch.randint(0, NUM_TISSUE_CLASSES, (32, 32, 32), generator=g)
        image = (label.float() / NUM_TISSUE_CLASSES + 0.1 * torch.rand(32, 32, 32, generator=g))[None]
        items.append({"image": image, "label": label, "has_label": torch.tensor(True)})
    return items


def _train_exact(model, batch_size: int) -> dict:
    """Two SGD steps of the VQ-VAE over the 4 volumes in order (batch_size per process)."""
    from fl_app.train.vqvae_local import make_vqvae_loader, train_vqvae_local

    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    loader = make_vqvae_loader(_volumes(), batch_size, shuffle=False)
    return train_vqvae_local(model, loader, _profile(), optimizer=opt, max_steps=2, dead_code_restart=False)


def _worker(out: Path) -> None:
    """Run under torchrun (2 processes, gloo): writes each rank's final weights and metrics."""
    from fl_app.models.vqvae import build_vqvae
    from fl_app.train import distributed as D
    from fl_app.train.vqvae_local import make_optimizer, make_vqvae_loader, train_vqvae_local

    torch.set_num_threads(1)
    ctx, _ = D.init_from_env("cpu")
    assert ctx.world_size == 2 and D.is_distributed()
    try:
        torch.manual_seed(0)
        model = build_vqvae(_profile("loss"))
        if ctx.rank == 1:  # wrong weights on rank 1: training must start from rank 0's
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(1.0)
        exact = _train_exact(model, batch_size=1)
        torch.manual_seed(100 + ctx.rank)  # different initial weights per rank
        prof = _profile("ema")
        model2 = build_vqvae(prof)
        loader2 = make_vqvae_loader(_volumes(), 1, shuffle=True, seed=3)
        ema = train_vqvae_local(
            model2, loader2, prof, optimizer=make_optimizer(model2, prof), max_steps=3, dead_code_restart=True
        )
        # rank 1's first batch is an unreadable subject (None, dropped by the collate): both ranks skip it
        torch.manual_seed(0)
        model3 = build_vqvae(_profile("loss"))
        holes = [v if i != 1 else None for i, v in enumerate(_volumes())]
        skip = train_vqvae_local(
            model3, make_vqvae_loader(holes, 1, shuffle=False), _profile(), optimizer=make_optimizer(model3, prof),
            epochs=1, dead_code_restart=False,
        )  # fmt: skip
        keep = ("steps", "train_volumes", "world_size")
        torch.save(
            {
                "exact": {k: v.detach().clone() for k, v in model.state_dict().items()},
                "exact_result": {k: exact[k] for k in keep} | {"loss": exact["final"]["loss"]},
                "ema": {k: v.detach().clone() for k, v in model2.state_dict().items()},
                "ema_result": {k: ema[k] for k in keep} | {"restarted": ema["final"]["dead_codes_restarted"]},
                "skip": {k: v.detach().clone() for k, v in model3.state_dict().items()},
                "skip_result": {k: skip[k] for k in (*keep, "empty_batches")},
            },
            out / f"rank{ctx.rank}.pt",
        )
    finally:
        D.shutdown()


# --------------------------------------------------------------------------- site YAML and launch


def _site_yaml(tmp_path: Path, name: str, **extra) -> Path:
    from fl_app.config import write_site_yaml

    data = {"name": name, "bids_dir": str(tmp_path / "bids"), "cache_dir": str(tmp_path / "cache"), **extra}
    return write_site_yaml(tmp_path / "sites" / f"{name}.yaml", data)


def test_site_compute_nproc_is_validated_and_dp_with_nproc_is_refused(tmp_path):
    from fl_app.config import load_site_config, site_config_from_dict
    from fl_app.fl.launcher import check_site_parallelism

    assert site_config_from_dict({"name": "a", "bids_dir": "x"}).compute.nproc == 1
    with pytest.raises(ConfigError, match=r"compute\.nproc"):
        site_config_from_dict({"name": "a", "bids_dir": "x", "compute": {"nproc": 0}})
    with pytest.raises(ConfigError, match="exceeds the 2 GPU"):
        site_config_from_dict(
            {"name": "a", "bids_dir": "x", "compute": {"device": "cuda", "gpus": [0, 1], "nproc": 3}}
        )
    dp = {"enabled": True, "epsilon_budget": 8.0}
    path = _site_yaml(tmp_path, "h-dp", compute={"nproc": 2}, privacy=dp)
    cfg = load_site_config(path)
    with pytest.raises(ConfigError, match=r"compute\.nproc") as exc:
        check_site_parallelism(cfg)
    assert str(path) in str(exc.value)
    check_site_parallelism(cfg, world_size=1)  # DP in one process is fine
    check_site_parallelism(load_site_config(_site_yaml(tmp_path, "h2", compute={"nproc": 2})))


def test_launcher_command_and_recipe_launch_choice(tmp_path, monkeypatch):
    from fl_app.config import ENV_SITE_CONFIG
    from fl_app.fl import launcher as D

    assert D.launch_argv("custom/c.py", ["--x", "1"], 1, python="py") == [
        "py",
        "-u",
        "custom/c.py",
        "--x",
        "1",
    ]
    two = D.launch_argv("custom/c.py", ["--x", "1"], 2, python="py")
    assert two[:4] == ["py", "-u", "-m", "torch.distributed.run"]
    assert (
        "--standalone" in two
        and "--nproc_per_node=2" in two
        and two[-4:] == ["--", "custom/c.py", "--x", "1"]
    )
    # the jobs' client: the site's installed module (not the job's copy of client.py)
    assert D.launch_argv(D.CLIENT_MODULE, ["vqvae"], 1, python="py", module=True) == [
        "py",
        "-u",
        "-m",
        "fl_app.fl.client",
        "vqvae",
    ]
    assert D.launch_argv(D.CLIENT_MODULE, ["vqvae"], 2, python="py", module=True)[-4:] == [
        "--module",
        "--",
        "fl_app.fl.client",
        "vqvae",
    ]

    # POC / production: the sites' YAMLs are private, so always the site launcher, with the sites' python3
    prod = D.recipe_launch_args(None)
    assert prod == {"launch_external_process": True, "command": "python3 -u -m fl_app.fl.launcher"}
    _site_yaml(tmp_path, "s1")
    _site_yaml(tmp_path, "s2", compute={"nproc": 1})
    assert D.recipe_launch_args(tmp_path / "sites") == {"launch_external_process": False}
    _site_yaml(tmp_path, "s3", compute={"device": "cpu", "nproc": 2})
    sim = D.recipe_launch_args(tmp_path / "sites")
    assert sim["launch_external_process"] and sim["command"].split() == [
        sys.executable,
        "-u",
        "-m",
        D.LAUNCHER_MODULE,
    ]

    # the launcher refuses DP with several processes before starting anything
    dp_yaml = _site_yaml(
        tmp_path, "dp", compute={"nproc": 2}, privacy={"enabled": True, "epsilon_budget": 1.0}
    )
    monkeypatch.setenv(ENV_SITE_CONFIG, str(dp_yaml))
    with pytest.raises(ConfigError, match=r"compute\.nproc"):
        D.main(["custom/client_vqvae.py", "--max-steps", "1"])


# --------------------------------------------------------------------------- torchrun, 2 processes


def test_two_processes_match_one_process_on_the_union_of_their_batches(tmp_path):
    from fl_app.models.vqvae import build_vqvae

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = subprocess.run(
        [*cmd, __file__, str(tmp_path)], env=env, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)

    for key in ("exact", "ema", "skip"):  # the ranks hold bit-identical weights and buffers
        assert r0[key].keys() == r1[key].keys()
        for name in r0[key]:
            assert torch.equal(r0[key][name], r1[key][name]), (key, name)
    # the site's totals: 2 steps x 2 ranks x 1 volume; 3 steps x 2 x 1
    assert r0["exact_result"] | {"loss": 0} == {"steps": 2, "train_volumes": 4, "world_size": 2, "loss": 0}
    assert r0["ema_result"]["train_volumes"] == 6 and r0["ema_result"]["world_size"] == 2
    # an empty batch on one rank: the step is skipped on both, the other step trains (1 step, 2 volumes)
    assert r0["skip_result"] == {"steps": 1, "train_volumes": 2, "world_size": 2, "empty_batches": 1}
    assert r1["skip_result"] == r0["skip_result"]

    # one process, batch 2 = rank 0's and rank 1's volume of each step, same initial weights
    torch.manual_seed(0)
    ref = build_vqvae(_profile("loss"))
    init = {k: v.clone() for k, v in ref.state_dict().items()}
    res = _train_exact(ref, batch_size=2)
    assert res["train_volumes"] == 4 and res["world_size"] == 1
    assert res["final"]["loss"] == pytest.approx(r0["exact_result"]["loss"], rel=1e-4)
    moved = 0.0
    for name, v in ref.state_dict().items():
        torch.testing.assert_close(r0["exact"][name], v, rtol=1e-4, atol=1e-6, msg=name)
        moved = max(moved, float((v - init[name]).abs().max()))
    assert moved > 1e-3  # the steps changed the weights, so the comparison is not trivial


# --------------------------------------------------------------------------- bf16 autocast, full-1mm


def test_full_1mm_amp_setting_reaches_both_training_loops(monkeypatch):
    from fl_app.models.prior import build_prior
    from fl_app.models.vqvae import build_vqvae, encode
    from fl_app.train import common
    from fl_app.train.prior_local import CodeDataset, make_prior_loader, train_prior_local
    from fl_app.train.vqvae_local import make_optimizer, make_vqvae_loader, train_vqvae_local

    prof = load_profile(
        "full-1mm",
        {"data": {"shape": [16, 16, 32], "spacing": [12.0, 12.0, 6.0]}, "prior": {"n_layers": 2}},
    )
    assert prof.train.amp == "bf16"
    seen: list[tuple[str, str, bool]] = []

    real_autocast = common.autocast  # the shared training loop's (fl_app.train.common.train_loop)

    def spy(where: str):
        def _autocast(device: torch.device, amp):
            ctx = real_autocast(device, amp)

            class _Probe:
                def __enter__(self):
                    ctx.__enter__()
                    seen.append((where, amp, torch.is_autocast_enabled(device.type)))

                def __exit__(self, *exc):
                    return ctx.__exit__(*exc)

            return _Probe()

        return _autocast

    monkeypatch.setattr(common, "autocast", spy("vqvae"))
    torch.manual_seed(0)
    items = [{k: v[..., :16, :16, :] if v.dim() else v for k, v in it.items()} for it in _volumes(2)]
    vq = build_vqvae(prof)
    res = train_vqvae_local(
        vq, make_vqvae_loader(items, 2, True), prof, optimizer=make_optimizer(vq, prof), max_steps=1,
        amp=prof.train.amp,
    )  # fmt: skip
    assert torch.isfinite(torch.tensor(res["final"]["loss"]))
    image = torch.stack([it["image"] for it in items])
    label = torch.stack([it["label"] for it in items])
    codes = encode(vq.eval(), image, label)
    assert tuple(codes.shape[1:]) == tuple(prof.code_shape)
    ds = CodeDataset(codes, torch.tensor([70.0, 50.0]), torch.tensor([0, 1]), torch.tensor([0, 1]))
    prior = build_prior(prof)
    monkeypatch.setattr(common, "autocast", spy("prior"))
    res_p = train_prior_local(prior, make_prior_loader(ds, 2, True), prof, max_steps=1, amp=prof.train.amp)
    assert torch.isfinite(torch.tensor(res_p["final"]["loss"]))
    # the profile's setting reached both loops; on CPU it is deliberately a no-op (no CPU bf16 autocast)
    assert ("vqvae", "bf16", False) in seen and ("prior", "bf16", False) in seen


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_autocast_on_cuda():
    from fl_app.train.common import autocast

    x = torch.randn(2, 8, device="cuda")
    lin = torch.nn.Linear(8, 8).cuda()
    with autocast(torch.device("cuda"), "bf16"):
        assert lin(x).dtype == torch.bfloat16
    with autocast(torch.device("cuda"), "none"):
        assert lin(x).dtype == torch.float32


# --------------------------------------------------------------------------- NVFlare simulator


@pytest.mark.slow
def test_simulator_site_with_two_processes_reports_its_whole_sample_count(tmp_path):
    from fl_app.config import load_site_config, write_site_yaml
    from fl_app.fl.run import run_job
    from fl_app.fl.server import read_checkpoint
    from tests.test_fl_sim import make_sites

    prof, cfg_dir, clients = make_sites(tmp_path, n_sites=2, n_subjects=4)
    multi = clients[0]
    path = cfg_dir / f"{multi}.yaml"
    cfg = load_site_config(path)
    write_site_yaml(
        path,
        {"name": multi, "bids_dir": str(cfg.bids_dir), "cache_dir": str(cfg.cache_dir), "min_subjects": 2,
         "compute": {"device": "cpu", "num_threads": 1, "nproc": 2}},
    )  # fmt: skip
    run = tmp_path / "run"
    run_job(
        "vqvae", "sim", run, profile=prof, clients=clients, site_config_dir=cfg_dir, num_rounds=1, max_steps=2
    )
    ck = read_checkpoint(run / "fl" / "vqvae")
    assert ck["round"] == 0
    sites = ck["history"][0]["sites"]
    assert set(sites) == set(clients)
    n_train = sites[multi]["num_subjects"]  # 3 of 4 subjects (1 held out)
    assert n_train == 3
    # 2 ranks x batch 2 x 2 steps: every rank's volumes counted (the sampler repeats one of the 3)
    assert sites[multi]["num_processes"] == 2 and sites[multi]["num_samples"] == 8
    assert sites[clients[1]]["num_processes"] == 1 and sites[clients[1]]["num_samples"] == 3
    assert sites[multi]["train_loss"] > 0


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))

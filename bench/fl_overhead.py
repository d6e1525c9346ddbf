"""Federated overhead of the VQ-VAE job: the same local compute run centrally and as an NVFlare job.

    python bench/fl_overhead.py --json out.json [--sites 3] [--subjects 6] [--rounds 3] [--steps 4] [--tiny]

Central: for each round, each site's local training (``train_vqvae_local``, ``--steps`` steps on that site's
data) run one after another in this process, plus FedAvg of the weights -- exactly the compute of the job
without NVFlare. Federated: the ``vqvae`` job in NVFlare's simulator with one client per site.

Reports (JSON on stdout and in ``--json``): seconds per round (central, federated; federated also without
its start-up), the overhead ratio federated / central, and bytes sent per round per site (server → site:
the global model; site → server: the weight update), measured from the tensors exchanged.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from fl_app.run_layout import RunLayout

TINY = {
    "data": {"shape": [32, 32, 32], "spacing": [5.0, 5.0, 5.0]},
    "vqvae": {"channels": [8, 16], "num_res_channels": [8, 16], "num_embeddings": 32, "embedding_dim": 8},
    "train": {"batch_size": 2},
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--subjects", type=int, default=6)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=4, help="local steps per round per site")
    p.add_argument("--profile", default="cpu-demo")
    p.add_argument("--tiny", action="store_true", help="32³ volumes, tiny VQ-VAE (smoke run)")
    p.add_argument("--workdir", type=Path, default=None)
    args = p.parse_args(argv)

    import torch

    from fl_app.config import load_profile, load_site_config, write_site_yaml
    from fl_app.data.dataset import make_loaders
    from fl_app.data.simulate import simulate_sites
    from fl_app.fl.client import open_site_dataset
    from fl_app.fl.run import run_job
    from fl_app.fl.server import read_checkpoint
    from fl_app.models.vqvae import build_vqvae
    from fl_app.privacy.aggregation import weighted_average
    from fl_app.train.vqvae_local import make_optimizer, make_vqvae_loader, train_vqvae_local

    prof = load_profile(args.profile, TINY if args.tiny else None)
    work = (args.workdir or Path(tempfile.mkdtemp(prefix="fl_overhead_"))).resolve()
    sites = simulate_sites(work / "data", args.sites, args.subjects, prof, seed=0)
    cfg_dir = work / "site_configs"
    # the simulated sites share this machine: each gets its share of the cores, as in `synthbrain demo`
    threads = max(1, (os.cpu_count() or 1) // args.sites)
    for s in sites:
        write_site_yaml(cfg_dir / f"{s.name}.yaml", {"name": s.name, "bids_dir": str(s), "min_subjects": 2,
                                                      "cache_dir": str(work / "cache" / s.name),
                                                      "compute": {"num_threads": threads}})  # fmt: skip
    # warm the preprocessing caches so that neither arm pays for them
    loaders = []
    for s in sites:
        ds = open_site_dataset(load_site_config(cfg_dir / f"{s.name}.yaml"), prof)
        train, _ = make_loaders(ds, prof.train.batch_size, prof.train.val_fraction, 0)
        loaders.append((make_vqvae_loader(train.dataset, prof.train.batch_size, True, 0), len(train.dataset)))

    # ---- central: identical local compute, no NVFlare
    torch.manual_seed(0)
    global_model = build_vqvae(prof)
    state = {k: v.clone() for k, v in global_model.state_dict().items()}
    t0 = time.perf_counter()
    for _ in range(args.rounds):
        deltas, weights = [], []
        for loader, _n in loaders:
            m = build_vqvae(prof)
            m.load_state_dict(state)
            res = train_vqvae_local(m, loader, prof, optimizer=make_optimizer(m, prof), max_steps=args.steps)
            deltas.append({k: (v - state[k]).numpy() for k, v in m.state_dict().items()})
            weights.append(res["train_volumes"])
        avg = weighted_average(deltas, weights)
        state = {k: state[k] + torch.as_tensor(avg[k]) for k in state}
    central_s = time.perf_counter() - t0

    # ---- federated: the vqvae job in the simulator
    t0 = time.perf_counter()
    run_job("vqvae", "sim", work / "run", profile=prof.model_dump(mode="json"), clients=[s.name for s in sites],
            num_rounds=args.rounds, max_steps=args.steps, site_config_dir=cfg_dir)  # fmt: skip
    fed_s = time.perf_counter() - t0
    ck = read_checkpoint(RunLayout(work / "run").job_dir("vqvae"))
    train_s = [max(m.get("train_seconds", 0.0) for m in h["sites"].values()) for h in ck["history"]]

    down = sum(v.numel() * v.element_size() for v in ck["params"].values())
    up = down  # the update has the same tensors as the model (DIFF of every entry)
    out = {
        "profile": prof.name,
        "shape": list(prof.data.shape),
        "sites": args.sites,
        "subjects_per_site": args.subjects,
        "rounds": args.rounds,
        "local_steps": args.steps,
        "central_seconds": central_s,
        "central_seconds_per_round": central_s / args.rounds,
        "federated_seconds": fed_s,
        "federated_seconds_per_round": fed_s / args.rounds,
        "federated_max_site_train_seconds_per_round": sum(train_s) / len(train_s),
        "overhead_ratio": fed_s / central_s,
        "bytes_server_to_site_per_round": down,
        "bytes_site_to_server_per_round": up,
        "bytes_per_round_per_site": down + up,
        "workdir": str(work),
        "torch_threads": torch.get_num_threads(),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

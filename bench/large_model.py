"""A model over 100 MB through NVFlare: the full-resolution prior's transfer, bytes and seconds per round.

    python bench/large_model.py --json OUT [--env sim|poc] [--rounds 3] [--client-config JSON] [--server-config JSON]

The full-1mm prior (width 512, depth 24, 16 heads, 2048 codes, 10×14×10 = 1,400 tokens) has 78.8 M
parameters, 315 MB in float32. This bench runs the real ``prior`` job (``fl_app.fl.run.build_recipe``, the
same recipe as ``synthbrain fl run prior``) in NVFlare's simulator (``--env poc``: a POC on loopback, server
and 2 client processes from startup kits, all stopped by PID at the end) with 2 sites and *exactly that
transformer*: the sites hold tiny data (40×56×40 at 5 mm) and a tiny VQ-VAE whose 2-level encoder gives the
same 10×14×10 grid from a 2048-entry codebook, so only the prior is full size; local work is one step of
batch 1 per round. A 1-round, 1-step ``vqvae`` job first makes the global VQ-VAE the prior job needs.

Measured (``transfer_meter.TransferMeter`` filters at the sites and at the server, psutil for memory):

* bytes each way per site and round: the arrays the server's task carried (server → site: the prior plus the
  frozen VQ-VAE) and the update each site sent back (site → server: the prior's weight difference);
* seconds per round (first task receipt to the next round's first receipt, rounds ≥ 1) and the transfer
  time of each message: server filter ``send`` → site filter ``down`` (serialise, stream in chunks, rebuild)
  and site ``up`` → server ``recv``; with the MB/s this implies;
* what NVFlare logged for each streamed download (wire bytes and seconds, see
  ``transfer_meter.download_log_stats``);
* peak RSS / PSS of the whole process tree (server and both client processes).

In the POC the site filters are off by default (``--site-meters``): there the trainer runs in its own process
and a client filter would make the client job download the whole model to filter it (an extra hop), so the
rounds and bytes come from the server's filters and the transfer seconds from NVFlare's log only.

``--client-config`` / ``--server-config`` add top-level job settings (``config_fed_client.json`` /
``config_fed_server.json``, e.g. ``'{"np_download_chunk_size": 8388608}'``) to compare NVFlare's streaming
settings; by default the job runs with NVFlare 2.9's defaults, as ``synthbrain fl run`` does.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import scale
import transfer_meter

from fl_app.run_layout import RunLayout

OVERRIDES = {
    "data": {"shape": [40, 56, 40], "spacing": [5.0, 5.0, 5.0]},
    "vqvae": {"channels": [8, 16], "num_res_channels": [8, 16], "num_embeddings": 2048, "embedding_dim": 8},
    "prior": {"d_model": 512, "n_layers": 24, "n_heads": 16},
    "train": {"batch_size": 1},
}
"""Tiny data and VQ-VAE, full-size prior: 40×56×40 / 4 = the full-1mm code grid 10×14×10, 2048 codes."""


def model_bytes(profile_name: str, overrides: dict | None = None) -> dict[str, int]:
    """Parameter count and float32 bytes of a profile's prior and VQ-VAE, built on the meta device."""
    import torch

    from fl_app.config import load_profile
    from fl_app.models.prior import build_prior
    from fl_app.models.vqvae import build_vqvae

    prof = load_profile(profile_name, overrides)
    with torch.device("meta"):
        prior, vq = build_prior(prof), build_vqvae(prof)
    out = {}
    for name, m in (("prior", prior), ("vqvae", vq)):
        sd = m.state_dict()
        out[f"{name}_params"] = sum(t.numel() for t in sd.values())
        out[f"{name}_bytes"] = sum(t.numel() * t.element_size() for t in sd.values())
    out["code_tokens"] = int(prior.seq_len)
    return out


def transfer_times(records: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Per message, seconds from the sender's filter to the receiver's (``send``→``down``, ``up``→``recv``).

    Messages are matched by (site, round); a site's ``down`` pairs with the server's ``send`` to that site.
    """
    first: dict[tuple[str, str, int], float] = {}
    for r in records:
        if r.get("round") is None:
            continue
        site = r["site"] if r["direction"] in ("down", "up") else (r.get("peer") or "")
        key = (r["direction"], site, int(r["round"]))
        first[key] = min(first.get(key, float("inf")), float(r["t"]))
    out: dict[str, list[float]] = {"server_to_site": [], "site_to_server": []}
    for (d, site, rnd), t in sorted(first.items()):
        if d == "down" and ("send", site, rnd) in first:
            out["server_to_site"].append(t - first[("send", site, rnd)])
        if d == "up" and ("recv", site, rnd) in first:
            out["site_to_server"].append(first[("recv", site, rnd)] - t)
    return out


def run_prior_job(
    env: str,
    run_dir: Path,
    profile: dict,
    clients: list[str],
    cfg_dir: Path,
    rounds: int,
    meter_dir: Path,
    client_config: dict | None,
    server_config: dict | None,
    poc_workspace: Path | None = None,
    site_meters: bool = True,
) -> tuple[float, list[Path]]:
    """The ``prior`` job as ``run_job`` builds it, plus meters and extra job settings.

    ``env``: ``"sim"`` (simulator) or ``"poc"`` (submitted to the running POC in ``poc_workspace``).
    ``site_meters``: also meter at the sites (client filters; see ``--site-meters``).
    Returns (seconds, the server's job logs).
    """
    from fl_app.fl.run import JobSpec, build_recipe

    spec = JobSpec(
        kind="prior", profile=profile, num_clients=len(clients), num_rounds=rounds,
        checkpoint_dir=str(RunLayout(run_dir).job_dir("prior")),
        frozen_vqvae=str(RunLayout(run_dir).global_file("vqvae")),
        site_config_dir=str(cfg_dir) if env == "sim" else None,
        max_steps=1, run_name=run_dir.name, name="synthbrain-prior",
    )  # fmt: skip
    recipe = build_recipe(
        spec,
        result_filters=[transfer_meter.TransferMeter(str(meter_dir), "up")] if site_meters else None,
        data_filters=[transfer_meter.TransferMeter(str(meter_dir), "down")] if site_meters else None,
    )
    recipe.add_server_output_filter(transfer_meter.TransferMeter(str(meter_dir), "send"), tasks=["train"])
    recipe.add_server_input_filter(transfer_meter.TransferMeter(str(meter_dir), "recv"), tasks=["train"])
    if client_config:
        recipe.add_client_config(client_config)
    if server_config:
        recipe.add_server_config(server_config)
    t0 = time.perf_counter()
    if env == "sim":
        from nvflare.recipe.sim_env import SimEnv

        sim_root = run_dir / "nvflare" / "sim"
        recipe.run(SimEnv(clients=clients, num_threads=len(clients), workspace_root=str(sim_root)))
        return time.perf_counter() - t0, [sim_root / "synthbrain-prior" / "server" / "log.txt"]
    from nvflare.recipe.prod_env import ProdEnv

    from fl_app.fl import poc

    penv = ProdEnv(startup_kit_location=str(poc.admin_kit(poc_workspace)), username="admin@nvidia.com",
                   login_timeout=30.0)  # fmt: skip
    run = recipe.run(penv)
    result = run.get_result(timeout=3600.0)  # the server's job workspace, fetched to the admin's kit
    seconds = time.perf_counter() - t0
    return seconds, sorted(Path(result).rglob("log.txt")) if result else []


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--env", choices=["sim", "poc"], default="sim", help="simulator or a POC on loopback")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument(
        "--site-meters",
        choices=["auto", "on", "off"],
        default="auto",
        help="meter at the sites too (client filters). auto: on in the simulator, off in the POC, where the"
        " trainer runs in its own process and a client filter would make the client job download the whole"
        " model instead of passing the references through to the trainer (an extra hop at each site)",
    )
    p.add_argument("--subjects", type=int, default=3, help="subjects per site")
    p.add_argument("--client-config", type=json.loads, default=None, help="extra config_fed_client settings")
    p.add_argument("--server-config", type=json.loads, default=None, help="extra config_fed_server settings")
    p.add_argument("--workdir", type=Path, default=None)
    args = p.parse_args(argv)

    import nvflare
    import torch

    from fl_app.config import load_profile, write_site_yaml
    from fl_app.data.simulate import simulate_sites
    from fl_app.fl.run import run_job
    from fl_app.fl.server import FROZEN_PREFIX, read_checkpoint

    full = model_bytes("full-1mm")
    bench = model_bytes("cpu-demo", OVERRIDES)
    if bench["prior_params"] != full["prior_params"] or bench["code_tokens"] != full["code_tokens"]:
        raise RuntimeError(f"the bench's prior is not the full-1mm prior: {bench} vs {full}")

    work = (args.workdir or Path(tempfile.mkdtemp(prefix="large_model_"))).resolve()
    prof = load_profile("cpu-demo", OVERRIDES)
    sites = simulate_sites(work / "data", 2, args.subjects, prof, seed=0)
    cfg_dir = work / "site_configs"
    for s in sites:
        write_site_yaml(cfg_dir / f"{s.name}.yaml", {"name": s.name, "bids_dir": str(s), "min_subjects": 2,
                                                      "cache_dir": str(work / "cache" / s.name),
                                                      "compute": {"device": "cpu", "num_threads": 1}})  # fmt: skip
    clients = [s.name for s in sites]
    site_meters = args.site_meters == "on" or (args.site_meters == "auto" and args.env == "sim")
    run_dir = work / f"run_{args.env}"
    pdict = prof.model_dump(mode="json")
    ws = work / "poc" if args.env == "poc" else None
    meter_dir = work / f"meter_{args.env}"
    sampler = scale.TreeMemorySampler(os.getpid(), 0.5)
    pids: dict[str, int] = {}
    try:
        if ws is not None:  # a POC of our own: server + 2 clients from startup kits, stopped by PID below
            from fl_app.fl import poc

            poc.prepare(ws, clients)
            pids = poc.start(ws, clients, {c: {"SYNTHBRAIN_SITE_CONFIG": str(cfg_dir / f"{c}.yaml")}
                                           for c in clients})  # fmt: skip
            poc.wait_ready(ws, clients, timeout=300)
        t0 = time.perf_counter()
        run_job("vqvae", args.env, run_dir, profile=pdict, clients=clients, num_rounds=1, max_steps=1,
                site_config_dir=cfg_dir, poc_workspace=ws, timeout=1800)  # fmt: skip
        vqvae_job_s = time.perf_counter() - t0
        sampler.start()
        job_s, server_logs = run_prior_job(
            args.env, run_dir, pdict, clients, cfg_dir, args.rounds, meter_dir,
            args.client_config, args.server_config, ws, site_meters,
        )  # fmt: skip
    finally:
        if sampler.is_alive():
            sampler.stop()
        if ws is not None:
            from fl_app.fl import poc

            stopped = poc.stop(ws)
            print(f"POC stopped: {sorted(stopped)} (started {sorted(pids.values())})", flush=True)
    ck = read_checkpoint(RunLayout(run_dir).job_dir("prior"))
    if ck is None or ck["round"] != args.rounds - 1:
        raise RuntimeError(f"the prior job did not complete its {args.rounds} rounds")
    global_bytes = sum(v.numel() * v.element_size() for v in ck["params"].values())
    prior_in_ck = sum(
        v.numel() * v.element_size() for k, v in ck["params"].items() if not k.startswith(FROZEN_PREFIX)
    )
    recs = transfer_meter.read_records(meter_dir)
    per_msg: dict[str, list[int]] = {"down": [], "up": []}
    alias = {"down": "down", "up": "up"} if site_meters else {"send": "down", "recv": "up"}
    for r in recs:
        if r["direction"] in alias:
            per_msg[alias[r["direction"]]].append(int(r["bytes"]))
    # rounds and bytes from the sites' meters, or (without them) from the server's
    times = scale.round_times(recs) if site_meters else scale.round_times(recs, "send", "recv")
    tt = transfer_times(recs)
    down_b = statistics.mean(per_msg["down"]) if per_msg["down"] else 0.0
    up_b = statistics.mean(per_msg["up"]) if per_msg["up"] else 0.0

    logged = transfer_meter.download_log_stats(server_logs)
    wire = {
        k: {
            "downloads": len(v),
            "mean_bytes": statistics.mean(d["bytes"] for d in v) if v else None,
            "mean_seconds": statistics.mean(d["seconds"] for d in v) if v else None,
            "MB_per_s": (sum(d["bytes"] for d in v) / sum(d["seconds"] for d in v) / 1e6) if v else None,
        }
        for k, v in logged.items()
    }

    def rate(b: float, secs: list[float]) -> float | None:
        return b / statistics.median(secs) / 1e6 if secs else None

    out = {
        "full_1mm": full,
        "full_1mm_prior_job_global_model_bytes": full["prior_bytes"] + full["vqvae_bytes"],
        "bench_prior_params": bench["prior_params"],
        "bench_prior_bytes": prior_in_ck,
        "bench_global_model_bytes": global_bytes,
        "env": args.env,
        "site_meters": site_meters,
        "sites": len(clients),
        "rounds": args.rounds,
        "local_steps": 1,
        "batch_size": 1,
        "bytes_server_to_site_per_round_per_site": down_b,
        "bytes_site_to_server_per_round_per_site": up_b,
        "messages": {k: len(v) for k, v in per_msg.items()},
        "nvflare_logged_downloads": wire,
        "round_seconds": times,
        "seconds_per_round": scale.steady_seconds(times),
        "transfer_seconds": tt,
        "median_transfer_seconds": {k: (statistics.median(v) if v else None) for k, v in tt.items()},
        "effective_MB_per_s": {
            "server_to_site": rate(down_b, tt["server_to_site"]),
            "site_to_server": rate(up_b, tt["site_to_server"]),
        },
        "max_site_train_seconds_per_round": [
            max(m.get("train_seconds", 0.0) for m in h["sites"].values()) for h in ck["history"]
        ],
        "prior_job_seconds": job_s,
        "vqvae_job_seconds": vqvae_job_s,
        "peak_rss_mb": sampler.peak_rss_mb,
        "peak_pss_mb": sampler.peak_pss_mb,
        "client_config": args.client_config,
        "server_config": args.server_config,
        "nvflare": nvflare.__version__,
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "load_average_at_end": list(os.getloadavg()),
        "workdir": str(work),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

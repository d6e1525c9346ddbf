"""Scale of the federated VQ-VAE job in NVFlare's simulator: 3, 8, 16 ... sites at the tiny size.

    python bench/scale.py --sites 3 8 16 --json OUT [--subjects 4] [--rounds 4] [--steps 2]

Every site count runs the same job (``run_job("vqvae", "sim", ...)``): 32³ volumes at 5 mm, the tiny
2-level VQ-VAE, the same subjects per site and local steps per round; each simulated site gets one thread
(``compute.num_threads: 1``). Sites are the first N of one simulated set (the same data for every count).

Each count runs in its own child process (``--one N``), so its memory is measured from a clean start:

* **seconds per round**, without start-up: the sites' data filters (``transfer_meter.TransferMeter``)
  time-stamp when each site receives a round's task; a round lasts from the first site's receipt to the first
  receipt of the next round (the last round: to the last site's upload). Round 0 also holds each site's
  first-time set-up (dataset, model, optimiser), and the last round's figure lacks the server's aggregation,
  so the figure is the mean of rounds 1 .. R-2 (see :func:`steady_seconds`).
* **peak memory** of the whole process tree (the child and every descendant: simulator server, client
  processes), sampled every ``--sample-every`` s with psutil: the peak of the summed RSS and of the summed PSS
  (PSS counts pages shared between processes, e.g. the torch libraries, once).
* **bytes per round**: the model payload each site received plus the update it sent back, measured by the same
  filters at every site (the arrays' ``nbytes``), summed over the sites.

The summary gives, for each count N, the growth of each figure relative to the smallest count N0, divided by
N / N0: a value ≤ 1 means it grew no worse than linearly in the number of sites.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from fl_app.run_layout import RunLayout

TINY = {
    "data": {"shape": [32, 32, 32], "spacing": [5.0, 5.0, 5.0]},
    "vqvae": {"channels": [8, 16], "num_res_channels": [8, 16], "num_embeddings": 32, "embedding_dim": 8},
    "train": {"batch_size": 2},
}
"""The tiny size. 5 mm, not the tests' 6 mm: the simulated anisotropic sites (every 3rd and 4th preset, and
the jittered later sites) get voxels of up to 7.1 mm at 6 mm, beyond preprocessing's plausible 0.2-6 mm
range, so those sites would have no usable subject; at 5 mm every site of 16 has voxels ≤ 5.9 mm."""

METRICS = ("seconds_per_round", "peak_pss_mb", "peak_rss_mb", "bytes_per_round")


# ---------------------------------------------------------------------------------------------- pure parts
def round_times(records: list[dict[str, Any]], start: str = "down", end: str = "up") -> list[float]:
    """Seconds of each round from transfer records (see the module docstring).

    ``start``/``end``: the directions that open and close a round: the sites' ``down``/``up`` (default) or
    the server's ``send``/``recv``.
    """
    downs: dict[int, list[float]] = {}
    ups: dict[int, list[float]] = {}
    for r in records:
        if r.get("round") is None or r["direction"] not in (start, end):
            continue
        (downs if r["direction"] == start else ups).setdefault(int(r["round"]), []).append(float(r["t"]))
    rounds = sorted(downs)
    out = []
    for i, rnd in enumerate(rounds):
        start = min(downs[rnd])
        if i + 1 < len(rounds):
            out.append(min(downs[rounds[i + 1]]) - start)
        elif rnd in ups:
            out.append(max(ups[rnd]) - start)
    return out


def steady_seconds(times: list[float]) -> float:
    """Seconds per round without start-up: the mean of the full rounds after round 0.

    ``times`` from :func:`round_times`; its last entry lacks the server's aggregation, so it is used only when
    no full round after round 0 exists (2 rounds), and round 0 (with the sites' set-up) only for 1 round.
    """
    if not times:
        raise ValueError("no rounds recorded")
    steady = times[1:-1] or times[1:] or times
    return sum(steady) / len(steady)


def bytes_per_round(records: list[dict[str, Any]]) -> dict[str, float]:
    """Mean bytes per round over the rounds seen: down (server → sites), up (sites → server), total."""
    per: dict[int, dict[str, int]] = {}
    for r in records:
        if r.get("round") is None or r["direction"] not in ("down", "up"):
            continue
        d = per.setdefault(int(r["round"]), {"down": 0, "up": 0})
        d[r["direction"]] += int(r["bytes"])
    if not per:
        return {"down": 0.0, "up": 0.0, "total": 0.0}
    down = sum(v["down"] for v in per.values()) / len(per)
    up = sum(v["up"] for v in per.values()) / len(per)
    return {"down": down, "up": up, "total": down + up}


def summarise(rows: list[dict[str, Any]], metrics: tuple[str, ...] = METRICS) -> dict[str, Any]:
    """Growth of each metric against the smallest site count, normalised per site.

    ``growth[N][m] = (m(N) / m(N0)) / (N / N0)`` with N0 the smallest count; ``linear[m]`` is True when every
    count's growth is ≤ 1 (+ ``tol``: 5 %, for timing noise), i.e. the metric grew no worse than linearly.
    """
    if not rows:
        raise ValueError("no rows")
    rows = sorted(rows, key=lambda r: r["sites"])
    base = rows[0]
    n0 = base["sites"]
    tol = 0.05
    growth: dict[int, dict[str, float]] = {}
    for r in rows:
        g = {}
        for m in metrics:
            if base.get(m) and r.get(m) is not None:
                g[m] = (r[m] / base[m]) / (r["sites"] / n0)
        growth[r["sites"]] = g
    linear = {m: all(g[m] <= 1.0 + tol for g in growth.values() if m in g) for m in metrics}
    return {"baseline_sites": n0, "growth_per_site": growth, "no_worse_than_linear": linear, "tolerance": tol}


# ---------------------------------------------------------------------------------------------- memory
class TreeMemorySampler(threading.Thread):
    """Samples the summed RSS and PSS (MB) of a process and all its descendants until stopped."""

    def __init__(self, pid: int, every: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.pid, self.every = pid, every
        self.peak_rss_mb = self.peak_pss_mb = 0.0
        self.max_procs = 0
        self.samples = 0
        self._halt = threading.Event()

    def run(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self._halt.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            rss = pss = 0
            for p in procs:
                try:
                    mi = p.memory_full_info()
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
                rss += mi.rss
                pss += getattr(mi, "pss", mi.rss)
            self.peak_rss_mb = max(self.peak_rss_mb, rss / 2**20)
            self.peak_pss_mb = max(self.peak_pss_mb, pss / 2**20)
            self.max_procs = max(self.max_procs, len(procs))
            self.samples += 1
            self._halt.wait(self.every)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=10)


# ---------------------------------------------------------------------------------------------- one count
def prepare(work: Path, n_sites: int, subjects: int) -> Path:
    """Simulate ``n_sites`` sites (site YAMLs with one thread each) and warm their preprocessing caches."""
    from fl_app.config import load_profile, load_site_config, write_site_yaml
    from fl_app.data.simulate import simulate_sites
    from fl_app.fl.client import open_site_dataset

    prof = load_profile("cpu-demo", TINY)
    sites = simulate_sites(work / "data", n_sites, subjects, prof, seed=0)
    cfg_dir = work / "site_configs_all"
    for s in sites:
        y = cfg_dir / f"{s.name}.yaml"
        write_site_yaml(y, {"name": s.name, "bids_dir": str(s), "min_subjects": 2,
                            "cache_dir": str(work / "cache" / s.name),
                            "compute": {"device": "cpu", "num_threads": 1}})  # fmt: skip
        open_site_dataset(load_site_config(y), prof)  # preprocessing cache, outside the timed job
    return cfg_dir


def run_one(work: Path, n_sites: int, rounds: int, steps: int, out: Path) -> None:
    """Child process: the vqvae job with the first ``n_sites`` sites; writes its figures to ``out``."""
    import shutil

    import transfer_meter

    from fl_app.config import load_profile
    from fl_app.fl.run import run_job
    from fl_app.fl.server import read_checkpoint

    all_cfg = work / "site_configs_all"
    cfg_dir = work / f"site_configs_{n_sites}"
    cfg_dir.mkdir(parents=True, exist_ok=True)
    clients = [f"site-{i + 1}" for i in range(n_sites)]
    for c in clients:
        shutil.copy(all_cfg / f"{c}.yaml", cfg_dir / f"{c}.yaml")
    meter = work / f"meter_{n_sites}"
    shutil.rmtree(meter, ignore_errors=True)
    run_dir = work / f"run_{n_sites}"
    shutil.rmtree(run_dir, ignore_errors=True)
    prof = load_profile("cpu-demo", TINY).model_dump(mode="json")
    res = run_job(
        "vqvae", "sim", run_dir, profile=prof, clients=clients, num_rounds=rounds, max_steps=steps,
        site_config_dir=cfg_dir,
        data_filters=[transfer_meter.TransferMeter(str(meter), "down")],
        result_filters=[transfer_meter.TransferMeter(str(meter), "up")],
    )  # fmt: skip
    recs = transfer_meter.read_records(meter)
    ck = read_checkpoint(RunLayout(run_dir).job_dir("vqvae"))
    sites_seen = {s for h in ck["history"] for s in h["sites"]}
    job_dir = run_dir / "nvflare" / "sim" / "synthbrain-vqvae"
    logged = transfer_meter.download_log_stats([job_dir / "server" / "log.txt"])
    wire = sum(d["bytes"] for v in logged.values() for d in v)
    times = round_times(recs)
    b = bytes_per_round(recs)
    out.write_text(
        json.dumps(
            {
                "sites": n_sites,
                "sites_reporting": len(sites_seen),
                "job_seconds": res["seconds"],
                "round_seconds": times,
                "seconds_per_round": steady_seconds(times),
                "bytes_per_round": b["total"],
                "bytes_down_per_round": b["down"],
                "bytes_up_per_round": b["up"],
                "bytes_per_round_per_site": b["total"] / n_sites,
                "wire_bytes_per_round": wire / rounds,  # NVFlare's logged downloads, both ways
                "max_site_train_seconds_per_round": [
                    max(m.get("train_seconds", 0.0) for m in h["sites"].values()) for h in ck["history"]
                ],
            }
        )
    )


def measure(work: Path, n_sites: int, rounds: int, steps: int, every: float, timeout: float) -> dict:
    """Run one count in a child process, sampling its process tree's memory; returns its row."""
    part = work / f"part_{n_sites}.json"
    part.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", str(n_sites), "--workdir", str(work),
           "--rounds", str(rounds), "--steps", str(steps), "--json", str(part)]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, start_new_session=True)
    sampler = TreeMemorySampler(proc.pid, every)
    sampler.start()
    try:
        rc = proc.wait(timeout=timeout)
    finally:
        sampler.stop()
        if proc.poll() is None:  # timed out or interrupted: end the child's whole process group
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    if rc != 0 or not part.exists():
        raise RuntimeError(f"{n_sites} sites: the job failed (exit {rc}); see {work}/run_{n_sites}/nvflare")
    row = json.loads(part.read_text())
    row.update(
        wall_seconds=time.perf_counter() - t0,
        peak_rss_mb=sampler.peak_rss_mb,
        peak_pss_mb=sampler.peak_pss_mb,
        peak_rss_mb_per_site=sampler.peak_rss_mb / n_sites,
        max_processes=sampler.max_procs,
        memory_samples=sampler.samples,
    )
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--sites", type=int, nargs="+", default=[3, 8, 16])
    p.add_argument("--subjects", type=int, default=4, help="subjects per site")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, default=2, help="local steps per round per site")
    p.add_argument("--sample-every", type=float, default=0.5, help="memory sampling interval (s)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds allowed per site count")
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # internal: child mode
    args = p.parse_args(argv)

    if args.one is not None:
        run_one(args.workdir.resolve(), args.one, args.rounds, args.steps, args.json)
        return 0

    import torch

    work = (args.workdir or Path(tempfile.mkdtemp(prefix="scale_"))).resolve()
    t0 = time.perf_counter()
    prepare(work, max(args.sites), args.subjects)
    prep_s = time.perf_counter() - t0
    rows = []
    for n in sorted(set(args.sites)):
        print(f"--- {n} sites", flush=True)
        rows.append(measure(work, n, args.rounds, args.steps, args.sample_every, args.timeout))
        print(json.dumps(rows[-1]), flush=True)
    out = {
        "shape": TINY["data"]["shape"],
        "spacing_mm": TINY["data"]["spacing"],
        "subjects_per_site": args.subjects,
        "rounds": args.rounds,
        "local_steps": args.steps,
        "threads_per_site": 1,
        "cpu_count": os.cpu_count(),
        "load_average_at_end": list(os.getloadavg()),
        "prepare_seconds": prep_s,
        "torch": torch.__version__,
        "rows": rows,
        "summary": summarise(rows),
        "workdir": str(work),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A ``synthbrain tune`` study as a benchmark: per-trial time, pruning, best vs the profile's own values.

    python bench/tune.py --json OUT.json -- [synthbrain tune options]

Runs ``synthbrain tune`` with the given options (default: the recorded cpu-demo VQ-VAE study, below), then
prints the study's figures as JSON: trials by state, mean seconds per finished trial (complete / pruned),
wall time, the baseline trial (the profile's own values, run first), the best trial and their difference
on the held-out objective. The recorded study (docs/BENCHMARKS.md, "Tuning")::

    python bench/tune.py --json out/tune.json -- --job vqvae --space bench/tune_space_vqvae.yaml \\
        --study cpu-demo-vqvae --trials 30 --rounds 3 --steps 10 --sites 2 --subjects 8 --threads 2
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

DEFAULT = ["--job", "vqvae", "--space", str(Path(__file__).with_name("tune_space_vqvae.yaml")),
           "--study", "cpu-demo-vqvae", "--trials", "30", "--rounds", "3", "--steps", "10",
           "--sites", "2", "--subjects", "8", "--threads", "2"]  # fmt: skip


def run(tune_argv: list[str]) -> dict:
    from fl_app.cli import build_parser

    argv = ["tune", *tune_argv]
    args = build_parser("tune").parse_args(argv)
    args.command_line = argv
    t0 = time.perf_counter()
    rc = args.func(args)
    wall = time.perf_counter() - t0
    out = Path(args.out or f"runs/tune-{args.study}")
    summary = json.loads((out / "summary.json").read_text())
    by_state: dict[str, list[float]] = {}
    for t in summary["trials"]:
        if t["seconds"] is not None:
            by_state.setdefault(t["state"], []).append(t["seconds"])
    import torch

    return {
        "command": "synthbrain " + " ".join(argv),
        "exit_code": rc,
        "wall_seconds": wall,
        "states": summary["states"],
        "seconds_per_trial_mean": summary["seconds_per_trial_mean"],
        "seconds_per_trial_by_state": {s: sum(v) / len(v) for s, v in by_state.items()},
        "rounds_run_by_trial": [t["rounds_run"] for t in summary["trials"]],
        "baseline": summary.get("baseline"),
        "best": summary.get("best"),
        "best_minus_baseline": summary.get("best_minus_baseline"),
        "trial_size": summary["trial_size"],
        "data": summary["data"],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    tune_argv = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=None)
    a = p.parse_args(own)
    res = run(tune_argv or DEFAULT)
    print(json.dumps(res, indent=2, default=str))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(res, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

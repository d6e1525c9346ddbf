"""``synthbrain privacy report --run DIR [--json OUT]``: what each site spent, per job, and the server's DP.

Sources, most authoritative first:

* the sites' own privacy ledgers (``--site-config-dir`` with the site YAMLs, as in the simulator and
  POC, or ``--ledger FILE`` for a hospital reading its own): every DP-SGD release with (σ, q, steps, C);
* otherwise the accounting values the sites released with their updates (``privacy.release:
  [accounting]``), stored in the server's checkpoint history ``<run>/fl/<job>/checkpoint.pt``;
* the server's DP-FedAvg records (one per aggregated round) in the same history: site-level ε.

Per site and job: ε at δ (that job alone and all jobs composed), noise multiplier, clip bound, rounds,
steps, sampling rate. :func:`attach_to_model_card` writes the totals into ``<run>/global/model_card.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from fl_app.privacy.accountant import PrivacyLedger, epsilon_from_history
from fl_app.run_layout import JOBS, RunLayout

__all__ = ["add_privacy_parser", "attach_to_model_card", "format_report", "main", "privacy_report"]


def _fin(x: Any) -> Any:
    return x if not (isinstance(x, float) and not math.isfinite(x)) else None


def _site_from_ledger(
    ledger: PrivacyLedger, delta: float, budget: float | None, job_ids: dict[str, str]
) -> dict:
    entries = ledger.entries()
    jobs: dict[str, dict[str, Any]] = {}
    for e in entries:
        j = jobs.setdefault(e.job, {"job_ids": [], "rounds": 0, "steps": 0, "noise_multiplier": set(),
                                    "sample_rate": set(), "clip": set(), "history": []})  # fmt: skip
        if e.job_id not in j["job_ids"]:
            j["job_ids"].append(e.job_id)
        j["rounds"] += 1
        j["steps"] += e.steps
        j["noise_multiplier"].add(round(e.noise_multiplier, 6))
        j["sample_rate"].add(round(e.sample_rate, 6))
        j["clip"].add(e.max_grad_norm)
        j["history"].append(e.triple())
    out_jobs = {}
    for name, j in jobs.items():
        out_jobs[name] = {
            "epsilon": _fin(epsilon_from_history(j["history"], delta, ledger.accountant)),
            "delta": delta,
            "noise_multiplier": sorted(j["noise_multiplier"])[0] if len(j["noise_multiplier"]) == 1
            else sorted(j["noise_multiplier"]),
            "clip": sorted(j["clip"])[0] if len(j["clip"]) == 1 else sorted(j["clip"]),
            "sample_rate": sorted(j["sample_rate"])[0] if len(j["sample_rate"]) == 1 else sorted(j["sample_rate"]),
            "rounds": j["rounds"],
            "steps": j["steps"],
            "job_ids": j["job_ids"],
        }  # fmt: skip
    return {
        "source": f"ledger {ledger.path}",
        "level": "record (DP-SGD, Opacus, Poisson sampling)",
        "accountant": ledger.accountant,
        "delta": delta,
        "epsilon_budget": budget,
        "total_epsilon": _fin(ledger.epsilon(delta)),
        "refusals": len(ledger.refusals()),
        "jobs": out_jobs,
    }


def _site_from_history(histories: dict[str, list[dict]]) -> dict[str, dict]:
    """Accounting values the sites released with their updates (when no ledger is at hand)."""
    sites: dict[str, dict] = {}
    for kind, hist in histories.items():
        for rec in hist:
            for site, m in rec.get("sites", {}).items():
                if "dp_noise_multiplier" not in m:
                    continue
                s = sites.setdefault(site, {"source": "released accounting (server history)",
                                            "level": "record (DP-SGD)", "jobs": {}})  # fmt: skip
                s["delta"] = m.get("dp_delta")
                s["total_epsilon"] = m.get("epsilon")  # the last one reported is the latest total
                s["jobs"][kind] = {
                    "epsilon": m.get("job_epsilon"),
                    "delta": m.get("dp_delta"),
                    "noise_multiplier": m.get("dp_noise_multiplier"),
                    "clip": m.get("dp_max_grad_norm"),
                    "sample_rate": m.get("dp_sample_rate"),
                    "rounds": s["jobs"].get(kind, {}).get("rounds", 0) + 1,
                    "steps": int(m.get("dp_steps", 0)),
                }
    return sites


def privacy_report(
    run_dir: str | Path, site_config_dir: str | Path | None = None, ledgers: list[str | Path] | None = None
) -> dict[str, Any]:
    """The privacy report of a run (JSON-able): ``{"run", "sites": {...}, "server": {job: {...}}}``."""
    from fl_app.fl.server import read_checkpoint

    run_dir = Path(run_dir)
    histories: dict[str, list[dict]] = {}
    for kind in JOBS:
        job_dir = RunLayout(run_dir).job_dir(kind)
        ck = read_checkpoint(job_dir) if job_dir.exists() else None
        if ck is not None:
            histories[kind] = ck.get("history", [])
    server: dict[str, Any] = {}
    for kind, hist in histories.items():
        aggs = [h.get("aggregation", {}) for h in hist]
        dp = [a for a in aggs if a.get("name") == "dp-fedavg"]
        if not dp:
            server[kind] = {"mechanism": aggs[-1].get("name", "fedavg") if aggs else None, "epsilon": None,
                            "note": "no server-side DP"}  # fmt: skip
            continue
        last = dp[-1]
        rounds = sum(1 for a in dp if a.get("round_noised"))
        server[kind] = {
            "mechanism": "dp-fedavg",
            "level": "site (user-level): add/remove one site's whole contribution",
            "epsilon": _fin(epsilon_from_history([(last["noise_multiplier"], 1.0, rounds)], last["delta"],
                                                 last.get("accountant", "rdp"))),
            "delta": last["delta"],
            "noise_multiplier": last["noise_multiplier"],
            "clip": last["clip"],
            "adaptive_clipping": last.get("adaptive_clipping", False),
            "final_clip": last.get("next_clip"),
            "sample_rate": 1.0,
            "rounds": rounds,
        }  # fmt: skip
    sites = _site_from_history(histories)
    cfgs = []
    if site_config_dir is not None:
        from fl_app.config import load_site_config

        cfgs = [
            load_site_config(p) for p in sorted(Path(site_config_dir).glob("*.yaml")) if p.stem != "project"
        ]
    job_ids: dict[str, str] = {}
    for cfg in cfgs:
        if not cfg.privacy.enabled:
            sites.setdefault(
                cfg.name, {"source": str(cfg.path), "level": "none", "total_epsilon": None, "jobs": {}}
            )
            continue
        from fl_app.fl.local_dp import ledger_path

        led = PrivacyLedger(ledger_path(cfg), cfg.name, cfg.privacy.accountant)
        sites[cfg.name] = _site_from_ledger(led, cfg.privacy.delta, cfg.privacy.epsilon_budget, job_ids)
    for path in ledgers or []:
        raw = json.loads(Path(path).read_text())
        led = PrivacyLedger(path, raw["site"], raw.get("accountant", "rdp"))
        sites[raw["site"]] = _site_from_ledger(led, 1e-5, None, job_ids)
    return {"run": str(run_dir), "sites": dict(sorted(sites.items())), "server": server}


def format_report(rep: dict[str, Any]) -> str:
    """Human-readable table of :func:`privacy_report`."""
    f = lambda v: f"{v:.3g}" if isinstance(v, float) else ("-" if v is None else str(v))  # noqa: E731
    lines = [
        f"Privacy report of {rep['run']}",
        "",
        "Record-level DP-SGD at the sites (ε at δ; all jobs composed):",
    ]
    lines.append(f"{'site':<14}{'job':<8}{'ε':>8}{'δ':>9}{'σ':>8}{'C':>7}{'q':>8}{'rounds':>8}{'steps':>7}")
    for site, s in rep["sites"].items():
        for kind, j in s.get("jobs", {}).items():
            lines.append(f"{site:<14}{kind:<8}{f(j['epsilon']):>8}{f(j['delta']):>9}{f(j['noise_multiplier']):>8}"
                         f"{f(j['clip']):>7}{f(j['sample_rate']):>8}{j['rounds']:>8}{j['steps']:>7}")  # fmt: skip
        extra = f", budget {f(s.get('epsilon_budget'))}" if s.get("epsilon_budget") is not None else ""
        extra += f", {s['refusals']} refused rounds" if s.get("refusals") else ""
        lines.append(f"{site:<14}{'TOTAL':<8}{f(s.get('total_epsilon')):>8}{extra}")
    lines += ["", "Site-level DP-FedAvg on the server:"]
    for kind, s in rep["server"].items():
        if s.get("mechanism") != "dp-fedavg":
            lines.append(f"  {kind}: none ({s.get('mechanism')})")
        else:
            lines.append(f"  {kind}: ε = {f(s['epsilon'])} at δ = {f(s['delta'])}, σ = {f(s['noise_multiplier'])}, "
                         f"C = {f(s['clip'])}, {s['rounds']} rounds (q = 1)")  # fmt: skip
    return "\n".join(lines)


def attach_to_model_card(run_dir: str | Path, rep: dict[str, Any]) -> Path | None:
    """Write the report's totals into ``<run>/global/model_card.json`` (``privacy.report``)."""
    card_path = RunLayout(run_dir).global_dir / "model_card.json"
    if not card_path.exists():
        return None
    card = json.loads(card_path.read_text())
    priv = card.setdefault("privacy", {})
    priv["report"] = {
        "site_total_epsilon": {s: v.get("total_epsilon") for s, v in rep["sites"].items()},
        "site_delta": {s: v.get("delta") for s, v in rep["sites"].items()},
        "server_epsilon": {k: v.get("epsilon") for k, v in rep["server"].items()},
        "sites": rep["sites"],
        "server": rep["server"],
    }
    priv["differential_privacy"] = bool(
        any(v.get("total_epsilon") for v in rep["sites"].values())
        or any(v.get("epsilon") for v in rep["server"].values())
    )
    card_path.write_text(json.dumps(card, indent=2, default=str))
    return card_path


def _cmd(args: argparse.Namespace) -> int:
    rep = privacy_report(args.run, args.site_config_dir, args.ledger)
    print(format_report(rep))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rep, indent=2, default=str))
    if args.update_card:
        card = attach_to_model_card(args.run, rep)
        if card is None:
            print(
                f"error: no model card at {Path(args.run) / 'global' / 'model_card.json'} to update",
                file=sys.stderr,
            )
            return 1
        print(f"model card updated: {card}")
    return 0


def _add_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--run", required=True, help="run folder (runs/<name>)")
    p.add_argument("--site-config-dir", default=None, help="site YAMLs: read each site's own privacy ledger")
    p.add_argument("--ledger", nargs="*", default=None, help="privacy ledger file(s) to include")
    p.add_argument("--json", default=None, help="write the report as JSON here")
    p.add_argument(
        "--update-card", action="store_true", help="write the totals into <run>/global/model_card.json"
    )
    p.set_defaults(func=_cmd)
    return p


def add_privacy_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """``synthbrain privacy report --run DIR [--json OUT]``."""
    pr = subparsers.add_parser("privacy", help="differential-privacy accounting of a run")
    sub = pr.add_subparsers(dest="privacy_command", required=True)
    _add_args(
        sub.add_parser("report", help="per site and job: ε at δ, σ, clip, rounds, steps, sampling rate")
    )
    return pr


def main(argv: list[str] | None = None) -> int:
    """``python -m fl_app.privacy.report --run DIR ...`` (same as ``synthbrain privacy report``)."""
    args = _add_args(argparse.ArgumentParser(description=__doc__)).parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())

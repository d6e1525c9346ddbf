"""Differential-privacy math in plain functions (no NVFlare), and each site's persistent privacy ledger.

* :func:`epsilon_from_history` / :func:`noise_multiplier_for`: Opacus' RDP (or PRV) accountant over a
  history of Gaussian-mechanism invocations ``(noise_multiplier σ, sample_rate q, steps)``. Both the
  record-level DP-SGD at a site (q = Poisson rate of a record) and the server's DP-FedAvg (q = 1: every
  participating site, every round) are expressed this way.
* :func:`clip_by_global_norm` / :func:`gaussian_noise`: the two primitives of the server mechanism.
* :class:`PrivacyLedger`: one JSON file per site (in the site's own state folder, named by its YAML)
  listing every DP release the site has made, across rounds, jobs and client restarts. ε is always
  recomputed from the whole list, so composition over both jobs is exact for the accountant used. An
  entry is keyed by ``(session, round)``, the session being one client process's run of one job (a
  fresh random id): recording the same round twice never counts it twice, while a round that is really
  run again (a restarted job, a re-run in the simulator, where every job id is ``simulate_job``) is
  a new release and is counted -- never fewer releases than happened.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "LEDGER_FORMAT",
    "LedgerEntry",
    "PrivacyBudgetExceeded",
    "PrivacyLedger",
    "clip_by_global_norm",
    "epsilon_from_history",
    "gaussian_noise",
    "global_norm",
    "noise_multiplier_for",
]

LEDGER_FORMAT = "synthbrain-privacy-ledger/1"
History = Sequence[tuple[float, float, int]]
"""``[(noise_multiplier, sample_rate, steps), ...]``: Opacus' accountant history format."""


class PrivacyBudgetExceeded(RuntimeError):
    """The planned release does not fit the site's remaining ε budget: the site refuses to train."""


def _accountant(name: str):
    from opacus.accountants import create_accountant

    return create_accountant(name)


def epsilon_from_history(
    history: Iterable[tuple[float, float, int]], delta: float, accountant: str = "rdp"
) -> float:
    """ε at ``delta`` of the composition of all Gaussian-mechanism steps in ``history``.

    Args:
        history: ``(σ, q, steps)`` triples; ``steps`` subsampled Gaussian mechanisms with noise multiplier
            σ (noise std / sensitivity) and Poisson sampling rate q each.
        delta: target δ.
        accountant: ``"rdp"`` (Opacus ``RDPAccountant``) or ``"prv"`` (``PRVAccountant``).

    Returns:
        ε (0.0 for an empty history, ``inf`` if any step has σ = 0).
    """
    hist = [(float(s), float(q), int(n)) for s, q, n in history if int(n) > 0]
    if not hist:
        return 0.0
    if any(s <= 0 for s, _, _ in hist):
        return math.inf
    acc = _accountant(accountant)
    acc.history = list(hist)
    return float(acc.get_epsilon(delta=delta))


def noise_multiplier_for(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "rdp",
    prior_history: History = (),
) -> float:
    """Smallest σ (to 1e-3 relative) such that ``prior_history`` + ``steps`` × (σ, q) spends ≤ ``target_epsilon``.

    With an empty ``prior_history`` this is Opacus' ``get_noise_multiplier``; with one it plans a new job
    given what the site has already spent. Raises ``ValueError`` if even σ → ∞ cannot meet the target
    (the prior history alone already exceeds it).
    """
    if target_epsilon <= 0 or steps <= 0:
        raise ValueError(f"need target_epsilon > 0 and steps > 0, got {target_epsilon}, {steps}")
    prior = list(prior_history)
    if epsilon_from_history(prior, delta, accountant) >= target_epsilon:
        raise ValueError(f"the history already spends ε ≥ {target_epsilon}")

    def eps(sigma: float) -> float:
        return epsilon_from_history([*prior, (sigma, sample_rate, steps)], delta, accountant)

    lo, hi = 0.0, 1.0
    while eps(hi) > target_epsilon:
        lo, hi = hi, 2 * hi
        if hi > 1e4:
            raise ValueError(f"cannot reach ε = {target_epsilon} at δ = {delta} with the prior history")
    while hi - lo > 1e-3 * hi:
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if eps(mid) > target_epsilon else (lo, mid)
    return hi


# --------------------------------------------------------------------------- server mechanism primitives


def global_norm(tensors: Mapping[str, np.ndarray]) -> float:
    """L2 norm of all arrays together (float64)."""
    return float(
        math.sqrt(sum(float(np.sum(np.square(np.asarray(v, dtype=np.float64)))) for v in tensors.values()))
    )


def clip_by_global_norm(
    tensors: Mapping[str, np.ndarray], clip: float
) -> tuple[dict[str, np.ndarray], float]:
    """Scale ``tensors`` by ``min(1, clip / ‖tensors‖₂)`` (one global L2 norm over all of them).

    Returns:
        ``(clipped float64 arrays, norm before clipping)``; ``‖clipped‖₂ ≤ clip`` always.
    """
    if clip <= 0:
        raise ValueError(f"clip must be > 0, got {clip}")
    norm = global_norm(tensors)
    scale = min(1.0, clip / norm) if norm > 0 else 1.0
    return {k: np.asarray(v, dtype=np.float64) * scale for k, v in tensors.items()}, norm


def gaussian_noise(
    shapes: Mapping[str, tuple[int, ...]], std: float, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Independent N(0, std²) arrays of the given shapes (float64)."""
    return {k: rng.normal(0.0, std, size=s) if std > 0 else np.zeros(s) for k, s in shapes.items()}


# --------------------------------------------------------------------------- site ledger


@dataclass
class LedgerEntry:
    """One DP release by a site: the DP-SGD steps of one round of one job.

    Attributes:
        job_id: NVFlare job id (informative: the simulator gives every job the same id).
        session: random id of the client process's run of this job (the dedup key with ``round``).
        job: job kind (``vqvae`` / ``prior``) or another label.
        run: consortium run name, if known.
        round: FL round.
        noise_multiplier, sample_rate, steps: the accountant triple.
        max_grad_norm: per-sample clip bound C.
        time: UTC ISO time recorded.
    """

    job_id: str
    job: str
    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float
    run: str = ""
    time: str = ""
    session: str = ""

    def triple(self) -> tuple[float, float, int]:
        return (self.noise_multiplier, self.sample_rate, self.steps)


@dataclass
class _LedgerData:
    site: str
    entries: list[LedgerEntry] = field(default_factory=list)
    refusals: list[dict[str, Any]] = field(default_factory=list)


class PrivacyLedger:
    """A site's privacy ledger: a JSON file composing every DP release the site ever made.

    The file (``format``, ``site``, ``entries``, ``refusals``) is written atomically under an exclusive
    ``flock``, so concurrent client processes of the same site (two jobs) compose correctly.

    Args:
        path: the ledger file (created on first write).
        site: the site's name (checked against the file's).
        accountant: ``"rdp"`` or ``"prv"``.
    """

    def __init__(self, path: str | Path, site: str, accountant: str = "rdp") -> None:
        self.path = Path(path)
        self.site = site
        self.accountant = accountant

    # ---- file access
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _read(self) -> _LedgerData:
        if not self.path.exists():
            return _LedgerData(site=self.site)
        raw = json.loads(self.path.read_text())
        if raw.get("format") != LEDGER_FORMAT:
            raise ValueError(f"{self.path}: not a synthbrain privacy ledger")
        if raw.get("site") != self.site:
            raise ValueError(f"{self.path}: ledger of site {raw.get('site')!r}, not {self.site!r}")
        return _LedgerData(
            site=raw["site"],
            entries=[LedgerEntry(**e) for e in raw.get("entries", [])],
            refusals=list(raw.get("refusals", [])),
        )

    def _write(self, data: _LedgerData) -> None:
        payload = {
            "format": LEDGER_FORMAT,
            "site": data.site,
            "accountant": self.accountant,
            "entries": [asdict(e) for e in data.entries],
            "refusals": data.refusals,
        }
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w") as fh:
            json.dump(payload, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)

    # ---- queries
    def entries(self) -> list[LedgerEntry]:
        """All recorded releases, oldest first."""
        return self._read().entries

    def refusals(self) -> list[dict[str, Any]]:
        return self._read().refusals

    def history(self, session: str | None = None) -> list[tuple[float, float, int]]:
        """Accountant history (σ, q, steps) of all entries, or of one session's (one job run)."""
        return [e.triple() for e in self.entries() if session is None or e.session == session]

    def epsilon(self, delta: float, session: str | None = None) -> float:
        """ε spent at ``delta``: everything the site released (or one session's part)."""
        return epsilon_from_history(self.history(session), delta, self.accountant)

    def epsilon_if(self, planned: History, delta: float) -> float:
        """ε the site would have spent after the ``planned`` (σ, q, steps) releases too."""
        return epsilon_from_history([*self.history(), *planned], delta, self.accountant)

    # ---- updates
    def record(self, entry: LedgerEntry) -> bool:
        """Append ``entry`` unless ``(session, job, round)`` is already recorded; True if appended."""
        if not entry.time:
            entry.time = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        with self._locked():
            data = self._read()
            if any(
                (e.session, e.job, e.round) == (entry.session, entry.job, entry.round) for e in data.entries
            ):
                return False
            data.entries.append(entry)
            self._write(data)
        return True

    def record_refusal(self, job_id: str, job: str, round_num: int, reason: str) -> None:
        """Log a refused round (no data was used, nothing spent)."""
        with self._locked():
            data = self._read()
            data.refusals.append(
                {"job_id": job_id, "job": job, "round": int(round_num), "reason": reason,
                 "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
            )  # fmt: skip
            self._write(data)

    def check(self, planned: History, delta: float, budget: float | None) -> float:
        """ε after ``planned``; raises :class:`PrivacyBudgetExceeded` if that exceeds ``budget``."""
        after = self.epsilon_if(planned, delta)
        if budget is not None and not after <= budget + 1e-9:
            spent = self.epsilon(delta)
            raise PrivacyBudgetExceeded(
                f"site {self.site}: privacy budget exceeded -- this task would bring the site's total ε to "
                f"{after:.3f} (δ = {delta:g}) but its budget is ε = {budget:g}; already spent ε = "
                f"{spent:.3f} over {len(self.entries())} releases (ledger {self.path}). The site does not "
                "train: raise the budget only in the site's own YAML (privacy.epsilon_budget)."
            )
        return after

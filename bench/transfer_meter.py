"""An NVFlare filter that measures what crosses a site's boundary, for the scale and large-model benches.

Added to every client of a job as an input filter (``direction="down"``: the task data the site received
from the server) and an output filter (``direction="up"``: the result it sends back); optionally to the
server as an output filter (``"send"``: the task data just before it goes to a site) and an input filter
(``"recv"``: a site's result just after it arrived). Each pass appends one JSON line to
``<out_dir>/<participant>.jsonl``: the wall-clock time, the round, the peer, the number of arrays and their
bytes (``nbytes`` of every array in the DXO, i.e. the model payload NVFlare streams), and the DXO's kind.
``send`` → ``down`` and ``up`` → ``recv`` thus time one transfer each way, serialisation included.

The module is imported by name (``transfer_meter``) inside NVFlare's client processes: the job export copies
it into the job's ``custom/`` folder, so ``bench/`` need not be installed.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

from nvflare.apis.dxo import from_shareable
from nvflare.apis.filter import Filter
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.app_constant import AppConstants

__all__ = ["TransferMeter", "download_log_stats", "payload_bytes", "read_records"]


def payload_bytes(data: dict[str, Any] | None) -> tuple[int, int]:
    """``(number of arrays, total bytes)`` of a DXO's data dict (numpy arrays or torch tensors)."""
    n, total = 0, 0
    for v in (data or {}).values():
        nb = getattr(v, "nbytes", None)
        if nb is None and hasattr(v, "element_size"):  # torch.Tensor
            nb = v.element_size() * v.numel()
        if nb is not None:
            n += 1
            total += int(nb)
    return n, total


class TransferMeter(Filter):
    """Record the payload bytes and the time of every task (``down``) or result (``up``) at a site.

    Args:
        out_dir: folder of the per-site JSON-lines files (absolute; the clients run elsewhere).
        direction: client side ``"down"`` (input filter) or ``"up"`` (output filter); server side ``"send"``
            (output filter) or ``"recv"`` (input filter).
    """

    DIRECTIONS = ("down", "up", "send", "recv")

    def __init__(self, out_dir: str, direction: str) -> None:
        super().__init__()
        if direction not in self.DIRECTIONS:
            raise ValueError(f"direction must be one of {self.DIRECTIONS}, got {direction!r}")
        self.out_dir = out_dir
        self.direction = direction

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        site = fl_ctx.get_identity_name() or "unknown"
        rnd = shareable.get_header(AppConstants.CURRENT_ROUND)
        peer_ctx = fl_ctx.get_peer_context()
        peer = peer_ctx.get_identity_name() if peer_ctx is not None else None
        rec: dict[str, Any] = {"t": time.time(), "site": site, "peer": peer, "direction": self.direction}
        try:
            dxo = from_shareable(shareable)
        except Exception as exc:  # an error reply carries no DXO
            rec.update(arrays=0, bytes=0, data_kind=None, error=type(exc).__name__)
        else:
            n, b = payload_bytes(dxo.data)
            rec.update(arrays=n, bytes=b, data_kind=dxo.data_kind)
            if rnd is None:
                rnd = dxo.get_meta_prop(AppConstants.CURRENT_ROUND)
        rec["round"] = None if rnd is None else int(rnd)
        d = Path(self.out_dir)
        d.mkdir(parents=True, exist_ok=True)
        with open(d / f"{site}.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")
        return shareable


def read_records(out_dir: str | Path) -> list[dict[str, Any]]:
    """Every record the meters of one job wrote (all sites, file order within a site)."""
    recs: list[dict[str, Any]] = []
    for p in sorted(Path(out_dir).glob("*.jsonl")):
        recs.extend(json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip())
    return recs


_CLIENT_DONE = re.compile(r"\[client\] download ref=\S+ done: elapsed=([\d.]+)s size=.*?\(([\d,]+) bytes\)")
_SERVER_DONE = re.compile(
    r"\[server\] download tx \S+ done: status=finished elapsed=([\d.]+)s .*?\(([\d,]+) bytes\)"
)


def download_log_stats(server_logs: list[Path]) -> dict[str, list[dict[str, float]]]:
    """What NVFlare itself logged for each streamed transfer to or from the server: seconds and wire bytes.

    NVFlare 2.9 sends arrays out of band: the task or result message carries references (tens of KB) and the
    receiver pulls the arrays from the sender's download service in chunks (``np_download_chunk_size``,
    2 MiB by default). The server's job log records each transfer once, whichever process at the site took
    part (the client job, or the trainer process that the client job passes the references through to):
    ``[server] download tx ... done: status=finished elapsed=...s ... (N bytes)`` when a site finished pulling
    a task (server → site), ``[client] download ref=... done: elapsed=...s ... (N bytes)`` when the server
    finished pulling a site's result (site → server). Returns ``{"server_to_site": [...], "site_to_server":
    [...]}``, each entry ``{"seconds", "bytes"}``.
    """
    out: dict[str, list[dict[str, float]]] = {"server_to_site": [], "site_to_server": []}
    for log in server_logs:
        text = Path(log).read_text(encoding="utf-8", errors="replace")
        for key, pat in (("server_to_site", _SERVER_DONE), ("site_to_server", _CLIENT_DONE)):
            for m in pat.finditer(text):
                out[key].append({"seconds": float(m.group(1)), "bytes": float(m.group(2).replace(",", ""))})
    return out

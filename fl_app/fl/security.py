"""Provisioned deployments: startup kits with mutual TLS, checking them, and starting kits by PID.

* :func:`provision` runs NVFlare's provisioner (``nvflare provision``) on a project file such as
  ``site_configs/project.yml`` and returns the folder of startup kits (``<workspace>/<project>/prod_NN``).
* :func:`check_kits` reads every kit back and verifies what a deployment relies on: the connection
  security of the server, sites and admins is ``mtls``; each participant's certificate is issued by the
  project's root CA (the one in its own kit) and names the participant (CN) and its org (O); the server's
  certificate is valid for the host the sites connect to; the authorisation policy is present; sites do
  not stream their job logs to the server (``allow_log_streaming: false``: logs stay at the site).
* :func:`localize_project` writes a copy of a project file whose server listens on loopback at given
  ports (for tests and for trying a deployment on one machine).
* :func:`set_server_storage` moves the server's job store and snapshots out of NVFlare's default
  ``/tmp/nvflare`` (shared by every server on the machine, and wiped on reboot) into a folder of its own.
* :class:`KitProcesses` starts participants from their startup kits (``startup/sub_start.sh --once``,
  NVFlare's own entry point, each in its own process group), records their PIDs, and stops exactly
  those process groups.
* :func:`probe_server_tls` opens one TLS connection to the server's port with a given trust anchor and
  (optionally) client certificate, and reports whether the server answered.
* :func:`registered_clients` asks the server, through an admin's Flare API session, which sites are
  connected.

NVFlare stays here and in the rest of ``fl_app.fl``; nothing in the training code depends on it.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fl_app.fl.poc import alive_group, end_groups, launch_kit

log = logging.getLogger(__name__)

__all__ = [
    "KitCheck",
    "KitProcesses",
    "admins_by_role",
    "check_kits",
    "kit_dirs",
    "kit_roots",
    "localize_project",
    "probe_server_tls",
    "provision",
    "registered_clients",
    "server_name",
    "set_server_storage",
]

_KIT_CONFIG = {"server": "fed_server.json", "client": "fed_client.json", "admin": "fed_admin.json"}
_KIT_CERT = {"server": "server.crt", "client": "client.crt", "admin": "client.crt"}


def _load_project(project: str | Path) -> dict[str, Any]:
    data = yaml.safe_load(Path(project).read_text())
    if not isinstance(data, dict) or "participants" not in data:
        raise ValueError(f"{project}: not an NVFlare project file (no participants)")
    return data


def server_name(project: str | Path | dict[str, Any]) -> str:
    """The server participant's name in a project file (or its parsed dict)."""
    data = project if isinstance(project, dict) else _load_project(project)
    servers = [p["name"] for p in data["participants"] if p.get("type") == "server"]
    if len(servers) != 1:
        raise ValueError(f"expected one server participant, found {servers}")
    return servers[0]


def admins_by_role(project: str | Path | dict[str, Any]) -> dict[str, list[str]]:
    """``{role: [admin names]}`` of a project file (or its parsed dict)."""
    data = project if isinstance(project, dict) else _load_project(project)
    roles: dict[str, list[str]] = {}
    for p in data["participants"]:
        if p.get("type") == "admin":
            roles.setdefault(p.get("role", ""), []).append(p["name"])
    return roles


def localize_project(
    project: str | Path, out: str | Path, fed_learn_port: int, admin_port: int, host: str = "localhost"
) -> Path:
    """Write a copy of ``project`` whose server is reached at ``host`` on the given ports.

    Only the server's ``default_host`` and ports change: names, orgs, roles, builders and the connection
    security stay those of the original, so the kits differ from a real deployment's only in the address.
    """
    data = _load_project(project)
    for p in data["participants"]:
        if p.get("type") == "server":
            p["default_host"] = host
            p["fed_learn_port"] = int(fed_learn_port)
            p["admin_port"] = int(admin_port)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return out


def provision(project: str | Path, workspace: str | Path, timeout: float = 300.0) -> Path:
    """Run ``nvflare provision`` on ``project`` into ``workspace``; returns the new ``prod_NN`` folder.

    Raises:
        RuntimeError: the provisioner failed (its output is in the message).
    """
    project = Path(project).resolve()
    workspace = Path(workspace).resolve()
    workspace.mkdir(parents=True, exist_ok=True)
    name = _load_project(project)["name"]
    before = set(kit_roots(workspace, name))
    cmd = [
        sys.executable,
        "-m",
        "nvflare.cli",
        "provision",
        "-p",
        str(project),
        "-w",
        str(workspace),
        "--force",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=timeout)
    new = [p for p in kit_roots(workspace, name) if p not in before]
    if res.returncode != 0 or not new:
        raise RuntimeError(
            f"nvflare provision failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
        )
    return new[-1]


def kit_roots(workspace: str | Path, project_name: str) -> list[Path]:
    """The ``prod_NN`` folders of a provisioning workspace, oldest first."""
    base = Path(workspace) / project_name
    return sorted((p for p in base.glob("prod_*") if p.is_dir()), key=lambda p: int(p.name.split("_")[-1]))


def kit_dirs(prod: str | Path) -> dict[str, tuple[str, Path]]:
    """``{participant: (type, kit folder)}`` of a ``prod_NN`` folder (type: server, client, admin)."""
    kits: dict[str, tuple[str, Path]] = {}
    for d in sorted(Path(prod).iterdir()):
        for kind, cfg in _KIT_CONFIG.items():
            if (d / "startup" / cfg).exists():
                kits[d.name] = (kind, d)
    return kits


@dataclass
class KitCheck:
    """What :func:`check_kits` found in one startup kit."""

    name: str
    kind: str
    connection_security: str
    subject_cn: str
    subject_org: str
    issuer_cn: str
    signed_by_root: bool
    server_hosts: list[str] = field(default_factory=list)
    has_authorization_policy: bool = False
    log_streaming: bool | None = None
    problems: list[str] = field(default_factory=list)


def _cert_names(cert: Any) -> tuple[str, str, str]:
    from cryptography.x509.oid import NameOID

    def one(name: Any, oid: Any) -> str:
        attrs = name.get_attributes_for_oid(oid)
        return str(attrs[0].value) if attrs else ""

    return (
        one(cert.subject, NameOID.COMMON_NAME),
        one(cert.subject, NameOID.ORGANIZATION_NAME),
        one(cert.issuer, NameOID.COMMON_NAME),
    )


def _signed_by(cert: Any, root: Any) -> bool:
    try:
        cert.verify_directly_issued_by(root)
    except Exception:
        return False
    return True


def _conn_security(kind: str, cfg: dict[str, Any]) -> str:
    if kind == "server":
        return str(cfg["servers"][0].get("connection_security", ""))
    if kind == "client":
        return str(cfg["client"].get("connection_security", ""))
    return str(cfg["admin"].get("connection_security", ""))


def check_kits(project: str | Path, prod: str | Path) -> list[KitCheck]:
    """Verify the startup kits in ``prod`` against ``project``; see the module docstring.

    Every participant of the project must have a kit. Each :class:`KitCheck` lists its ``problems``
    (empty when the kit is sound).
    """
    from cryptography import x509

    data = _load_project(project)
    kits = kit_dirs(prod)
    server = server_name(data)
    server_host = next(p.get("default_host", server) for p in data["participants"] if p["name"] == server)
    checks: list[KitCheck] = []
    for p in data["participants"]:
        name, kind = p["name"], p["type"]
        if name not in kits:
            checks.append(KitCheck(name, kind, "", "", "", "", False, problems=["no startup kit"]))
            continue
        kdir = kits[name][1]
        startup = kdir / "startup"
        cfg = json.loads((startup / _KIT_CONFIG[kind]).read_text())
        cert = x509.load_pem_x509_certificate((startup / _KIT_CERT[kind]).read_bytes())
        root = x509.load_pem_x509_certificate((startup / "rootCA.pem").read_bytes())
        cn, org, issuer = _cert_names(cert)
        chk = KitCheck(
            name=name,
            kind=kind,
            connection_security=_conn_security(kind, cfg),
            subject_cn=cn,
            subject_org=org,
            issuer_cn=issuer,
            signed_by_root=_signed_by(cert, root),
        )
        if chk.connection_security != "mtls":
            chk.problems.append(f"connection_security is {chk.connection_security!r}, not 'mtls'")
        if not chk.signed_by_root:
            chk.problems.append("certificate not issued by the kit's root CA")
        if cn != name:
            chk.problems.append(f"certificate CN {cn!r} is not the participant name")
        if org != p.get("org"):
            chk.problems.append(f"certificate O {org!r} is not the participant's org {p.get('org')!r}")
        if kind == "server":
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            chk.server_hosts = [str(h) for h in san.get_values_for_type(x509.DNSName)]
            if server_host not in chk.server_hosts:
                chk.problems.append(f"server certificate not valid for {server_host!r}: {chk.server_hosts}")
        if kind in ("server", "client"):
            local = kdir / "local"
            chk.has_authorization_policy = any(
                (local / f).exists() for f in ("authorization.json", "authorization.json.default")
            )
            if not chk.has_authorization_policy:
                chk.problems.append("no local/authorization.json[.default]")
        if kind == "client":
            res = json.loads((kdir / "local" / "resources.json.default").read_text())
            chk.log_streaming = bool(res.get("allow_log_streaming", True))
            if chk.log_streaming:
                chk.problems.append(
                    "allow_log_streaming is on: the site's job logs would be sent to the server"
                )
        checks.append(chk)
    return checks


def set_server_storage(server_kit: str | Path, storage_root: str | Path) -> Path:
    """Write the server kit's ``local/resources.json`` with its job store and snapshots under ``storage_root``.

    Provisioning's ``resources.json.default`` keeps both in ``/tmp/nvflare/`` (shared by every server on
    the machine, lost on reboot, and the snapshots are what a restarted server resumes from). NVFlare reads
    ``local/resources.json`` in preference to the ``.default``; everything else is kept as provisioned.
    Returns the file written.
    """
    local = Path(server_kit) / "local"
    root = Path(storage_root).resolve()
    data = json.loads((local / "resources.json.default").read_text())
    snap = data["snapshot_persistor"]["args"]["storage"]["args"]
    snap["root_dir"] = str(root / "snapshot-storage")
    managers = [c for c in data["components"] if c.get("id") == "job_manager"]
    if len(managers) != 1:
        raise ValueError(f"{local / 'resources.json.default'}: expected one job_manager component")
    managers[0]["args"]["uri_root"] = str(root / "jobs-storage")
    root.mkdir(parents=True, exist_ok=True)
    out = local / "resources.json"
    out.write_text(json.dumps(data, indent=4))
    return out


class KitProcesses:
    """Participants started from their startup kits, each in its own process group, stopped by PID.

    Use as a context manager (``with KitProcesses(logs) as procs: procs.start(kit)``) so that every
    process group started is ended on the way out, also on failure.
    """

    def __init__(self, log_dir: str | Path, env: dict[str, str] | None = None) -> None:
        self.log_dir = Path(log_dir)
        self.env = env or {}
        self.pids: dict[str, int] = {}

    def start(self, kit: str | Path, label: str | None = None, env: dict[str, str] | None = None) -> int:
        """Start ``kit/startup/sub_start.sh --once`` (NVFlare's entry point); returns its PID.

        ``label`` names the log file (``<log_dir>/<label>.log``, default: the kit folder's name);
        ``env`` adds to the environment (e.g. ``SYNTHBRAIN_SITE_CONFIG``).
        """
        kit = Path(kit).resolve()
        label = label or kit.name
        penv = dict(os.environ)
        penv["PATH"] = str(Path(sys.executable).parent) + os.pathsep + penv.get("PATH", "")
        penv.update(self.env)
        penv.update(env or {})
        pid = launch_kit(kit, penv, self.log_dir / f"{label}.log")
        self.pids[label] = pid
        log.info("started %s from %s (pid %d)", label, kit, pid)
        return pid

    def log_text(self, label: str) -> str:
        """What the participant ``label`` has logged so far (its stdout/stderr)."""
        p = self.log_dir / f"{label}.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def alive(self, label: str) -> bool:
        """Whether the process group started as ``label`` still has a live process."""
        return label in self.pids and alive_group(self.pids[label])

    def stop(self, label: str, grace: float = 15.0) -> bool:
        """End the process group started as ``label`` and its job processes (SIGTERM, then SIGKILL after
        ``grace`` seconds); True if it was running."""
        pid = self.pids.get(label)
        if pid is None or not end_groups([pid], grace):
            return False
        log.info("stopped %s (pid %d)", label, pid)
        return True

    def stop_all(self) -> list[int]:
        """End every process group started here, clients before the server; returns their PIDs."""
        ended = []
        for label in reversed(list(self.pids)):
            if self.stop(label):
                ended.append(self.pids[label])
        return ended

    def __enter__(self) -> KitProcesses:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


def registered_clients(admin_kit: str | Path, username: str | None = None, timeout: float = 10.0) -> set[str]:
    """The sites the server currently lists as connected, asked through an admin's Flare API session."""
    from nvflare.fuel.flare_api.flare_api import new_secure_session

    admin_kit = Path(admin_kit)
    sess = new_secure_session(username or admin_kit.name, str(admin_kit), timeout=timeout)
    try:
        return {c.name for c in sess.get_system_info().client_info}
    finally:
        sess.close()


def probe_server_tls(
    host: str,
    port: int,
    root_ca: str | Path,
    cert: str | Path | None = None,
    key: str | Path | None = None,
    timeout: float = 10.0,
) -> tuple[bool, str]:
    """One TLS connection to the server's ``fed_learn_port``: does the server answer an HTTP request?

    The probe trusts ``root_ca`` for the server's certificate and presents ``cert``/``key`` (or no
    certificate). Returns ``(answered, detail)``: ``answered`` is True when the server sent back an HTTP
    reply (it accepted this client certificate), False when the handshake failed or the server closed the
    connection without answering (it refused the certificate, or ours refused the server's); ``detail``
    is the reply's status line or the error.
    """
    import socket
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False  # NVFlare checks the server's identity itself; the CA check stays on
    ctx.load_verify_locations(str(root_ca))
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key) if key is not None else None)
    try:
        with socket.create_connection((host, int(port)), timeout=timeout) as raw:
            with ctx.wrap_socket(raw, server_hostname=host) as tls:
                tls.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
                reply = tls.recv(256)
    except (OSError, ssl.SSLError) as exc:
        return False, f"{type(exc).__name__}: {exc}"
    if reply.startswith(b"HTTP/"):
        return True, reply.split(b"\r\n", 1)[0].decode(errors="replace")
    return False, "connection closed by the server without a reply" if not reply else repr(reply[:80])

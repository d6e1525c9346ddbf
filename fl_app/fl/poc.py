"""Proof-of-concept deployment on one machine: prepare, start, submit, wait, stop (every process by PID).

The POC workspace lives inside the project's ignored ``workspaces/`` folder (or wherever ``workspace``
points), never in ``~/.nvflare``. :func:`prepare` writes a POC ``project.yml`` (server on ``localhost``
at a free port, one client per site, the admin roles of ``site_configs/project.yml``) and runs
``nvflare poc prepare -i`` on it. :func:`start` launches the server and every client from their own
startup kits (``startup/sub_start.sh --once``, i.e. the real NVFlare entry points, each in its own
process group) and records their PIDs in ``<workspace>/synthbrain_pids.json``; :func:`stop` ends those
process groups (SIGTERM, then SIGKILL) and nothing else. Jobs go in through the admin's startup kit and
the Flare API session (:class:`nvflare.recipe.prod_env.ProdEnv`).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)

PROJECT_NAME = "synthbrain_poc"
ADMIN = "admin@nvidia.com"
PID_FILE = "synthbrain_pids.json"

__all__ = ["admin_kit", "free_port", "is_running", "prepare", "start", "stop", "wait_ready"]


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _project_yml(clients: list[str], port: int) -> dict[str, Any]:
    return {
        "api_version": 3,
        "name": PROJECT_NAME,
        "description": "synthbrain POC: server, sites and admins on this machine",
        "participants": [
            {"name": "server", "type": "server", "org": "synthbrain", "default_host": "localhost",
             "fed_learn_port": port, "admin_port": port},
            {"name": ADMIN, "type": "admin", "org": "synthbrain", "role": "project_admin"},
            *({"name": c, "type": "client", "org": "synthbrain"} for c in clients),
        ],
        "builders": [
            {"path": "nvflare.lighter.impl.workspace.WorkspaceBuilder",
             "args": {"template_file": ["master_template.yml"]}},
            {"path": "nvflare.lighter.impl.static_file.StaticFileBuilder", "args": {"config_folder": "config"}},
            {"path": "nvflare.lighter.impl.cert.CertBuilder"},
            {"path": "nvflare.lighter.impl.signature.SignatureBuilder"},
        ],
    }  # fmt: skip


def _env(workspace: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["NVFLARE_POC_WORKSPACE"] = str(workspace)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")  # python3 of this venv in sub_start.sh
    return env


def prod_dir(workspace: str | Path) -> Path:
    return Path(workspace) / PROJECT_NAME / "prod_00"


def admin_kit(workspace: str | Path) -> Path:
    """The POC admin's startup kit (for :class:`~nvflare.recipe.prod_env.ProdEnv`)."""
    return prod_dir(workspace) / ADMIN


def prepare(workspace: str | Path, clients: list[str], port: int | None = None) -> Path:
    """Provision a POC (server + ``clients`` + admin) in ``workspace``; returns the prod folder."""
    workspace = Path(workspace).resolve()
    if is_running(workspace):
        raise RuntimeError(f"a POC started from {workspace} is still running: stop it first")
    workspace.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    proj = workspace.parent / f"{workspace.name}_project.yml"
    proj.write_text(yaml.safe_dump(_project_yml(list(clients), port), sort_keys=False))
    cmd = [sys.executable, "-m", "nvflare.cli", "poc", "prepare", "-i", str(proj), "--force"]
    res = subprocess.run(
        cmd, env=_env(workspace), capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300
    )
    if res.returncode != 0 or not admin_kit(workspace).exists():
        raise RuntimeError(
            f"nvflare poc prepare failed ({res.returncode}):\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}"
        )
    (workspace / "synthbrain_port").write_text(str(port))
    return prod_dir(workspace)


def _pids(workspace: Path) -> dict[str, int]:
    f = workspace / PID_FILE
    return json.loads(f.read_text()) if f.exists() else {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_running(workspace: str | Path) -> bool:
    """True while any process :func:`start` launched from ``workspace`` is alive."""
    return any(_alive(p) for p in _pids(Path(workspace)).values())


def start(
    workspace: str | Path, clients: list[str], site_env: dict[str, dict[str, str]] | None = None
) -> dict[str, int]:
    """Start the server, then each client, from their startup kits; returns ``{name: pid}``.

    Args:
        workspace: the prepared POC workspace.
        clients: client names to start.
        site_env: extra environment per client (e.g. ``SYNTHBRAIN_SITE_CONFIG``), as hospital IT sets it.
    """
    workspace = Path(workspace).resolve()
    prod = prod_dir(workspace)
    pids: dict[str, int] = _pids(workspace)
    logs = workspace / "logs"
    logs.mkdir(exist_ok=True)
    for name in ["server", *clients]:
        if name in pids and _alive(pids[name]):
            continue
        kit = prod / name
        env = _env(workspace)
        env.update((site_env or {}).get(name, {}))
        with open(logs / f"{name}.log", "ab") as out:
            proc = subprocess.Popen(
                ["bash", str(kit / "startup" / "sub_start.sh"), "--once"],
                cwd=kit,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # own process group: stop() ends it and its job processes
            )
        pids[name] = proc.pid
        (workspace / PID_FILE).write_text(json.dumps(pids))
        log.info("started %s (pid %d)", name, proc.pid)
        if name == "server":
            time.sleep(3)
    return pids


def wait_ready(workspace: str | Path, clients: list[str], timeout: float = 120.0) -> None:
    """Wait until the admin can log in and every client is registered with the server."""
    from nvflare.fuel.flare_api.flare_api import new_secure_session

    deadline = time.time() + timeout
    last = ""
    while time.time() < deadline:
        if not is_running(workspace):
            raise RuntimeError(f"POC processes exited; see {Path(workspace) / 'logs'}")
        try:
            sess = new_secure_session(ADMIN, str(admin_kit(workspace)), timeout=10)
            try:
                info = sess.get_system_info()
                names = {c.name for c in info.client_info}
                if set(clients) <= names:
                    return
                last = f"clients registered: {sorted(names)}"
            finally:
                sess.close()
        except Exception as exc:
            last = str(exc)
        time.sleep(2)
    raise TimeoutError(f"POC not ready after {timeout:.0f} s ({last})")


def stop(workspace: str | Path, grace: float = 15.0) -> list[int]:
    """End every process group :func:`start` launched (SIGTERM, then SIGKILL); returns the PIDs ended."""
    workspace = Path(workspace).resolve()
    pids = _pids(workspace)
    ended = []
    for name, pid in reversed(list(pids.items())):
        if not _alive(pid):
            continue
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
        ended.append(pid)
        log.info("stopping %s (pid %d)", name, pid)
    deadline = time.time() + grace
    for pid in ended:
        while _alive_group(pid) and time.time() < deadline:
            time.sleep(0.3)
        if _alive_group(pid):
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for pid in ended:  # reap our own children
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
    (workspace / PID_FILE).unlink(missing_ok=True)
    return ended


def _alive_group(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie leader of our own counts as ended
        os.waitpid(pgid, os.WNOHANG)
    except ChildProcessError:
        pass
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True

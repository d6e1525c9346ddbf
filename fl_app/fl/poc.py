"""Proof-of-concept deployment on one machine: prepare, start, submit, wait, stop (every process by PID).

The POC workspace lives inside the project's ignored ``workspaces/`` folder (or wherever ``workspace``
points), never in ``~/.nvflare``. :func:`prepare` writes the POC project definition ``poc/project.yml`` with
the server's port (a free one on ``localhost``) and one client per site, and runs ``nvflare poc prepare -i`` on it. :func:`start` launches the server and every client from their own
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

POC_PROJECT = Path("poc/project.yml")
"""The POC project definition (relative to the synthbrain folder, as ``site_configs/project.yml``)."""
PROJECT_NAME = "synthbrain_poc"
ADMIN = "admin@nvidia.com"
PID_FILE = "synthbrain_pids.json"
CLIENT_OUTCOME_WAIT_S = 30
"""How long the POC server waits, after a job ends, for the outcome report of a site that dropped out
(NVFlare's ``client_outcome_wait_timeout``, 900 s by default) before it finalises the job."""

__all__ = [
    "admin_kit",
    "alive_group",
    "descendants",
    "end_groups",
    "free_port",
    "is_running",
    "launch_kit",
    "pids",
    "prepare",
    "start",
    "start_server",
    "start_site",
    "stop",
    "stop_server",
    "stop_site",
    "wait_ready",
]


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _project_yml(project: str | Path, clients: list[str], port: int) -> dict[str, Any]:
    """The POC project definition ``project`` with the server's ``port`` and a client per site."""
    proj = yaml.safe_load(Path(project).read_text())
    server = next(p for p in proj["participants"] if p["type"] == "server")
    server["fed_learn_port"] = server["admin_port"] = port
    proj["participants"] += [{"name": c, "type": "client", "org": server["org"]} for c in clients]
    return proj


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


def prepare(
    workspace: str | Path, clients: list[str], port: int | None = None, project: str | Path = POC_PROJECT
) -> Path:
    """Provision a POC (server + ``clients`` + admin of ``project``) in ``workspace``; returns the prod folder."""
    workspace = Path(workspace).resolve()
    if is_running(workspace):
        raise RuntimeError(f"a POC started from {workspace} is still running: stop it first")
    workspace.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    proj = workspace.parent / f"{workspace.name}_project.yml"
    proj.write_text(yaml.safe_dump(_project_yml(project, list(clients), port), sort_keys=False))
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


def pids(workspace: str | Path) -> dict[str, int]:
    """``{participant: process-group id}`` of what :func:`start` / :func:`start_site` launched and is recorded."""
    return dict(_pids(Path(workspace).resolve()))


def _launch(workspace: Path, name: str, extra_env: dict[str, str] | None) -> int:
    """Start one participant from its startup kit in its own process group; record its PID."""
    kit = prod_dir(workspace) / name
    if not kit.is_dir():
        raise FileNotFoundError(f"no startup kit for {name!r} in {prod_dir(workspace)}")
    env = _env(workspace)
    if name == "server":
        env.setdefault("NVFLARE_CLIENT_OUTCOME_WAIT_TIMEOUT", str(CLIENT_OUTCOME_WAIT_S))
    env.update(extra_env or {})
    pid = launch_kit(kit, env, workspace / "logs" / f"{name}.log")
    recorded = _pids(workspace)
    recorded[name] = pid
    (workspace / PID_FILE).write_text(json.dumps(recorded))
    log.info("started %s (pid %d)", name, pid)
    return pid


def launch_kit(kit: Path, env: dict[str, str], log_path: Path) -> int:
    """Start a participant from its startup kit (``startup/sub_start.sh --once``, NVFlare's entry point) in
    a process group of its own, output appended to ``log_path``; returns its PID (= the group's id)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(
            ["bash", str(kit / "startup" / "sub_start.sh"), "--once"],
            cwd=kit,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # own process group: end_groups() ends it and its job processes
        )
    return proc.pid


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
    for name in ["server", *clients]:
        running = _pids(workspace)
        if name in running and _alive(running[name]):
            continue
        _launch(workspace, name, (site_env or {}).get(name))
        if name == "server":
            time.sleep(3)
    return _pids(workspace)


def start_site(workspace: str | Path, name: str, env: dict[str, str] | None = None) -> int:
    """(Re)start one site's client from its startup kit, as its hospital IT would; returns its PID.

    Args:
        workspace: the prepared POC workspace.
        name: the site (client) name.
        env: its extra environment (e.g. ``{"SYNTHBRAIN_SITE_CONFIG": ...}``).
    """
    workspace = Path(workspace).resolve()
    running = _pids(workspace)
    if name in running and alive_group(running[name]):
        raise RuntimeError(f"{name} is still running (pid {running[name]}): stop it first")
    return _launch(workspace, name, env)


def start_server(workspace: str | Path) -> int:
    """(Re)start the POC server from its startup kit; returns its PID (clients reconnect by themselves)."""
    return start_site(workspace, "server")


def descendants(pid: int) -> list[int]:
    """PIDs of every live descendant of ``pid`` (NVFlare starts job processes in sessions of their own,
    outside the participant's process group, so they are found through the process tree)."""
    out: list[int] = []
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return out
    for k in kids:
        out.append(int(k))
        out.extend(descendants(int(k)))
    return out


def end_groups(pids: list[int], grace: float, sig: int = signal.SIGTERM) -> list[int]:
    """Signal the process groups ``pids`` (and their job processes, by PID), wait, SIGKILL what is left
    after ``grace`` seconds, reap our own children; returns the groups that were alive."""
    alive = [p for p in pids if alive_group(p)]
    tree = {p: descendants(p) for p in alive}  # before the parents die and the children are re-parented
    for p in alive:
        for q in (p, *tree[p]):
            try:
                os.killpg(q, sig) if q == p else os.kill(q, sig)
            except (ProcessLookupError, PermissionError):
                pass
    deadline = time.time() + grace
    for p in alive:
        while (alive_group(p) or any(_alive(q) for q in tree[p])) and time.time() < deadline:
            time.sleep(0.3)
        for q in (p, *tree[p]):
            try:
                os.killpg(q, signal.SIGKILL) if q == p else os.kill(q, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        end = time.time() + 10
        while alive_group(p) and time.time() < end:
            time.sleep(0.2)
    for p in alive:
        try:
            os.waitpid(p, os.WNOHANG)
        except ChildProcessError:
            pass
    return alive


def stop_site(workspace: str | Path, name: str, *, kill: bool = False, grace: float = 15.0) -> int | None:
    """End one participant's process group (its client or server and the job processes it started).

    Args:
        workspace: the POC workspace.
        name: ``"server"`` or a site name.
        kill: SIGKILL at once (a crash: no clean shutdown, nothing told to the server) instead of SIGTERM.
        grace: seconds between SIGTERM and SIGKILL.

    Returns:
        the PID ended, or None if it was not running.
    """
    workspace = Path(workspace).resolve()
    recorded = _pids(workspace)
    pid = recorded.pop(name, None)
    ended = None
    if pid is not None and alive_group(pid):
        log.info("stopping %s (pid %d)%s", name, pid, " with SIGKILL" if kill else "")
        end_groups([pid], grace, signal.SIGKILL if kill else signal.SIGTERM)
        ended = pid
    (workspace / PID_FILE).write_text(json.dumps(recorded))
    return ended


def stop_server(workspace: str | Path, *, kill: bool = False) -> int | None:
    """End the POC server's process group (see :func:`stop_site`); the clients keep running."""
    return stop_site(workspace, "server", kill=kill)


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
    """End every process group :func:`start` launched, and the job processes they started (SIGTERM, then
    SIGKILL); returns the PIDs of the groups ended."""
    workspace = Path(workspace).resolve()
    recorded = _pids(workspace)
    for name, pid in recorded.items():
        log.info("stopping %s (pid %d)", name, pid)
    ended = end_groups(list(reversed(list(recorded.values()))), grace)
    (workspace / PID_FILE).unlink(missing_ok=True)
    return ended


def alive_group(pgid: int) -> bool:
    """Whether the process group ``pgid`` still has a live process (a zombie leader of ours is reaped)."""
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

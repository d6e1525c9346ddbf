"""Provisioned deployment security: mTLS startup kits, a client with another provisioning's kit is refused,
and the roles of the authorisation policy decide who may submit and abort jobs.

Everything runs on loopback from real NVFlare startup kits provisioned from ``site_configs/project.yml``
(host rewritten to ``localhost`` and free ports in a temporary copy): the server and sites are started with
their kits' own ``startup/sub_start.sh`` in their own process groups, admins connect through the Flare API
with their own kits, and every process group started is stopped by PID (also on failure).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from fl_app.fl import security
from fl_app.fl.poc import free_port

PROJECT = Path(__file__).resolve().parents[1] / "site_configs" / "project.yml"
ROLES = {
    "project_admin": "admin@coordinating-centre.example.org",
    "lead": "lead@coordinating-centre.example.org",
    "org_admin": "it@hospital-a.example.org",
    "member": "auditor@coordinating-centre.example.org",
}


def _localized(tmp: Path, name: str = "project.yml", **changes: object) -> tuple[Path, int]:
    fed_port, admin_port = free_port(), free_port()
    proj = security.localize_project(PROJECT, tmp / name, fed_port, admin_port)
    if changes:
        import yaml

        data = yaml.safe_load(proj.read_text())
        data.update(changes)
        proj.write_text(yaml.safe_dump(data, sort_keys=False))
    return proj, fed_port


def test_project_roles_match_the_documented_ones():
    roles = security.admins_by_role(PROJECT)
    for role, admin in ROLES.items():
        assert admin in roles[role]
    assert set(roles) == set(ROLES)


@pytest.mark.slow
def test_provisioned_kits_use_mtls_and_a_per_provisioning_ca(tmp_path):
    from cryptography import x509

    proj, _ = _localized(tmp_path)
    p1 = security.provision(proj, tmp_path / "prov1")
    p2 = security.provision(proj, tmp_path / "prov2")
    for prod in (p1, p2):
        checks = security.check_kits(proj, prod)
        assert {c.name for c in checks} == {p["name"] for p in security._load_project(proj)["participants"]}
        assert all(not c.problems for c in checks), [(c.name, c.problems) for c in checks]
        assert all(c.connection_security == "mtls" for c in checks)
        assert all(c.log_streaming is False for c in checks if c.kind == "client")
        server = next(c for c in checks if c.kind == "server")
        assert "localhost" in server.server_hosts
    # two provisionings, two root CAs: a certificate of one is not issued by the other's CA
    srv = security.server_name(proj)
    root1 = x509.load_pem_x509_certificate((p1 / srv / "startup" / "rootCA.pem").read_bytes())
    root2 = x509.load_pem_x509_certificate((p2 / srv / "startup" / "rootCA.pem").read_bytes())
    assert root1.public_key().public_numbers() != root2.public_key().public_numbers()
    foreign = x509.load_pem_x509_certificate((p2 / "hospital-a" / "startup" / "client.crt").read_bytes())
    assert not security._signed_by(foreign, root1)
    # the policy the server enforces: NVFlare's default, written into the server's kit
    policy = json.loads((p1 / srv / "local" / "authorization.json.default").read_text())["permissions"]
    assert policy["project_admin"] == "any"
    assert policy["member"] == {"view": "any"}
    assert policy["lead"]["submit_job"] == "any" and policy["lead"]["manage_job"] == "n:submitter"
    assert policy["org_admin"]["submit_job"] == "none"


@pytest.mark.slow
def test_fl_provision_command_checks_every_kit(tmp_path, capsys):
    import argparse

    from fl_app.fl.run import add_fl_parser

    parser = argparse.ArgumentParser()
    add_fl_parser(parser.add_subparsers())
    args = parser.parse_args(
        ["fl", "provision", "--project", str(PROJECT), "--workspace", str(tmp_path / "ws")]
    )
    assert args.func(args) == 0
    out = capsys.readouterr().out
    n_participants = len(security._load_project(PROJECT)["participants"])
    assert out.count(" mtls ") == n_participants and out.count(" ok\n") == n_participants, out
    assert (tmp_path / "ws" / "synthbrain" / "prod_00" / "hospital-a" / "startup" / "client.key").exists()

    # the check is not vacuous: a project provisioned with plain TLS is flagged and the command fails
    proj_tls, _ = _localized(tmp_path, "project_tls.yml", connection_security="tls")
    args = parser.parse_args(
        ["fl", "provision", "--project", str(proj_tls), "--workspace", str(tmp_path / "ws2")]
    )
    assert args.func(args) == 1
    out = capsys.readouterr().out
    assert out.count("PROBLEM: connection_security is 'tls', not 'mtls'") == n_participants, out


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    """Two provisionings of the project; server and ``hospital-a`` of the first one running."""
    from tests.test_fl_sim import make_sites

    root = tmp_path_factory.mktemp("sec")
    proj, fed_port = _localized(root)
    p1 = security.provision(proj, root / "prov1")
    p2 = security.provision(proj, root / "prov2")
    srv = security.server_name(proj)
    admin_kit = p1 / ROLES["project_admin"]
    # hospital-a trains on a tiny simulated site when a job reaches it
    prof, cfg_dir, sites = make_sites(root, n_sites=1, n_subjects=4)
    site_env = {"SYNTHBRAIN_SITE_CONFIG": str(cfg_dir / f"{sites[0]}.yaml")}
    security.set_server_storage(p1 / srv, root / "server-storage")  # not NVFlare's shared /tmp/nvflare
    procs = security.KitProcesses(root / "logs")
    try:
        procs.start(p1 / srv, "server")
        procs.start(p1 / "hospital-a", "hospital-a", env=site_env)
        _wait_for(lambda: "hospital-a" in _clients(admin_kit), 120, procs, "hospital-a to register")
        yield {"root": root, "project": proj, "p1": p1, "p2": p2, "procs": procs, "profile": prof,
               "admin_kit": admin_kit, "fed_port": fed_port}  # fmt: skip
    finally:
        pids = dict(procs.pids)
        procs.stop_all()
    assert not any(_group_alive(p) for p in pids.values()), "a process group outlived the test"


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _clients(admin_kit: Path) -> set[str]:
    try:
        return security.registered_clients(admin_kit, timeout=10)
    except Exception:
        return set()


def _wait_for(cond, timeout: float, procs: security.KitProcesses, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not procs.alive("server"):
            raise RuntimeError("server exited:\n" + procs.log_text("server")[-3000:])
        if cond():
            return
        time.sleep(2)
    raise TimeoutError(f"gave up waiting for {what} after {timeout:.0f} s")


@pytest.mark.slow
def test_client_with_another_provisionings_kit_cannot_join(deployment):
    procs, p1, p2 = deployment["procs"], deployment["p1"], deployment["p2"]
    admin_kit = deployment["admin_kit"]
    # a stranger: hospital-b's kit from the second provisioning (its own root CA and certificate)
    procs.start(p2 / "hospital-b", "foreign-hospital-b")
    seen: list[set[str]] = []
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            seen.append(_clients(admin_kit))
            if "CERTIFICATE_VERIFY_FAILED" in procs.log_text("foreign-hospital-b") and len(seen) >= 5:
                break
            time.sleep(2)
        log_text = procs.log_text("foreign-hospital-b")
        assert procs.alive("foreign-hospital-b"), "the foreign client should keep retrying, not crash"
    finally:
        procs.stop("foreign-hospital-b")
    # the server never listed it; the positive control from the first provisioning stays registered
    assert seen and all("hospital-b" not in s for s in seen), seen
    assert all("hospital-a" in s for s in seen[-3:]), seen
    # the foreign client's TLS refused the server's certificate (not issued by its root CA)
    assert "CERTIFICATE_VERIFY_FAILED" in log_text

    # the server side of mutual TLS: it answers only certificates issued by its own root CA
    port, ca1 = deployment["fed_port"], p1 / "hospital-a" / "startup" / "rootCA.pem"
    own = p1 / "hospital-a" / "startup"
    ok, detail = security.probe_server_tls("localhost", port, ca1, own / "client.crt", own / "client.key")
    assert ok and detail.startswith("HTTP/"), detail
    foreign = p2 / "hospital-b" / "startup"
    ok, detail = security.probe_server_tls(
        "localhost", port, ca1, foreign / "client.crt", foreign / "client.key"
    )
    assert not ok, detail
    ok, detail = security.probe_server_tls("localhost", port, ca1)
    assert not ok, detail
    # and a client trusting the other root CA refuses this server
    ok, detail = security.probe_server_tls(
        "localhost", port, foreign / "rootCA.pem", foreign / "client.crt", foreign / "client.key"
    )
    assert not ok and "CERTIFICATE_VERIFY_FAILED" in detail, detail


def _job_status(sess, job_id: str, want: str, timeout: float) -> str:
    deadline = time.time() + timeout
    status = ""
    while time.time() < deadline:
        status = sess.get_job_meta(job_id)["status"]
        if status.startswith(want):
            break
        time.sleep(1)
    return status


@pytest.mark.slow
def test_only_authorised_roles_submit_and_abort_jobs(deployment):
    from nvflare.fuel.flare_api.api_spec import AuthorizationError
    from nvflare.fuel.flare_api.flare_api import new_secure_session

    from fl_app.fl.run import JobSpec, build_recipe

    root, p1, procs = deployment["root"], deployment["p1"], deployment["procs"]
    spec = JobSpec(kind="vqvae", profile=deployment["profile"], num_clients=1, num_rounds=50,
                   checkpoint_dir=str(root / "checkpoints"), max_steps=1, name="synthbrain-vqvae")  # fmt: skip
    build_recipe(spec).export(str(root / "jobs"))
    job = str(root / "jobs" / "synthbrain-vqvae")

    sessions = {}
    try:
        for role, user in ROLES.items():
            sessions[role] = new_secure_session(user, str(p1 / user), timeout=30)
        member, lead, admin = (sessions[r] for r in ("member", "lead", "project_admin"))
        # a member is logged in and may look, but not submit
        assert isinstance(member.list_jobs(), list)
        for role in ("member", "org_admin"):
            with pytest.raises(AuthorizationError, match=rf"{ROLES[role]}.*not authorized for 'submit_job'"):
                sessions[role].submit_job(job)
        assert admin.list_jobs() == [], "a refused submission must not create a job"

        # the lead submits; the job is accepted and dispatched
        job_id = lead.submit_job(job)
        assert _job_status(lead, job_id, "RUNNING", 90) == "RUNNING"
        for role in ("member", "org_admin"):
            with pytest.raises(AuthorizationError, match=rf"{ROLES[role]}.*not authorized for 'abort_job'"):
                sessions[role].abort_job(job_id)
        assert lead.get_job_meta(job_id)["status"] == "RUNNING"
        # the job reached the site, which keeps its job log to itself (no JobLogStreamer in its job)
        site_cfg = p1 / "hospital-a" / job_id / "app_hospital-a" / "config" / "config_fed_client.json"
        deadline = time.time() + 30
        while not site_cfg.exists() and time.time() < deadline:
            time.sleep(1)
        assert "JobLogStreamer" not in site_cfg.read_text()
        assert f"Injected JobLogStreamer into job {job_id}" not in procs.log_text("hospital-a")
        lead.abort_job(job_id)
        assert _job_status(lead, job_id, "FINISHED", 60) == "FINISHED:ABORTED"

        # a lead manages only its own jobs; the project admin manages any
        job2 = admin.submit_job(job)
        with pytest.raises(AuthorizationError, match="not authorized for 'abort_job'"):
            lead.abort_job(job2)
        admin.abort_job(job2)
        assert _job_status(admin, job2, "FINISHED", 60) == "FINISHED:ABORTED"
        submitters = {j["job_id"]: j["submitter_name"] for j in admin.list_jobs(detailed=True)}
        assert submitters == {job_id: ROLES["lead"], job2: ROLES["project_admin"]}
    finally:
        for s in sessions.values():
            s.close()
